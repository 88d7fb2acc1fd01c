"""What a pruning method is, and the one call every method answers, one-shot or training:

    METHOD = PruningMethod("mymethod", run, calibrated=True)   # in the method's own module
    def run(model, request: PruneRequest) -> dict | list | None: ...

`request` carries the target (`sparsity`, or an N:M `pattern`), the calibration samples (calibrated methods), the
method's own options, and, for a method that trains (`trains=True`), a `Training`: what the model family offers
for training (data, a teacher, a forward, the device, a checkpoint directory, progress, the seed). The family
(prunedrive.app.prune_driving, prune_hf) builds it; the method decides what to use. Nothing outside the method
looks at its name: optional capabilities are declared here instead (`linear`: how it prunes one Linear from
input statistics, which the vector encoder's pruner uses; `weighting`: per-block sparsities over a base method,
as OWL; `recipe`: what else decides a training method's output, for the bench's cache key).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunedrive.plugins.registry import RegistryError

Forward = Callable[[nn.Module, object], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainingData:
    """Batches a training method gets: `train` re-iterable or `epoch -> batches`; `val` re-iterable;
    `description` says what they are (for sparsity.json); `truncated`: how many sequences were cut to the
    model's context."""

    train: Any
    val: Any
    description: str
    truncated: int = 0


@dataclass(frozen=True)
class TrainingPlan:
    """The family's settings for training, before any data: `defaults` (its training budget, e.g. epochs and
    batch sizes, overridden by the method's options), `exclude` (layer names the scope leaves alone; None: the
    method's own default) and `targets` (one target per part, {name prefix: sparsity}; None: one target)."""

    defaults: dict = field(default_factory=dict)
    exclude: tuple[str, ...] | None = None
    targets: dict[str, float] | None = None


@dataclass(frozen=True)
class Training:
    """What a model family gives a method that trains. `data(batch_size, train_batches, val_batches)` draws the
    batches (a family may keep its own budget: the HF family's is the calibration sample count); `teacher()`
    loads a frozen dense copy on the device; `forward(model, batch) -> (logits, labels)` moves the batch to the
    device (labels -100 where no loss is wanted); `running(model)` holds the model on the device while
    training; `checkpoint_dir`: where a resumable state may go (a killed prune of the same call resumes it)."""

    plan: TrainingPlan
    data: Callable[[int, int, int], TrainingData]
    teacher: Callable[[], nn.Module]
    forward: Forward
    running: Callable[[nn.Module], contextlib.AbstractContextManager]
    device: torch.device
    checkpoint_dir: Path
    progress: bool = True
    seed: int = 0


@dataclass(frozen=True)
class PruneRequest:
    """One pruning call: `sparsity` (the share of weights to zero, or for a structured method the share of width
    or blocks to remove; N/M with a pattern), `pattern` (N:M or None), `calibration` (LM forward-kwarg dicts;
    None for methods that are not calibrated), `options` (the method's own settings) and `training` (only for
    methods that train)."""

    sparsity: float | None
    pattern: str | None = None
    calibration: list[dict] | None = None
    options: dict = field(default_factory=dict)
    training: Training | None = None


@dataclass(frozen=True)
class LinearRule:
    """How a method prunes one Linear: `statistics` (a class gathering its input rows: `cls(linear)`, `.add(x)`;
    None: the weights alone) and `prune(linear, stats, sparsity, nm, **options)`, taking those of the method's
    options named in `options`."""

    statistics: type | None
    prune: Callable
    options: tuple[str, ...] = ()

    def options_of(self, options: dict) -> dict:
        return {k: v for k, v in options.items() if k in self.options}


@dataclass(frozen=True)
class BlockWeighting:
    """A method that prunes with a base method at per-block sparsities it picks from the dense model's scores
    (OWL). `settings(options) -> dict` (its settings with defaults filled in, the base checked; "base" names the
    base method); `sparsities(ratios, target, weights, settings)` per block; `outlier_ratio(scores, settings)`
    per block from its layers' Wanda scores."""

    settings: Callable[[dict], dict]
    outlier_ratio: Callable[[list[torch.Tensor], dict], float]
    sparsities: Callable[[list[float], float, list[float] | None, dict], list[float]]


@dataclass(frozen=True)
class PruningMethod:
    """A pruning method: `run(model, request)` prunes in place and may return the per-block sparsities it used, or a
    dict of report fields (OWL: layer_sparsities, outlier_ratios, its settings; a training method: its history).
    `calibrated`: needs calibration samples. `trains`: prunes while training; its request carries a `Training`.
    `structured`: removes whole heads, channels or blocks (a smaller model, not masks): `sparsity` is the share
    removed, no N:M pattern. `linear`, `weighting`, `recipe`: see the module docstring."""

    name: str
    run: Callable[[nn.Module, PruneRequest], Any]
    calibrated: bool = True
    trains: bool = False
    structured: bool = False
    linear: LinearRule | None = None
    weighting: BlockWeighting | None = None
    recipe: Callable[[float | None, dict, TrainingPlan], dict] | None = None

    @property
    def prunes_linears(self) -> bool:
        """True when the method can prune any set of Linear layers from their inputs (the vector encoder)."""
        return self.linear is not None or self.weighting is not None


def check_method(name: str, method: object, origin: str) -> PruningMethod:
    """`method` if it is a usable PruningMethod registered as `name`, else a ValueError naming `origin` (where it
    came from: the plug-in's entry point) and what is wrong."""
    if not isinstance(method, PruningMethod):
        raise RegistryError(f"pruning method {name!r} ({origin}) is a {type(method).__name__}, not a "
                            "prunedrive.models.pruning.PruningMethod")
    if not callable(method.run):
        raise RegistryError(f"pruning method {name!r} ({origin}): run is not callable")
    try:
        inspect.signature(method.run).bind(None, None)
    except TypeError:
        raise RegistryError(f"pruning method {name!r} ({origin}): run must take (model, request), got "
                            f"run{inspect.signature(method.run)}") from None
    except ValueError:  # a builtin without a signature: trust it
        pass
    return method
