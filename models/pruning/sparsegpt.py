"""SparseGPT (Frantar & Alistarh, 2023): choose the mask with the OBS saliency w^2 / [H^-1]_jj^2 and update
the remaining weights of each row to compensate, column by column, with H = 2 X X^T / n.

Sequential over decoder blocks like Wanda. Unstructured masks are chosen over a whole column block
(all rows, `blocksize` columns), N:M masks lazily every m columns on the already-updated weights,
both as in the reference. Damping: `percdamp` x mean(diag H) on the diagonal (reference: 0.01). An N:M
pattern whose M does not divide a layer's input width leaves that layer dense. Each linear builds its own H even when q/k/v share an input (simple, not fast).
"""
from __future__ import annotations

import torch
from torch import nn

from prunedrive.models.pruning.calibration import sequential_blocks
from prunedrive.models.pruning.masks import (block_plan, decoder_layers, in_features, nm_mask, nm_skips,
                                             unstructured_mask, weight_matrix)
from prunedrive.models.pruning.method import LinearRule, PruneRequest, PruningMethod


class Hessian:
    """Running X X^T over calibration tokens (fp32)."""

    def __init__(self, linear: nn.Linear):
        n = in_features(linear)
        self.xx = torch.zeros(n, n, device=linear.weight.device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        self.xx += x.T @ x
        self.n += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return 2 * self.xx / max(self.n, 1)


@torch.no_grad()
def sparsegpt_prune_linear(linear: nn.Linear, stats: Hessian, sparsity: float, nm=None, blocksize: int = 128,
                           percdamp: float = 0.01) -> None:
    if nm_skips(linear, nm):
        return  # M does not divide the input width: the layer stays dense (masks.nm_skipped lists it)
    W = weight_matrix(linear).detach().clone().float()  # [out, in], Conv1D too
    H = stats.matrix().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0  # channels never active: their weights cannot matter, prune them outright
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, device=H.device)
    # upper Cholesky factor of H^-1: its rows give the OBS updates for the not-yet-processed columns
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            mask1 = unstructured_mask(W1**2 / d[None] ** 2, sparsity, per_row=False)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                mask1[:, g] = nm_mask(W1[:, g] ** 2 / d[None, g] ** 2, *nm)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS: spread the error over later columns
            W1[:, i] = q  # exact zeros, not w - err * d up to rounding
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns after this block
        mask[:, i1:i2] = mask1

    weight_matrix(linear).copy_(W.masked_fill(mask, 0).to(linear.weight.dtype))


@torch.no_grad()
def prune_sparsegpt(lm: nn.Module, calibration: list[dict], sparsity: float | None, pattern=None,
                    layer_sparsities=None, blocksize: int = 128, percdamp: float = 0.01) -> None:
    plan = block_plan(len(decoder_layers(lm)), sparsity, pattern, layer_sparsities)
    for i, linears, stats in sequential_blocks(lm, calibration, Hessian):
        for name, lin in linears.items():
            sparsegpt_prune_linear(lin, stats[name], *plan[i], blocksize=blocksize, percdamp=percdamp)


def run(lm: nn.Module, request: PruneRequest) -> None:
    return prune_sparsegpt(lm, request.calibration, request.sparsity, request.pattern, **request.options)


METHOD = PruningMethod("sparsegpt", run,
                       linear=LinearRule(Hessian, sparsegpt_prune_linear, options=("blocksize", "percdamp")))
