"""Mask helpers shared by every pruning method.

Convention: a mask is a bool tensor shaped like the weight, True = pruned (set to zero).
"""
from __future__ import annotations

import re

import torch
from torch import nn

EXCLUDE = ("lm_head",)  # Wanda/OWL never prune the output head (nor embeddings: they are not nn.Linear)


def find_linears(module: nn.Module, exclude: tuple[str, ...] = EXCLUDE) -> dict[str, nn.Linear]:
    """All nn.Linear under `module` by qualified name, skipping any whose path contains an excluded part."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not set(name.split(".")) & set(exclude)
    }


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a HF causal LM (`lm.model.layers`) or of its base model (`lm.layers`)."""
    for owner in (getattr(lm, "model", None), lm):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(lm).__name__} has no decoder blocks at .model.layers or .layers")


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); None -> None (unstructured)."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if not match:
            raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4', '4:8'), got {pattern!r}")
        pattern = (int(match[1]), int(match[2]))
    n, m = pattern
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def block_plan(n_blocks, sparsity, pattern=None, layer_sparsities=None) -> list[tuple[float, tuple | None]]:
    """Per decoder block: (sparsity, (n, m) or None).

    With a pattern, `sparsity` may be None (it is n/m). With a pattern *and* per-block sparsities
    (OWL on N:M), block l keeps the group size m and prunes round(s_l * m) per group, clipped to [0, m-1].
    """
    nm = parse_pattern(pattern)
    if nm and sparsity is not None and abs(sparsity - nm[0] / nm[1]) > 1e-9 and layer_sparsities is None:
        raise ValueError(f"sparsity {sparsity} disagrees with pattern {nm[0]}:{nm[1]}")
    if layer_sparsities is None:
        layer_sparsities = [nm[0] / nm[1] if nm else sparsity] * n_blocks
    if len(layer_sparsities) != n_blocks:
        raise ValueError(f"{len(layer_sparsities)} layer sparsities for {n_blocks} blocks")
    plan = []
    for s in layer_sparsities:
        s = check_sparsity(s)
        if nm:
            n = min(max(round(s * nm[1]), 0), nm[1] - 1)
            plan.append((n / nm[1], (n, nm[1])))
        else:
            plan.append((s, None))
    return plan


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune exactly int(sparsity * size) lowest scores per output row (Wanda) or per matrix (magnitude).

    topk instead of a `<= threshold` compare, so ties cannot push sparsity above the target.
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    else:
        k = int(scores.numel() * sparsity)
        if k:
            mask.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Within each row, each group of m consecutive input columns loses its n lowest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not divisible by M={m}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    if n:
        mask.scatter_(-1, torch.topk(groups, n, dim=-1, largest=False).indices, True)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple | None, per_row: bool) -> torch.Tensor:
    return nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, per_row)


@torch.no_grad()
def apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    linear.weight.masked_fill_(mask.to(linear.weight.device), 0)


@torch.no_grad()
def sparsity_report(model: nn.Module, exclude: tuple[str, ...] = EXCLUDE) -> dict:
    """Fraction of zero weights over the prunable Linear layers: global, per layer, per decoder block."""
    linears = find_linears(model, exclude)
    zeros = {name: int((m.weight == 0).sum()) for name, m in linears.items()}
    sizes = {name: m.weight.numel() for name, m in linears.items()}
    total = sum(sizes.values())
    report = {
        "global": sum(zeros.values()) / max(total, 1),
        "per_layer": {name: zeros[name] / sizes[name] for name in linears},
        "n_params": total,
        "n_zeros": sum(zeros.values()),
    }
    try:
        blocks = decoder_layers(model)
    except ValueError:
        return report
    per_block = []
    for block in blocks:
        ws = [m.weight for m in find_linears(block, exclude).values()]
        per_block.append(sum(int((w == 0).sum()) for w in ws) / max(sum(w.numel() for w in ws), 1))
    report["per_block"] = per_block
    return report
