"""Depth pruning: remove whole decoder blocks by ShortGPT's Block Influence (Men et al., "ShortGPT: Layers in Large
Language Models are More Redundant Than You Expect", arXiv 2403.03853, 2024).

BI_l = 1 - mean over calibration tokens of cos(X_l, X_{l+1}), X_l the hidden state entering block l and X_{l+1} the
one leaving it. A block that barely turns the residual stream (BI near 0) is the most redundant; the blocks with the
lowest BI are removed, all scored in one pass on the dense model (ShortGPT does not re-score after each removal).
Tokens with attention_mask 0 are left out of the mean. The block replay is models.pruning.calibration's
(capture_block_inputs, run_block); the removal and renumbering is models.pruning.surgery.remove_blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunedrive.models.pruning.calibration import capture_block_inputs, run_block
from prunedrive.models.pruning.masks import check_sparsity, decoder_layers
from prunedrive.models.pruning.method import PruneRequest, PruningMethod
from prunedrive.models.pruning.surgery import remove_blocks


@torch.no_grad()
def block_influence(lm: nn.Module, calibration: list[dict]) -> list[float]:
    """BI per decoder block on the dense model (see the module docstring)."""
    hidden, kwargs = capture_block_inputs(lm, calibration)
    valid = [_valid_tokens(sample, h) for sample, h in zip(calibration, hidden)]
    influence = []
    for block in decoder_layers(lm):
        out = run_block(block, hidden, kwargs)
        cos_sum, tokens = 0.0, 0
        for x_in, x_out, keep in zip(hidden, out, valid):
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)[keep]
            cos_sum, tokens = cos_sum + float(cos.sum()), tokens + cos.numel()
        influence.append(1.0 - cos_sum / max(tokens, 1))
        hidden = out
    return influence


def _valid_tokens(sample: dict, hidden: torch.Tensor) -> torch.Tensor:
    mask = sample.get("attention_mask")
    if mask is None:
        return torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    return mask.to(hidden.device).bool().reshape(hidden.shape[:-1])


def blocks_to_remove(n_blocks: int, ratio: float) -> int:
    """round(ratio * n_blocks), at least one block when ratio > 0, and never every block."""
    n = round(check_sparsity(ratio) * n_blocks)
    return min(max(n, 1 if ratio > 0 else 0), n_blocks - 1)


def lowest_influence(influence: list[float], n: int) -> list[int]:
    """The n blocks with the lowest influence (ties: the later block), ascending indices."""
    order = sorted(range(len(influence)), key=lambda i: (influence[i], -i))
    return sorted(order[:n])


def prune_depth(lm: nn.Module, calibration: list[dict], ratio: float) -> dict:
    """Remove `ratio` of the decoder blocks (see `blocks_to_remove`), those of lowest BI, in place."""
    influence = block_influence(lm, calibration)
    drop = lowest_influence(influence, blocks_to_remove(len(influence), ratio))
    kept = remove_blocks(lm, drop)
    return {"block_influence": influence, "removed_blocks": drop, "kept_blocks": kept}


def run(lm: nn.Module, request: PruneRequest) -> dict:
    return prune_depth(lm, request.calibration, request.sparsity, **request.options)


METHOD = PruningMethod("depth", run, structured=True)
