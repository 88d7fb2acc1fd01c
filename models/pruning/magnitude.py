"""Magnitude pruning: one |W| threshold per matrix (the baseline in Wanda/OWL), or N:M on |W|."""
from __future__ import annotations

import torch
from torch import nn

from prunedrive.models.pruning.masks import (apply_mask, block_plan, decoder_layers, find_linears, select_mask,
                                             weight_matrix)
from prunedrive.models.pruning.method import LinearRule, PruneRequest, PruningMethod


@torch.no_grad()
def magnitude_prune_linear(linear: nn.Module, stats: None, sparsity: float, nm=None) -> None:
    """One |W| threshold over the whole matrix (per_row=False: magnitude compares every weight of the layer)."""
    apply_mask(linear, select_mask(weight_matrix(linear).abs(), sparsity, nm, per_row=False))


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float | None, pattern=None, layer_sparsities=None) -> None:
    """Prune the decoder blocks' Linear layers of an LM, or, for a module without decoder blocks (e.g. the
    vector encoder), all of its Linear layers (lm_head excluded). `layer_sparsities`: one per decoder block."""
    try:
        groups = [find_linears(block) for block in decoder_layers(model)]
    except ValueError:
        if layer_sparsities is not None:
            raise ValueError("layer_sparsities needs a model with decoder blocks") from None
        groups = [find_linears(model)]
    for linears, (s, nm) in zip(groups, block_plan(len(groups), sparsity, pattern, layer_sparsities)):
        for lin in linears.values():
            magnitude_prune_linear(lin, None, s, nm)


def run(model: nn.Module, request: PruneRequest) -> None:
    return prune_magnitude(model, request.sparsity, request.pattern, **request.options)


METHOD = PruningMethod("magnitude", run, calibrated=False, linear=LinearRule(None, magnitude_prune_linear))
