"""Mask helpers shared by every pruning method.

Convention: a mask is a bool tensor shaped like the weight *matrix* [out_features, in_features], True = pruned
(set to zero). The prunable layers are nn.Linear and transformers' GPT-2-style Conv1D, whose weight is stored
transposed ([in, out]); `weight_matrix` gives every prunable layer's weight as an [out, in] view, so scores,
masks and updates are written once for both.
"""
from __future__ import annotations

import re

import torch
from torch import nn

try:  # GPT-2, GPT-J's relatives, ...: y = x @ W + b with W [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency; keep masks importable without it
    class Conv1D(nn.Module):  # type: ignore[no-redef]
        pass

EXCLUDE = ("lm_head", "embed_out")  # never prune the output head (GPT-NeoX: embed_out), nor embeddings (not Linear)
PRUNABLE = (nn.Linear, Conv1D)

# Where decoder blocks live in HF causal LMs (first match wins): Llama/Mistral/Qwen/Gemma/Phi (model.layers),
# a base model (layers), GPT-2/GPT-J/Bloom/Falcon/CodeGen (transformer.h), GPT-NeoX/Pythia (gpt_neox.layers),
# OPT/BART-style decoders (model.decoder.layers), MPT/DBRX (transformer.blocks), base models of those (h, ...).
DECODER_PATHS = ("model.layers", "layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                 "decoder.layers", "transformer.blocks", "transformer.layers", "model.transformer.h", "h", "blocks",
                 "language_model.model.layers", "model.language_model.layers")


def find_linears(module: nn.Module, exclude: tuple[str, ...] = EXCLUDE) -> dict[str, nn.Module]:
    """All prunable layers (nn.Linear, transformers' Conv1D) under `module` by qualified name, skipping any whose
    path contains an excluded part."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, PRUNABLE) and not set(name.split(".")) & set(exclude)
    }


def is_conv1d(layer: nn.Module) -> bool:
    return isinstance(layer, Conv1D) and not isinstance(layer, nn.Linear)


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features]: nn.Linear's own tensor, a transposed *view* of a Conv1D's
    (in-place edits of the view edit the layer)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def in_features(layer: nn.Module) -> int:
    return weight_matrix(layer).shape[1]


def _attribute_path(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM: the first of DECODER_PATHS that is an nn.ModuleList (`model.layers`
    for Llama-style models and `layers` for their base models, as before; `transformer.h` for GPT-2, ...).
    For a transformers model none of them fits, the shallowest ModuleList with config.num_hidden_layers
    entries. Anything else (e.g. a vector encoder) raises ValueError."""
    for path in DECODER_PATHS:
        layers = _attribute_path(lm, path)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    n_layers = _num_hidden_layers(lm)
    if n_layers:
        lists = [(name.count("."), name, m) for name, m in lm.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == n_layers]
        if lists:
            return min(lists, key=lambda t: (t[0], t[1]))[2]
    raise ValueError(f"{type(lm).__name__} has no decoder blocks at any of {', '.join(DECODER_PATHS)}")


def _num_hidden_layers(lm: nn.Module) -> int | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(lm, PreTrainedModel):
        return None
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) and n > 0 else None


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
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # contiguous, also for a Conv1D view
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


def nm_skips(layer_or_width, nm: tuple | None) -> bool:
    """True when an N:M pattern cannot apply: the layer's input width is not a multiple of M (such a layer is left
    dense by every method, and listed by `nm_skipped`)."""
    if not nm:
        return False
    width = layer_or_width if isinstance(layer_or_width, int) else in_features(layer_or_width)
    return width % nm[1] != 0


def nm_skipped(linears: dict[str, nn.Module], pattern) -> dict[str, str]:
    """{name: reason} of the layers an N:M `pattern` leaves dense because M does not divide their input width."""
    nm = parse_pattern(pattern)
    return {name: f"input width {in_features(lin)} is not a multiple of M={nm[1]}: left dense"
            for name, lin in linears.items() if nm_skips(lin, nm)}


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple | None, per_row: bool) -> torch.Tensor:
    """The mask for `scores` [out, in]; with an N:M pattern whose M does not divide the input width, an empty mask
    (the layer stays dense: see `nm_skipped`)."""
    if nm and nm_skips(scores.shape[1], nm):
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, per_row)


@torch.no_grad()
def apply_mask(linear: nn.Module, mask: torch.Tensor) -> None:
    """Zero the masked entries; `mask` is [out, in] (for a Conv1D too: it is applied to the transposed view)."""
    weight = weight_matrix(linear)
    weight.masked_fill_(mask.to(weight.device), 0)


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
