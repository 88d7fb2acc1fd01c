"""Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2, prune the lowest scores of every output row.

Sequential over decoder blocks: each block is scored on the outputs of the already-pruned blocks before it.
Within a block, all linears are scored in one pass on the dense block (as the reference code does).
"""
from __future__ import annotations

import torch
from torch import nn

from prunedrive.models.pruning.calibration import sequential_blocks
from prunedrive.models.pruning.masks import (apply_mask, block_plan, decoder_layers, in_features, select_mask,
                                             weight_matrix)
from prunedrive.models.pruning.method import LinearRule, PruneRequest, PruningMethod


class ColumnNorms:
    """Running sum over calibration tokens of x_j^2 per input channel j."""

    def __init__(self, linear: nn.Linear):
        self.sq = torch.zeros(in_features(linear), device=linear.weight.device)

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.pow(2).sum(0)

    def norm(self) -> torch.Tensor:
        return self.sq.sqrt()  # the reference divides by n samples first: a per-layer constant, same ranking


def wanda_scores(linear: nn.Linear, stats: ColumnNorms) -> torch.Tensor:
    return weight_matrix(linear).detach().abs().float() * stats.norm()[None, :]  # [out, in], Conv1D too


@torch.no_grad()
def wanda_prune_linear(linear: nn.Linear, stats: ColumnNorms, sparsity: float, nm=None) -> None:
    # per_row: Wanda compares weights only within the same output, which the paper finds matters for LLMs
    apply_mask(linear, select_mask(wanda_scores(linear, stats), sparsity, nm, per_row=True))


@torch.no_grad()
def prune_wanda(lm: nn.Module, calibration: list[dict], sparsity: float | None, pattern=None,
                layer_sparsities=None) -> None:
    plan = block_plan(len(decoder_layers(lm)), sparsity, pattern, layer_sparsities)
    for i, linears, stats in sequential_blocks(lm, calibration, ColumnNorms):
        for name, lin in linears.items():
            wanda_prune_linear(lin, stats[name], *plan[i])


def run(lm: nn.Module, request: PruneRequest) -> None:
    return prune_wanda(lm, request.calibration, request.sparsity, request.pattern, **request.options)


METHOD = PruningMethod("wanda", run, linear=LinearRule(ColumnNorms, wanda_prune_linear))
