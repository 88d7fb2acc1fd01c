"""Magnitude pruning: one |W| threshold per matrix (the baseline in Wanda/OWL), or N:M on |W|."""
from __future__ import annotations

import torch
from torch import nn

from prunedrive.models.pruning.masks import (apply_mask, block_plan, decoder_layers, find_linears, select_mask,
                                             weight_matrix)


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
            apply_mask(lin, select_mask(weight_matrix(lin).abs(), s, nm, per_row=False))
