"""Post-training pruning of a causal LM's decoder Linear layers (lm_head and embeddings are never pruned), and
(models.pruning.encoder) of the driving LLM's vector encoder.

    report = prune(lm, "owl", 0.5, calibration=calib, base="wanda")
    report = prune(lm, "wanda", pattern="2:4", calibration=calib)
    report = prune(lm, "width", 0.5, calibration=calib)   # structured: width / owl-width / depth make a smaller
    save_structured(lm, directory)                         # model (models.pruning.structured, depth, surgery)

Methods are registered by name (`pruning_methods()`): the built-ins below and plug-ins under the entry
point group `prunedrive.pruning`, each a `PruningMethod`. Adding one is one module with a function
`run(lm, calibration, sparsity, pattern, **kwargs)` and one registration:

    [project.entry-points."prunedrive.pruning"]
    mymethod = "my_pkg.mymethod:METHOD"      # METHOD = PruningMethod("mymethod", run)
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Callable

from torch import nn

from prunedrive.models.pruning.calibration import (capture_block_inputs, driving_calibration, generic_corpus,
                                                  generic_text_calibration, prose_calibration, random_token_calibration,
                                                  run_block)
from prunedrive.models.pruning.depth import block_influence, prune_depth
from prunedrive.models.pruning.magnitude import prune_magnitude
from prunedrive.models.pruning.masks import (apply_mask, check_sparsity, decoder_layers, find_linears, nm_mask,
                                             nm_skipped, parse_pattern, sparsity_report, unstructured_mask)
from prunedrive.models.pruning.oneshot import prune_linears_with_inputs
from prunedrive.models.pruning.owl import owl_layer_sparsities, owl_prune_report, prune_owl
from prunedrive.models.pruning.sparsegpt import prune_sparsegpt
from prunedrive.models.pruning.structured import prune_owl_width, prune_width
from prunedrive.models.pruning.surgery import structure_summary, sync_config
from prunedrive.models.pruning.wanda import prune_wanda



@dataclass(frozen=True)
class PruningMethod:
    """A pruning method. One-shot methods have `run(lm, calibration, sparsity, pattern, **kwargs)`, which
    prunes in place and may return the per-block sparsities it used, or a dict of report fields (OWL:
    layer_sparsities, outlier_ratios, its settings). `trains`: the method prunes while
    training (DG2PF), driven by prunedrive.app.compress, and has no one-shot `run`. `structured`: the method
    removes whole heads, channels or blocks (a smaller model, not masks): `sparsity` is the share of width or
    blocks removed, no N:M pattern, and `prune` reports parameters and widths instead of zeros."""

    name: str
    run: Callable | None = None
    calibrated: bool = True
    trains: bool = False
    structured: bool = False


BUILTIN_METHODS = {
    "magnitude": PruningMethod("magnitude", lambda lm, calibration, s, p, **kw: prune_magnitude(lm, s, p, **kw),
                               calibrated=False),
    "wanda": PruningMethod("wanda", lambda lm, calibration, s, p, **kw: prune_wanda(lm, calibration, s, p, **kw)),
    "sparsegpt": PruningMethod("sparsegpt",
                               lambda lm, calibration, s, p, **kw: prune_sparsegpt(lm, calibration, s, p, **kw)),
    "owl": PruningMethod("owl", lambda lm, calibration, s, p, **kw: owl_prune_report(lm, calibration, s, pattern=p,
                                                                                      **kw)),
    "dg2pf": PruningMethod("dg2pf", calibrated=False, trains=True),
    "width": PruningMethod("width", lambda lm, calibration, s, p, **kw: prune_width(lm, calibration, s, **kw),
                           structured=True),
    "owl-width": PruningMethod("owl-width",
                               lambda lm, calibration, s, p, **kw: prune_owl_width(lm, calibration, s, **kw),
                               structured=True),
    "depth": PruningMethod("depth", lambda lm, calibration, s, p, **kw: prune_depth(lm, calibration, s, **kw),
                           structured=True),
}


def pruning_methods() -> dict[str, PruningMethod]:
    """Every method by name: built-ins, then plug-ins (entry point group `prunedrive.pruning`)."""
    methods = dict(BUILTIN_METHODS)
    for entry in metadata.entry_points(group="prunedrive.pruning"):
        method = entry.load()
        if not isinstance(method, PruningMethod):
            raise TypeError(f"entry point prunedrive.pruning:{entry.name} ({entry.value}) is not a PruningMethod")
        methods.setdefault(entry.name, method)
    return methods


def pruning_method(name: str) -> PruningMethod:
    methods = pruning_methods()
    if name not in methods:
        raise ValueError(f"unknown pruning method {name!r}; allowed: {', '.join(methods)}")
    return methods[name]


METHODS = tuple(BUILTIN_METHODS)


def prune(lm: nn.Module, method: str, sparsity: float | None = None, pattern: str | None = None,
          calibration: list[dict] | None = None, **kwargs) -> dict:
    """Prune `lm` in place; returns `sparsity_report(lm)` plus the settings and per-block sparsities used.

    With an N:M `pattern`, `sparsity` may be omitted (it is N/M); layers whose input width M does not divide
    are left dense and listed in `nm_skipped`. kwargs go to the method (owl: base, M, lam, and the report gets
    the raw per-block `outlier_ratios` and `owl` settings; sparsegpt: blocksize, percdamp;
    magnitude/wanda/sparsegpt: layer_sparsities).
    """
    spec = pruning_method(method)
    if spec.run is None:
        raise ValueError(f"{method} is not a one-shot method (it prunes while training): use prunedrive.app.compress")
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

    used = spec.run(lm, calibration, sparsity, pattern, **kwargs)
    extra = dict(used) if isinstance(used, dict) else {"layer_sparsities": used}
    if extra.get("layer_sparsities") is None:
        extra["layer_sparsities"] = kwargs.get("layer_sparsities")
    report = sparsity_report(lm)
    report.update(method=method, target_sparsity=sparsity, pattern=pattern,
                  base=kwargs.get("base", "wanda") if method == "owl" else None, **extra)
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
    fields = spec.run(lm, calibration, ratio, None, **kwargs) or {}
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
    "METHODS", "PruningMethod", "pruning_methods", "pruning_method", "prune", "prune_magnitude", "prune_wanda", "prune_sparsegpt", "prune_owl", "owl_layer_sparsities",
    "prune_linears_with_inputs", "capture_block_inputs", "run_block", "generic_text_calibration",
    "driving_calibration", "generic_corpus", "prose_calibration", "random_token_calibration", "owl_prune_report",
    "nm_skipped", "unstructured_mask", "nm_mask", "apply_mask", "find_linears", "sparsity_report",
    "parse_pattern", "prune_width", "prune_owl_width", "prune_depth", "block_influence",
]
