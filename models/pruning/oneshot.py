"""Wanda / SparseGPT / magnitude on the Linear layers of any module.

Not sequential: every linear's input statistics come from one pass of the dense module; for a decoder stack
prefer the sequential functions, and for the driving LLM's vector encoder `models.pruning.encoder` (validity
masks, sequential stages, OWL over its blocks). `rows` ({name: bool per input row}) keeps only those rows of a
layer's input in its statistics. An N:M pattern leaves layers whose input width M does not divide dense.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunedrive.models.pruning.calibration import eval_mode, feed_linears
from prunedrive.models.pruning.masks import EXCLUDE, check_sparsity, find_linears, parse_pattern
from prunedrive.models.pruning.method import PruneRequest
from prunedrive.models.pruning.registry import PRUNING_METHODS


@torch.no_grad()
def prune_linears_with_inputs(module: nn.Module, run_calibration: Callable[[nn.Module], object], method: str,
                              sparsity: float | None, pattern=None, exclude: tuple[str, ...] = EXCLUDE,
                              rows: dict[str, torch.Tensor] | None = None, **method_kwargs) -> None:
    """`run_calibration(module)` must run the module's forward over the calibration data (any signature).
    `method`: a registered method that prunes Linear by Linear (its `linear` rule); one that needs no input
    statistics (magnitude) prunes the module by its own run."""
    spec = PRUNING_METHODS.get(method)
    if spec.linear is None:
        raise ValueError(f"{method} does not prune Linear by Linear; prune_linears_with_inputs needs a method that "
                         "does (magnitude, wanda, sparsegpt)")
    nm = parse_pattern(pattern)
    sparsity = nm[0] / nm[1] if nm else check_sparsity(sparsity)
    if spec.linear.statistics is None:
        return spec.run(module, PruneRequest(sparsity, pattern))
    linears = find_linears(module, exclude)
    stats = {name: spec.linear.statistics(lin) for name, lin in linears.items()}
    with eval_mode(module):
        feed_linears(lambda: run_calibration(module), linears, lambda name, x: stats[name].add(x), rows)
    for name, lin in linears.items():
        spec.linear.prune(lin, stats[name], sparsity, nm, **method_kwargs)
