"""Post-training pruning of a causal LM's decoder Linear layers (lm_head and embeddings are never pruned).

    report = prune(lm, "owl", 0.5, calibration=calib, base="wanda")
    report = prune(lm, "wanda", pattern="2:4", calibration=calib)
"""
from __future__ import annotations

from torch import nn

from models.pruning.calibration import (capture_block_inputs, driving_calibration, generic_text_calibration,
                                        run_block)
from models.pruning.magnitude import prune_magnitude
from models.pruning.masks import (apply_mask, check_sparsity, find_linears, nm_mask, parse_pattern,
                                  sparsity_report, unstructured_mask)
from models.pruning.oneshot import prune_linears_with_inputs
from models.pruning.owl import owl_layer_sparsities, prune_owl
from models.pruning.sparsegpt import prune_sparsegpt
from models.pruning.wanda import prune_wanda

METHODS = ("magnitude", "wanda", "sparsegpt", "owl")


def prune(lm: nn.Module, method: str, sparsity: float | None = None, pattern: str | None = None,
          calibration: list[dict] | None = None, **kwargs) -> dict:
    """Prune `lm` in place; returns `sparsity_report(lm)` plus the settings and per-block sparsities used.

    With an N:M `pattern`, `sparsity` may be omitted (it is N/M). kwargs go to the method
    (owl: base, M, lam; sparsegpt: blocksize, percdamp; magnitude/wanda/sparsegpt: layer_sparsities).
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {METHODS}")
    nm = parse_pattern(pattern)
    if nm and sparsity is not None and abs(sparsity - nm[0] / nm[1]) > 1e-9:
        raise ValueError(f"sparsity {sparsity} disagrees with pattern {pattern} (= {nm[0] / nm[1]})")
    if not nm and sparsity is None:
        raise ValueError("give a sparsity or an N:M pattern")
    sparsity = nm[0] / nm[1] if nm else check_sparsity(sparsity)
    if method != "magnitude" and not calibration:
        raise ValueError(f"{method} needs calibration data (a list of LM forward-kwarg dicts)")

    layer_sparsities = kwargs.get("layer_sparsities")
    if method == "magnitude":
        prune_magnitude(lm, sparsity, pattern, **kwargs)
    elif method == "wanda":
        prune_wanda(lm, calibration, sparsity, pattern, **kwargs)
    elif method == "sparsegpt":
        prune_sparsegpt(lm, calibration, sparsity, pattern, **kwargs)
    else:
        layer_sparsities = prune_owl(lm, calibration, sparsity, pattern=pattern, **kwargs)
    report = sparsity_report(lm)
    report.update(method=method, target_sparsity=sparsity, pattern=pattern, layer_sparsities=layer_sparsities,
                  base=kwargs.get("base", "wanda") if method == "owl" else None)
    return report


__all__ = [
    "METHODS", "prune", "prune_magnitude", "prune_wanda", "prune_sparsegpt", "prune_owl", "owl_layer_sparsities",
    "prune_linears_with_inputs", "capture_block_inputs", "run_block", "generic_text_calibration",
    "driving_calibration", "unstructured_mask", "nm_mask", "apply_mask", "find_linears", "sparsity_report",
    "parse_pattern",
]
