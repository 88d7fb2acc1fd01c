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
from prunedrive.models.pruning.magnitude import prune_magnitude
from prunedrive.models.pruning.masks import EXCLUDE, check_sparsity, find_linears, parse_pattern
from prunedrive.models.pruning.sparsegpt import Hessian, sparsegpt_prune_linear
from prunedrive.models.pruning.wanda import ColumnNorms, wanda_prune_linear


@torch.no_grad()
def prune_linears_with_inputs(module: nn.Module, run_calibration: Callable[[nn.Module], object], method: str,
                              sparsity: float | None, pattern=None, exclude: tuple[str, ...] = EXCLUDE,
                              rows: dict[str, torch.Tensor] | None = None, **method_kwargs) -> None:
    """`run_calibration(module)` must run the module's forward over the calibration data (any signature)."""
    nm = parse_pattern(pattern)
    sparsity = nm[0] / nm[1] if nm else check_sparsity(sparsity)
    if method == "magnitude":
        return prune_magnitude(module, sparsity, pattern)
    stat_cls, prune_linear = {"wanda": (ColumnNorms, wanda_prune_linear),
                              "sparsegpt": (Hessian, sparsegpt_prune_linear)}[method]
    linears = find_linears(module, exclude)
    stats = {name: stat_cls(lin) for name, lin in linears.items()}
    with eval_mode(module):
        feed_linears(lambda: run_calibration(module), linears, lambda name, x: stats[name].add(x), rows)
    for name, lin in linears.items():
        prune_linear(lin, stats[name], sparsity, nm, **method_kwargs)
