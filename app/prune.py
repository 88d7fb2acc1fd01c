"""The `prune` command: a model directory pruned by one registered method into a normal model directory.

The output loads with `DrivingLLM.from_pretrained` (unstructured and N:M: sparse weights in compressed-tensors'
sparse-bitmask / 2:4 format, models.compressed_save; `save_dense`: zeros stored in model.safetensors) and carries
its model card (`sparsity.json`, prunedrive.models.card): global, per-part (encoder, LM) and per-layer sparsity,
method, hyper-parameters, calibration source, and what each method measured (OWL's outlier ratios, the layers an
N:M pattern left dense, a training method's history). The model families are app.prune_driving (the DrivingLLM)
and app.prune_hf (any local Hugging Face causal LM); the output directory's safety is app.prune_output.

Device and precision (`device`, `dtype`, `offload`; models.device checks them): the encoder's and the LM's
pruning (calibration statistics, OWL/Wanda/SparseGPT, structured scores) and a training method's training run on
`device`. The LM moves there whole when it fits the device's free memory (offload "auto"), else the model stays
on the CPU and the sequential block replay moves one decoder block at a time to the device with its cached
calibration inputs (models.pruning.calibration.block_offload; "always" forces it, "never" refuses it). `dtype`
bfloat16 or float16: the one-shot pruning runs on weights and calibration inputs in that dtype (statistics in
float32), and the pruned model is saved in the checkpoint's own dtype (float32 for ours): its weights carry the
dtype's rounding where a method updates them (SparseGPT). Training methods and --finetune train in float32 only
(mixed precision is not wired: pure half-precision weights lose small updates), so another dtype is refused for
them. The card records device, dtype, whether the blocks were offloaded and the device's peak memory during
pruning (`device_peak_mem_bytes`, torch.cuda.max_memory_allocated; null on the CPU).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from prunedrive.app.placement import Placement
from prunedrive.app.prune_driving import (CALIBRATIONS, SCOPES, check_driving_options, finetune_config,
                                          prune_driving_dir, recovery_config, training_data_dir, training_plan)
from prunedrive.app.prune_hf import check_hf_options, prune_hf_dir
from prunedrive.app.prune_output import (TRAINING_CHECKPOINT, call_key, check_empty, check_output_paths, commit,
                                         output_lock, partial_dir)
from prunedrive.models.card import has_model_card, read_model_card
from prunedrive.models.device import DEFAULT_DEVICE, DEFAULT_DTYPE, is_cuda
from prunedrive.models.hf_causal import is_hf_causal_lm_dir
from prunedrive.models.pruning import pruning_method

RECIPE_FORMAT = 1  # bump when a change to the pruning code changes what every recipe produces
# Finer-grained formats, in the recipe only where they apply (so the "lm"-scope driving-calibrated one-shot
# recipes, whose products did not change, keep their keys): bump when that part's code changes its products.
CALIBRATION_FORMAT = 2  # generic = pydoc prose, random = uniform ids, both token-count matched (1: uniform ids, 64)
ENCODER_FORMAT = 2  # validity masks, sequential stages, encoder pruned before the LM, OWL over encoder blocks
# Keyword arguments of prune_model_dir that are not the method's own.
PRUNE_OPTIONS = ("encoder_sparsity", "finetune", "save_dense", "device", "dtype", "offload")


def recipe(method: str, sparsity: float | None, pattern: str | None = None, scope: str = "lm",
           calibration: str = "driving", n_calibration: int = 64, seed: int = 0, **options) -> dict:
    """Everything that decides a pruned model besides the dense weights (FORMAT: bump when the code does).
    `options`: prune_model_dir's other keyword arguments (encoder_sparsity, finetune, the method's own)."""
    spec = pruning_method(method)
    shared = {k: options.pop(k) for k in PRUNE_OPTIONS if k in options}
    out = {"format": RECIPE_FORMAT, "method": method, "sparsity": sparsity, "pattern": pattern, "scope": scope,
           "calibration": None if not spec.calibrated else calibration,
           "n_calibration": None if not spec.calibrated else n_calibration, "seed": seed,
           "hyperparameters": options, "layout": output_layout(spec, shared.get("save_dense", False))}
    if spec.calibrated and calibration != "driving":
        out["calibration_format"] = CALIBRATION_FORMAT
    if scope != "lm":
        out["encoder_format"] = ENCODER_FORMAT
    if shared.get("encoder_sparsity") is not None:
        out["encoder_sparsity"] = shared["encoder_sparsity"]
    if spec.recipe is not None:  # what else decides a training method's output (DG2PF: its config)
        target, plan = training_plan(sparsity, scope, shared.get("encoder_sparsity"))
        out.update(spec.recipe(target, dict(options), plan))
    if shared.get("finetune"):
        tune = recovery_config if spec.structured else finetune_config
        out["finetune"] = asdict(tune(scope, shared["finetune"]))
    # Another device or dtype computes in other arithmetic (a CUDA index or offloading does not): only where not
    # cpu/float32, so the recipes (and cache keys) of CPU float32 prunes stay what they were.
    device, dtype = shared.get("device", DEFAULT_DEVICE), shared.get("dtype", DEFAULT_DTYPE)
    if (device, dtype) != (DEFAULT_DEVICE, DEFAULT_DTYPE):
        out["precision"] = {"device": "cuda" if is_cuda(device) else device, "dtype": dtype}
    return json.loads(json.dumps(out, default=str))


def output_layout(spec, save_dense: bool) -> str:
    """The layout a prune writes, in the recipe so that a cached model of the other layout is never reused:
    "compressed" (compressed-tensors sparse formats, models.compressed_save) for unstructured and N:M methods,
    "dense" (zeros stored) with save_dense and for structured methods, whose smaller dense model is already small."""
    return "dense" if save_dense or spec.structured else "compressed"


def prune_model_dir(model_dir: str | Path, method: str, sparsity: float | None, out_dir: str | Path,
                    pattern: str | None = None, scope: str = "lm", calibration: str = "driving",
                    n_calibration: int = 64, data_dir: str | Path | None = None, seed: int = 0,
                    progress: bool = True, overwrite: bool = False, trust_remote_code: bool = False,
                    encoder_sparsity: float | None = None, finetune: bool | dict | None = None,
                    reuse: bool = False, save_dense: bool = False, device: str = DEFAULT_DEVICE,
                    dtype: str = DEFAULT_DTYPE, offload: str = "auto", **method_kwargs) -> dict:
    """Prune `model_dir` into `out_dir`; returns what sparsity.json holds. The model is written to a
    hidden sibling directory of its own and renamed when complete, so `out_dir` holds a whole model or none.
    `model_dir` is a DrivingLLM directory, or any local Hugging Face causal LM directory (config.json whose
    model_type is not prunedrive's driving LLM; see app.prune_hf).

    Refused before anything is loaded: an `out_dir` that is, is inside or contains the model's or the data's
    directory (`check_output_paths`). One prune writes `out_dir` at a time (a lock beside it); another fails at
    once, unless `reuse` (a cache of pruned models): it waits, and returns the sparsity.json of a model the
    other finished instead of pruning again.

    scope: "lm" | "encoder" | "all"; calibration: "driving" | "generic" | "random" (one-shot methods);
    encoder_sparsity: the encoder's own target (scope encoder/all; default `sparsity`); finetune: True or a dict
    of DG2PFConfig fields, pruned fine-tuning after a one-shot method (`finetune_config`); save_dense: write the
    zeros densely instead of the compressed layout (`output_layout`; sparsity.json records bytes on disk and the
    ratio to the dense layout either way); device, dtype, offload: where and in what precision it computes (see
    the module docstring; app.placement). method_kwargs go to
    the method: owl M, lam, base; sparsegpt blocksize, percdamp; dg2pf any DG2PFConfig field (distill=False,
    gradual=False for the ablations, patience, ...) or config=DG2PFConfig(...)."""
    spec = pruning_method(method)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}")
    placement = Placement.checked(device, dtype, offload)
    if spec.trains or finetune:
        placement.refuse_training(spec.name if spec.trains else "--finetune")
    if spec.calibrated and calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration source {calibration!r}; allowed: {', '.join(CALIBRATIONS)}")
    model_dir = Path(model_dir)
    hf = is_hf_causal_lm_dir(model_dir)
    if hf:
        if encoder_sparsity is not None or finetune:
            raise ValueError("encoder_sparsity and finetune apply to the driving LLM only")
        check_hf_options(spec, sparsity, pattern, scope, method_kwargs)
        if data_dir is None and (model_dir / "train_summary.json").is_file():  # trained here: its own data
            data_dir = training_data_dir(model_dir)
    else:
        check_driving_options(spec, sparsity, scope, pattern, encoder_sparsity, finetune)
        data_dir = data_dir or training_data_dir(model_dir)
    data_dir = Path(data_dir) if data_dir else None
    final_dir = check_output_paths(Path(out_dir), model_dir, {"the input model directory (--model)": model_dir,
                                                              "the data directory (--data)": data_dir})
    settings = {"method": method, "sparsity": sparsity, "pattern": pattern, "scope": scope, "calibration": calibration,
                "n_calibration": n_calibration, "seed": seed, "encoder_sparsity": encoder_sparsity,
                "finetune": finetune, "options": method_kwargs, "layout": output_layout(spec, save_dense)}
    if (placement.device, placement.dtype) != (DEFAULT_DEVICE, DEFAULT_DTYPE):
        settings["precision"] = [placement.device, placement.dtype]
    with output_lock(final_dir, wait=reuse):
        if reuse and has_model_card(final_dir):  # finished by the prune we waited for
            return read_model_card(final_dir).record
        check_empty(final_dir, overwrite)
        partial = partial_dir(final_dir, call_key(model_dir, data_dir, settings))
        try:
            if hf:
                record = prune_hf_dir(model_dir, method, sparsity, partial, pattern, scope, calibration,
                                      n_calibration, data_dir, seed, progress, trust_remote_code,
                                      layout=settings["layout"], placement=placement, **method_kwargs)
            else:
                record = prune_driving_dir(model_dir, method, sparsity, partial, pattern, scope, calibration,
                                           n_calibration, data_dir, seed, progress, encoder_sparsity, finetune,
                                           layout=settings["layout"], placement=placement, **method_kwargs)
        except BaseException:
            if not (partial / TRAINING_CHECKPOINT).is_dir():  # a training run resumes from it; nothing else can
                shutil.rmtree(partial, ignore_errors=True)
            raise
        # The training checkpoint only serves a resume of this call: the finished model does not carry it (36 MB).
        shutil.rmtree(partial / TRAINING_CHECKPOINT, ignore_errors=True)
        commit(partial, final_dir, overwrite)
    return record
