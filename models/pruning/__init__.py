"""Post-training pruning of a causal LM's decoder Linear layers (lm_head and embeddings are never pruned), and
(models.pruning.encoder) of the driving LLM's vector encoder.

    report = prune(lm, "owl", 0.5, calibration=calib, base="wanda")
    report = prune(lm, "wanda", pattern="2:4", calibration=calib)
    report = prune(lm, "width", 0.5, calibration=calib)   # structured: width / owl-width / depth make a smaller
    save_structured(lm, directory)                         # model (models.pruning.structured, depth, surgery)

Methods are registered by name in `PRUNING_METHODS` (models.pruning.registry): the built-ins and plug-ins under
the entry point group `prunedrive.pruning`, each a `PruningMethod` whose one call is `run(model, request)`
(models.pruning.method), one-shot and training methods alike. Adding one is one module and one registration:

    [project.entry-points."prunedrive.pruning"]
    mymethod = "my_pkg.mymethod:METHOD"      # METHOD = PruningMethod("mymethod", run)
"""
from __future__ import annotations

from torch import nn

from prunedrive.models.pruning.calibration import (capture_block_inputs, driving_calibration, generic_corpus,
                                                  generic_text_calibration, prose_calibration, random_token_calibration,
                                                  run_block)
from prunedrive.models.pruning.depth import block_influence, prune_depth
from prunedrive.models.pruning.magnitude import prune_magnitude
from prunedrive.models.pruning.masks import (apply_mask, check_sparsity, decoder_layers, find_linears, nm_mask,
                                             nm_skipped, parse_pattern, sparsity_report, unstructured_mask)
from prunedrive.models.pruning.method import PruneRequest, PruningMethod, Training, TrainingData, TrainingPlan
from prunedrive.models.pruning.oneshot import prune_linears_with_inputs
from prunedrive.models.pruning.owl import owl_layer_sparsities, owl_prune_report, prune_owl
from prunedrive.models.pruning.sparsegpt import prune_sparsegpt
from prunedrive.models.pruning.structured import prune_owl_width, prune_width
from prunedrive.models.pruning.surgery import structure_summary, sync_config
from prunedrive.models.pruning.wanda import prune_wanda
from prunedrive.models.pruning.registry import (BUILTIN_METHODS, METHODS, PRUNING_METHODS, method_names,
                                                pruning_method, pruning_methods)

def prune(lm: nn.Module, method: str, sparsity: float | None = None, pattern: str | None = None,
          calibration: list[dict] | None = None, **kwargs) -> dict:
    """Prune `lm` in place; returns `sparsity_report(lm)` plus the settings and per-block sparsities used.

    With an N:M `pattern`, `sparsity` may be omitted (it is N/M); layers whose input width M does not divide
    are left dense and listed in `nm_skipped`. kwargs go to the method (owl: base, M, lam, and the report gets
    the raw per-block `outlier_ratios` and `owl` settings; sparsegpt: blocksize, percdamp;
    magnitude/wanda/sparsegpt: layer_sparsities).
    """
    spec = pruning_method(method)
    if spec.trains:
        raise ValueError(f"{method} trains while pruning: prune with `prunedrive prune` (prunedrive.app.prune), "
                         "which gives it its training data")
    nm = parse_pattern(pattern)
    if nm and sparsity is not None and abs(sparsity - nm[0] / nm[1]) > 1e-9:
        raise ValueError(f"sparsity {sparsity} disagrees with pattern {pattern} (= {nm[0] / nm[1]})")
    if not nm and sparsity is None:
        raise ValueError("give a sparsity or an N:M pattern")
    sparsity = nm[0] / nm[1] if nm else check_sparsity(sparsity)
    if spec.calibrated and not calibration:
        raise ValueError(f"{method} needs calibration data (a list of LM forward-kwarg dicts)")
    if spec.structured:
        return _prune_structured(lm, spec, sparsity, pattern, calibration, **kwargs)

    used = spec.run(lm, PruneRequest(sparsity, pattern, calibration, kwargs))
    extra = dict(used) if isinstance(used, dict) else {"layer_sparsities": used}
    if extra.get("layer_sparsities") is None:
        extra["layer_sparsities"] = kwargs.get("layer_sparsities")
    report = sparsity_report(lm)
    report.update(method=method, target_sparsity=sparsity, pattern=pattern,
                  base=spec.weighting.settings(kwargs)["base"] if spec.weighting else None, **extra)
    if nm:
        try:
            in_blocks = {id(m) for m in decoder_layers(lm).modules()}
            linears = {n: m for n, m in find_linears(lm).items() if id(m) in in_blocks}
        except ValueError:
            linears = find_linears(lm)
        report["nm_skipped"] = nm_skipped(linears, pattern)
    return report


def _prune_structured(lm: nn.Module, spec: PruningMethod, ratio: float, pattern: str | None,
                      calibration: list[dict] | None, **kwargs) -> dict:
    """A structured method's report: parameters and decoder-block parameters before and after, per-block widths
    (depth: removed and kept blocks) and the method's own fields; the model's config is updated for saving
    (models.pruning.surgery.sync_config)."""
    if pattern is not None:
        raise ValueError(f"{spec.name} removes whole heads, channels or blocks: an N:M pattern does not apply "
                         "(give a sparsity: the share to remove)")
    before = structure_summary(lm)
    fields = spec.run(lm, PruneRequest(ratio, None, calibration, kwargs)) or {}
    sync_config(lm)
    after = structure_summary(lm)
    return {"method": spec.name, "structured": True, "target_ratio": ratio, "pattern": None,
            "parameters_before": before["parameters"], "parameters_after": after["parameters"],
            "block_parameters_before": before["block_parameters"],
            "block_parameters_after": after["block_parameters"],
            "removed_block_parameter_share": 1 - after["block_parameters"] / max(before["block_parameters"], 1),
            "blocks_before": before["blocks"], "blocks_after": after["blocks"], "widths_before": before["widths"],
            **fields, "widths": after["widths"]}


__all__ = [
    "METHODS", "BUILTIN_METHODS", "PRUNING_METHODS", "PruningMethod", "PruneRequest", "Training", "TrainingData", "TrainingPlan",
    "method_names", "pruning_methods", "pruning_method", "prune", "prune_magnitude", "prune_wanda", "prune_sparsegpt", "prune_owl", "owl_layer_sparsities",
    "prune_linears_with_inputs", "capture_block_inputs", "run_block", "generic_text_calibration",
    "driving_calibration", "generic_corpus", "prose_calibration", "random_token_calibration", "owl_prune_report",
    "nm_skipped", "unstructured_mask", "nm_mask", "apply_mask", "find_linears", "sparsity_report",
    "parse_pattern", "prune_width", "prune_owl_width", "prune_depth", "block_influence",
]
