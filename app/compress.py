"""Prune a trained DrivingLLM directory with one method and write a normal model directory.

The output loads with `DrivingLLM.from_pretrained` (unstructured and N:M: sparse weights in compressed-tensors'
sparse-bitmask / 2:4 format, models.compressed_save; `save_dense`: zeros stored in model.safetensors) and carries
`sparsity.json`: global, per-part (encoder, LM) and per-layer sparsity, method, hyper-parameters, calibration
source, and what each method measured (OWL's outlier ratios, the layers an N:M pattern left dense, DG2PF's
training history).

Scopes: "lm" (default, as OWLed) prunes the language model's decoder linears; "encoder" the vector encoder's
linears only; "all" both: the encoder first, then the LM's calibration inputs are captured again through the
*pruned* encoder (what the LM will see), then the LM. The encoder is pruned with the same method
(models.pruning.encoder: padded object slots kept out of every statistic; OWL over the encoder's blocks);
`encoder_sparsity` gives it its own target (default: the LM's).

Calibration (one-shot methods): "driving" ([latents] + prompt + answer of expert rows, OWLed's choice),
"generic" (real non-driving English prose, Python's own pydoc_data.topics, in windows matching the driving set's
sample count and per-sample token counts), "random" (uniform token ids, the same counts: a no-content control).
The encoder sees observations whatever the LM's source: expert rows for "driving" and "generic" (there is no
generic observation), random well-formed observations (models.data.synthetic_split) for "random".

Device and precision (`device`, `dtype`, `offload`; models.device checks them): the encoder's and the LM's
pruning (calibration statistics, OWL/Wanda/SparseGPT, structured scores) and DG2PF's training run on `device`.
The LM moves there whole when it fits the device's free memory (offload "auto"), else the model stays on the CPU
and the sequential block replay moves one decoder block at a time to the device with its cached calibration
inputs (models.pruning.calibration.block_offload; "always" forces it, "never" refuses it). `dtype` bfloat16 or
float16: the one-shot pruning runs on weights and calibration inputs in that dtype (statistics in float32), and
the pruned model is saved in the checkpoint's own dtype (float32 for ours): its weights carry the dtype's
rounding where a method updates them (SparseGPT). DG2PF and --finetune train in float32 only (mixed precision is
not wired: pure half-precision weights lose small updates), so another dtype is refused for them. sparsity.json
records device, dtype, whether the blocks were offloaded and the device's peak memory during pruning
(`device_peak_mem_bytes`, torch.cuda.max_memory_allocated; null on the CPU).

`finetune` gives a one-shot method the pruned fine-tuning DG2PF ends with (fixed mask, task loss, early
stopping) with DG2PF's whole epoch budget, so that DG2PF's effect can be told apart from more training. A
structured method (width, owl-width, depth) gets the same budget as recovery training distilled from the dense
model (`recovery_config`: DG2PF at sparsity 0 on the smaller model, distillation on the logits).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from prunedrive.app.placement import Placement
from prunedrive.harness import locks
from prunedrive.harness.results import content_hash
from prunedrive.models.data import lm_calibration_lengths, lm_calibration_samples, load_split, synthetic_split
from prunedrive.models.device import DEFAULT_DEVICE, DEFAULT_DTYPE, is_cuda
from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.hf_causal import is_hf_causal_lm_dir
from prunedrive.models.pruning import (generic_corpus, prose_calibration, prune, pruning_method,
                                       random_token_calibration, sparsity_report)
from prunedrive.models.pruning.calibration import context_length, fit_to_context, sample_length, to_device
from prunedrive.models.pruning.dg2pf import DG2PFConfig, dg2pf_prune, next_token
from prunedrive.models.pruning.encoder import ENCODER_METHODS, prune_encoder
from prunedrive.models.pruning.masks import find_linears

RECIPE_FORMAT = 1  # bump when a change to the pruning code changes what every recipe produces
# Finer-grained formats, in the recipe only where they apply (so the "lm"-scope driving-calibrated one-shot
# recipes, whose products did not change, keep their keys): bump when that part's code changes its products.
CALIBRATION_FORMAT = 2  # generic = pydoc prose, random = uniform ids, both token-count matched (1: uniform ids, 64)
ENCODER_FORMAT = 2  # validity masks, sequential stages, encoder pruned before the LM, OWL over encoder blocks
DG2PF_FORMAT = 2  # fresh data every epoch, 24 validation batches, patience 2, per-part targets
SCOPES = ("lm", "encoder", "all")
CALIBRATIONS = ("driving", "generic", "random")
# DG2PF on the driving LLM: keeps a run to minutes on 2 cores (DG2PFConfig's own defaults are the paper's).
DG2PF_DEFAULTS = {"sparsity_epochs": 5, "lr": 3e-4, "max_epochs": 10, "finetune_max_epochs": 4, "patience": 2,
                  "batch_size": 16, "train_batches": 24, "val_batches": 24}
# Keyword arguments of prune_model_dir that are not the method's own.
COMPRESS_OPTIONS = ("encoder_sparsity", "finetune", "save_dense", "device", "dtype", "offload")
# <dense>/pruned/<recipe>: the cache of pruned variants the bench and claims share. The one place inside the
# input model's directory an output may go: nothing a prune reads lives there.
PRUNED_CACHE = "pruned"


def training_data_dir(model_dir: Path) -> Path:
    """The expert data a model was trained on (recorded by training), else <model_dir>/data. Training records an
    absolute path; a relative one is the model's own (the shipped model's "data"), or, from a model trained before
    paths were recorded absolute, relative to where it was trained."""
    summary = model_dir / "train_summary.json"
    if not summary.is_file():
        return model_dir / "data"
    recorded = Path(json.loads(summary.read_text())["data_dir"])
    if recorded.is_absolute() or not (model_dir / recorded).is_dir():
        return recorded
    return model_dir / recorded


def calibration_set(model: DrivingLLM, source: str, n_samples: int, data_dir: Path, seed: int) -> list[dict]:
    """The LM's calibration samples (see `calibration_with_source`)."""
    return calibration_with_source(model, source, n_samples, data_dir, seed)[0]


def calibration_with_source(model: DrivingLLM, source: str, n_samples: int, data_dir: Path,
                            seed: int) -> tuple[list[dict], dict]:
    """(samples, what they are). driving: OWLed's choice, [latents] + prompt + answer of `n_samples` expert rows
    (through the model's current encoder); generic: windows of English prose (pydoc_data.topics) tokenized by the
    model's tokenizer, one per driving sample with the same token count; random: uniform ids of the model's
    vocabulary, the same counts."""
    if source not in CALIBRATIONS:
        raise ValueError(f"unknown calibration source {source!r}; allowed: {', '.join(CALIBRATIONS)}")
    split = load_split(data_dir, "train")
    if source == "driving":
        samples = lm_calibration_samples(model, split, n_samples=n_samples, seed=seed)
        text = "expert rows of the train split: [observation tokens] + prompt + answer"
    else:
        lengths = lm_calibration_lengths(model, split, n_samples=n_samples, seed=seed)
        if source == "generic":
            corpus, text = generic_corpus()
            samples = prose_calibration(model.tokenizer.encode(corpus), lengths, seed=seed)
            text = f"English prose from {text}, windows at seeded offsets"
        else:
            samples = random_token_calibration(len(model.tokenizer), lengths, seed=seed)
            text = f"token ids drawn uniformly from the {len(model.tokenizer)}-token vocabulary"
    # Not cut to the LM config's max_position_embeddings: the driving LLM's Llama has rotary positions (no table
    # to index past) and trains and drives on these very sequences, longer than that nominal value on `tiny`.
    tokens = sum(sample_length(s) for s in samples)
    matched = "" if source == "driving" else ", token-count matched to the driving set"
    return samples, {"source": source, "samples": len(samples), "tokens": tokens, "data": text, "truncated": 0,
                     "description": f"{source} ({len(samples)} samples, {tokens} tokens{matched}: {text})"}


def encoder_calibration_batch(source: str, n_samples: int, data_dir: Path, seed: int) -> tuple[dict, str]:
    """(collated observations, description) for encoder pruning: expert rows of the train split ("driving",
    "generic": generic text has no observations), or random well-formed observations ("random")."""
    from prunedrive.models.driving_llm import collate

    if source == "random":
        split = synthetic_split(n_samples, seed=seed)
        return collate([split.observation(r) for r in range(len(split))]), \
            f"random: {n_samples} synthetic observations (models.data.synthetic_split, seed {seed})"
    split = load_split(data_dir, "train")
    rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n_samples].tolist()
    return collate([split.observation(r) for r in rows]), f"driving: {len(rows)} expert rows of the train split"


def _scope_exclude(scope: str) -> tuple[str, ...]:
    return {"lm": ("lm_head", "encoder"), "encoder": ("lm_head", "lm"), "all": ("lm_head",)}[scope]


def dg2pf_config(sparsity: float, scope: str = "lm", encoder_sparsity: float | None = None, **overrides) -> DG2PFConfig:
    """The DG2PFConfig prune_model_dir uses: DG2PF_DEFAULTS, then `overrides` (DG2PFConfig fields, or
    `config=DG2PFConfig(...)` as the base), the target `sparsity`, the layers of `scope`; with scope "all",
    one target per part ({"encoder": encoder_sparsity or sparsity, "lm": sparsity}) unless `targets` is given."""
    base = overrides.pop("config", None)
    settings = {**DG2PF_DEFAULTS, **(asdict(base) if isinstance(base, DG2PFConfig) else {}), **overrides}
    unknown = set(settings) - set(DG2PFConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"dg2pf: unknown settings {sorted(unknown)}; allowed: "
                         f"{', '.join(DG2PFConfig.__dataclass_fields__)}")
    settings.update(sparsity=sparsity, exclude=_scope_exclude(scope))
    if scope == "all" and not settings.get("targets"):
        settings["targets"] = {"encoder": sparsity if encoder_sparsity is None else encoder_sparsity, "lm": sparsity}
    elif scope == "encoder" and encoder_sparsity is not None:
        settings["sparsity"] = encoder_sparsity
    return DG2PFConfig(**settings)


def finetune_config(scope: str, finetune) -> DG2PFConfig:
    """Pruned fine-tuning for a one-shot method (`finetune` True, or a dict of DG2PFConfig fields): DG2PF's
    settings, with a phase-2 epoch cap of DG2PF's whole budget (max_epochs + finetune_max_epochs) unless
    `finetune_max_epochs` is given."""
    overrides = dict(finetune) if isinstance(finetune, dict) else {}
    config = dg2pf_config(0.0, scope, **{k: v for k, v in overrides.items() if k != "finetune_max_epochs"})
    budget = overrides.get("finetune_max_epochs", config.max_epochs + config.finetune_max_epochs)
    return DG2PFConfig(**{**asdict(config), "finetune_max_epochs": budget, "gradual": False, "targets": None})


def recovery_config(scope: str, finetune) -> DG2PFConfig:
    """Recovery training for a structured method (`finetune` True, or a dict of DG2PFConfig fields): DG2PF at
    sparsity 0 on the smaller model, distilled from the dense model (a teacher of another shape: the loss is on the
    logits, and the vocabulary is the same), phase 1 with DG2PF's distillation loss, then its task-loss phase 2.
    Its epoch cap, max_epochs + finetune_max_epochs, is `finetune_config`'s budget, so structured and unstructured
    variants are compared at equal training."""
    overrides = {k: v for k, v in (dict(finetune) if isinstance(finetune, dict) else {}).items()
                 if k not in ("sparsity", "gradual", "distill", "targets")}
    return dg2pf_config(0.0, scope, **overrides)


def _driving_batches(model: DrivingLLM, data_dir: Path, config: DG2PFConfig, seed: int):
    """(train: epoch -> batches, fresh rows and questions every epoch; val: a fixed list)."""
    from prunedrive.app.train import Batches

    train = Batches(load_split(data_dir, "train"), model.tokenizer, 0.5, seed)
    val = Batches(load_split(data_dir, "val"), model.tokenizer, 0.5, seed + 1)
    size = config.batch_size

    def take(source: Batches, epoch: int, n: int) -> list[dict]:
        items = source.epoch(epoch)
        return [source.collate(items[i * size:(i + 1) * size]) for i in range(n) if i * size < len(items)]

    return (lambda epoch: take(train, epoch, config.train_batches)), take(val, 0, config.val_batches)


def _dg2pf(model: DrivingLLM, model_dir: Path, data_dir: Path, config: DG2PFConfig, seed: int, out_dir: Path,
           progress: bool, fixed_mask: dict | None = None, placement: Placement | None = None) -> dict:
    """DG2PF (or, with fixed_mask, its pruned fine-tuning) on the placement's device: student and teacher there,
    each batch moved there as it is used; the model back on the CPU after."""
    placement = placement or Placement()
    device = torch.device(placement.device)
    needs_teacher = config.distill and config.gradual and fixed_mask is None
    teacher = DrivingLLM.from_pretrained(model_dir).to(device) if needs_teacher else None
    train, val = _driving_batches(model, data_dir, config, seed)
    with placement.running(model, whole=True):
        report = dg2pf_prune(model, teacher, train, val, forward=placement.forward_on_device(
                                 lambda m, b: next_token(*m(b))), config=config,
                             checkpoint_dir=str(out_dir / "dg2pf-checkpoint"), progress=progress,
                             fixed_mask=to_device(fixed_mask, device))
    report["hyperparameters"] = json.loads(json.dumps(asdict(config)))  # as sparsity.json holds it (lists)
    report["data"] = (f"driving data's train split, {config.train_batches} batches of {config.batch_size} drawn "
                      f"fresh every epoch; validation: {len(val)} batches of the val split")
    return report


def recipe(method: str, sparsity: float | None, pattern: str | None = None, scope: str = "lm",
           calibration: str = "driving", n_calibration: int = 64, seed: int = 0, **options) -> dict:
    """Everything that decides a pruned model besides the dense weights (FORMAT: bump when the code does).
    `options`: prune_model_dir's other keyword arguments (encoder_sparsity, finetune, the method's own)."""
    spec = pruning_method(method)
    compress = {k: options.pop(k) for k in COMPRESS_OPTIONS if k in options}
    out = {"format": RECIPE_FORMAT, "method": method, "sparsity": sparsity, "pattern": pattern, "scope": scope,
           "calibration": None if not spec.calibrated else calibration,
           "n_calibration": None if not spec.calibrated else n_calibration, "seed": seed,
           "hyperparameters": options, "layout": output_layout(spec, compress.get("save_dense", False))}
    if spec.calibrated and calibration != "driving":
        out["calibration_format"] = CALIBRATION_FORMAT
    if scope != "lm":
        out["encoder_format"] = ENCODER_FORMAT
    if compress.get("encoder_sparsity") is not None:
        out["encoder_sparsity"] = compress["encoder_sparsity"]
    if spec.trains:
        out["dg2pf_format"] = DG2PF_FORMAT
        out["dg2pf"] = asdict(dg2pf_config(sparsity, scope, compress.get("encoder_sparsity"), **dict(options)))
    if compress.get("finetune"):
        tune = recovery_config if spec.structured else finetune_config
        out["finetune"] = asdict(tune(scope, compress["finetune"]))
    # Another device or dtype computes in other arithmetic (a CUDA index or offloading does not): only where not
    # cpu/float32, so the recipes (and cache keys) of CPU float32 prunes stay what they were.
    device, dtype = compress.get("device", DEFAULT_DEVICE), compress.get("dtype", DEFAULT_DTYPE)
    if (device, dtype) != (DEFAULT_DEVICE, DEFAULT_DTYPE):
        out["precision"] = {"device": "cuda" if is_cuda(device) else device, "dtype": dtype}
    return json.loads(json.dumps(out, default=str))


def output_layout(spec, save_dense: bool) -> str:
    """The layout a prune writes, in the recipe so that a cached model of the other layout is never reused:
    "compressed" (compressed-tensors sparse formats, models.compressed_save) for unstructured and N:M methods,
    "dense" (zeros stored) with save_dense and for structured methods, whose smaller dense model is already small."""
    return "dense" if save_dense or spec.structured else "compressed"


def save_pruned(model, out_dir: Path, layout: str) -> dict:
    """Write the pruned model in `layout`; what sparsity.json records of it: models.checkpoints.checkpoint_record
    (bytes on disk, parameters stored, scheme, execution), the layout, the dense layout's bytes and the ratio to
    them (1.0 for the dense layout) and the compressed format."""
    from prunedrive.models.checkpoints import checkpoint_record
    from prunedrive.models.compressed_save import save_compressed

    if layout == "dense":
        model.save_pretrained(out_dir)
        record = checkpoint_record(out_dir)
        return {**record, "layout": layout, "dense_bytes": record["bytes_on_disk"], "ratio_to_dense": 1.0,
                "compressed_format": "dense"}
    summary = save_compressed(model, out_dir)
    return {**checkpoint_record(out_dir), "layout": layout, "dense_bytes": summary.dense_bytes,
            "ratio_to_dense": summary.ratio_to_dense, "compressed_format": summary.format,
            "compressed_modules": summary.compressed_modules}


def _relation(out: Path, source: Path) -> str | None:
    """How the output directory `out` overlaps the read `source` (both resolved), or None when apart."""
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "contains"
    return None


def check_output_paths(out_dir: Path, model_dir: Path, reads: dict[str, Path | None]) -> Path:
    """The resolved output directory (symlinks followed), after refusing one that is, is inside or contains any
    directory the prune reads (`reads`: {what, for the message: its directory}): --overwrite would delete
    it, and the pruned model's files would mix with what is read. The one exception is the cache of pruned
    variants, `<model_dir>/pruned/<name>` (nothing read lives there). Only paths are looked at: call it before
    anything is loaded or removed."""
    out = out_dir.expanduser().resolve()
    cache = (model_dir.expanduser().resolve() / PRUNED_CACHE)
    for what, path in reads.items():
        if path is None:
            continue
        source = path.expanduser().resolve()
        relation = _relation(out, source)
        if relation is None or (relation == "is inside" and out.parent == cache):
            continue
        raise ValueError(f"--model-out {out_dir} (resolved: {out}) {relation} {what} {path} (resolved: {source}), "
                         "which this prune reads; pick a --model-out outside it")
    return out


def _check_empty(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"--model-out {out_dir} exists and is not empty; pick a new directory or pass --overwrite")


@contextlib.contextmanager
def _output_lock(out_dir: Path, wait: bool):
    """Hold `.<name>.lock` beside `out_dir` (harness.locks: flock, freed when its process dies). One prune
    writes an output directory at a time; without `wait`, a second one fails at once with exit code 2."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = out_dir.with_name(f".{out_dir.name}.lock")
    with locks.held(lock, wait) as holding:
        if not holding:
            raise FileExistsError(f"--model-out {out_dir}: another prune holds it (lock {lock}, held by the "
                                  "process whose id it holds); wait for that prune to end or pick another directory")
        yield


def _partial_name(out_dir: Path) -> re.Pattern:
    # .<name>.<12 hex: the call>.<mkdtemp's letters, digits, _>.partial; no dot in the last part, so the partial
    # directories of an output named "<name>.<more>" never match.
    return re.compile(rf"\.{re.escape(out_dir.name)}\.(?P<call>[0-9a-f]{{12}})\.[A-Za-z0-9_]+\.partial")


def _partial_dir(out_dir: Path, call: str) -> Path:
    """Where the model is written before it is renamed to `out_dir`: a directory of this prune's own (called with
    the output's lock held, so the partial directories of `out_dir` left there belong to killed prunes). One left
    by the same call (`call`: a hash of the inputs and settings) is reused, so a killed DG2PF run resumes from its
    checkpoint; others are removed."""
    pattern, reuse = _partial_name(out_dir), None
    for leftover in sorted(out_dir.parent.iterdir()):
        match = pattern.fullmatch(leftover.name)
        if not match or not leftover.is_dir():
            continue
        if match["call"] == call and reuse is None:
            reuse = leftover
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    return reuse or Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{call}.", suffix=".partial", dir=out_dir.parent))


def _call_key(model_dir: Path, data_dir: Path | None, settings: dict) -> str:
    """12 hex digits naming one prune call: the input's weight files (name, size, mtime), the data directory
    and every setting. A partial directory is only ever resumed by the same call."""
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.glob("*.safetensors"))
    return content_hash({"model": str(model_dir.resolve()), "weights": weights,
                         "data": str(data_dir.resolve()) if data_dir else None, "settings": settings})[:12]


def _commit(partial: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished `partial` to `out_dir`, under the output's lock: the destination is checked again
    (something other than a prune may have filled it meanwhile), and a replaced model is moved aside before the
    rename and deleted after it, so `out_dir` always holds a whole model."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(partial, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"--model-out {out_dir} was filled while pruning (not by a prune: it holds no lock); "
                              f"the pruned model is in {partial}")
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".replaced", dir=out_dir.parent))
    os.replace(out_dir, aside / out_dir.name)
    os.replace(partial, out_dir)
    shutil.rmtree(aside, ignore_errors=True)


def _part_sparsity(model: DrivingLLM) -> dict[str, float]:
    enc = sparsity_report(model.encoder, ())
    return {"encoder": enc["global"], "lm": sparsity_report(model.lm)["global"]}


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
    model_type is not prunedrive's driving LLM; see `_prune_hf_dir`).

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
        placement.refuse_training("dg2pf" if spec.trains else "--finetune")
    if spec.calibrated and calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration source {calibration!r}; allowed: {', '.join(CALIBRATIONS)}")
    model_dir = Path(model_dir)
    hf = is_hf_causal_lm_dir(model_dir)
    if hf:
        if encoder_sparsity is not None or finetune:
            raise ValueError("encoder_sparsity and finetune apply to the driving LLM only")
        _check_hf_options(spec, sparsity, pattern, scope, method_kwargs)
        if data_dir is None and (model_dir / "train_summary.json").is_file():  # trained here: its own data
            data_dir = training_data_dir(model_dir)
    else:
        _check_driving_options(spec, sparsity, scope, pattern, encoder_sparsity, finetune)
        data_dir = data_dir or training_data_dir(model_dir)
    data_dir = Path(data_dir) if data_dir else None
    final_dir = check_output_paths(Path(out_dir), model_dir, {"the input model directory (--model)": model_dir,
                                                              "the data directory (--data)": data_dir})
    settings = {"method": method, "sparsity": sparsity, "pattern": pattern, "scope": scope, "calibration": calibration,
                "n_calibration": n_calibration, "seed": seed, "encoder_sparsity": encoder_sparsity,
                "finetune": finetune, "options": method_kwargs, "layout": output_layout(spec, save_dense)}
    if (placement.device, placement.dtype) != (DEFAULT_DEVICE, DEFAULT_DTYPE):
        settings["precision"] = [placement.device, placement.dtype]
    with _output_lock(final_dir, wait=reuse):
        if reuse and (final_dir / "sparsity.json").is_file():  # finished by the prune we waited for
            return json.loads((final_dir / "sparsity.json").read_text())
        _check_empty(final_dir, overwrite)
        partial = _partial_dir(final_dir, _call_key(model_dir, data_dir, settings))
        try:
            if hf:
                record = _prune_hf_dir(model_dir, method, sparsity, partial, pattern, scope, calibration,
                                       n_calibration, data_dir, seed, progress, trust_remote_code,
                                       layout=settings["layout"], placement=placement, **method_kwargs)
            else:
                record = _prune_driving_dir(model_dir, method, sparsity, partial, pattern, scope, calibration,
                                            n_calibration, data_dir, seed, progress, encoder_sparsity, finetune,
                                            layout=settings["layout"], placement=placement, **method_kwargs)
        except BaseException:
            if not (partial / "dg2pf-checkpoint").is_dir():  # a DG2PF run resumes from it; nothing else can
                shutil.rmtree(partial, ignore_errors=True)
            raise
        # The training checkpoint only serves a resume of this call: the finished model does not carry it (36 MB).
        shutil.rmtree(partial / "dg2pf-checkpoint", ignore_errors=True)
        _commit(partial, final_dir, overwrite)
    return record


def _check_driving_options(spec, sparsity: float | None, scope: str, pattern: str | None,
                           encoder_sparsity: float | None, finetune) -> None:
    if encoder_sparsity is not None and scope == "lm":
        raise ValueError("encoder_sparsity needs scope 'encoder' or 'all'")
    if encoder_sparsity is not None and pattern:
        raise ValueError("encoder_sparsity is for unstructured pruning; an N:M pattern sets both parts")
    if scope != "lm" and not spec.trains and spec.name not in ENCODER_METHODS:
        raise ValueError(f"scope {scope!r}: the encoder can be pruned by {', '.join(ENCODER_METHODS)}, not {spec.name}")
    if spec.trains and finetune:
        raise ValueError("dg2pf ends with pruned fine-tuning already; finetune is for one-shot methods")
    if spec.trains and (sparsity is None or pattern):
        raise ValueError("dg2pf takes --sparsity (unstructured, gradual magnitude); N:M patterns are not part of it")


def _prune_driving_dir(model_dir: Path, method: str, sparsity: float | None, out_dir: Path, pattern, scope: str,
                       calibration: str, n_calibration: int, data_dir: Path, seed: int, progress: bool,
                       encoder_sparsity: float | None, finetune, layout: str = "dense",
                       placement: Placement | None = None, **method_kwargs) -> dict:
    """A DrivingLLM directory pruned into `out_dir` (the caller's partial directory): the model, sparsity.json."""
    spec = pruning_method(method)
    placement = placement or Placement()
    torch.manual_seed(seed)
    model = DrivingLLM.from_pretrained(model_dir).to(placement.torch_dtype)  # calibration inputs in the dtype too
    started = time.time()
    extra: dict = {}
    if spec.trains:
        config = dg2pf_config(sparsity, scope, encoder_sparsity, **method_kwargs)
        report = _dg2pf(model, model_dir, data_dir, config, seed, out_dir, progress, placement=placement)
        calibration_source = f"none ({report.pop('data')})"
        extra = {k: report[k] for k in ("history", "best_val_gradual", "val_before_finetune", "best_val_finetune",
                                        "train_steps", "epochs", "parts")}
        extra["dg2pf_parts"] = extra.pop("parts")
    else:
        enc_target = encoder_sparsity if encoder_sparsity is not None else sparsity
        report, sources = {}, []
        if scope in ("encoder", "all"):
            batch = None
            if spec.calibrated:
                batch, enc_source = encoder_calibration_batch(calibration, n_calibration, data_dir, seed)
                sources.append(f"encoder: {enc_source}")
            enc_kwargs = {k: v for k, v in method_kwargs.items()
                          if k in ("M", "lam", "base", "blocksize", "percdamp")}
            with placement.running(model.encoder, whole=True):
                batch = to_device(batch, torch.device(placement.device))
                extra["encoder"] = prune_encoder(model.encoder, batch, method, enc_target, pattern, **enc_kwargs)
        if scope in ("lm", "all"):
            if spec.calibrated:  # captured after the encoder is pruned: the inputs the pruned LM will get
                samples, detail = calibration_with_source(model, calibration, n_calibration, data_dir, seed)
                extra["calibration_detail"] = detail
                sources.insert(0, detail["description"])
            else:
                samples = None
            with torch.no_grad(), placement.running(model.lm):
                report = prune(model.lm, method, sparsity, pattern, samples, **method_kwargs)
            if spec.structured:  # a smaller LM: DrivingLLM rebuilds it from config.lm (models.pruning.surgery)
                model.config.lm = model.lm.config.to_dict()
                extra["structure"] = _structure_fields(report)
        calibration_source = "; ".join(sources) if sources else "none"
        for key in ("outlier_ratios", "nm_skipped"):
            if report.get(key) is not None:
                extra[f"lm_{key}" if key == "nm_skipped" else key] = report[key]
        if method == "owl":
            extra["owl"] = report.get("owl") or extra.get("encoder", {}).get("owl")
        if finetune and spec.structured:
            extra["finetune"] = _recover(model, model_dir, data_dir, scope, finetune, seed, out_dir, progress,
                                         placement)
        elif finetune:
            pruned = _part_sparsity(model)
            config = finetune_config(scope, finetune)
            params = find_linears(model, config.exclude)
            mask = {n: lin.weight.detach() == 0 for n, lin in params.items()}
            ft = _dg2pf(model, model_dir, data_dir, config, seed, out_dir, progress, fixed_mask=mask,
                        placement=placement)
            extra["finetune"] = {"config": ft["hyperparameters"], "data": ft["data"], "history": ft["history"],
                                 "val_before": ft["val_before_finetune"], "best_val": ft["best_val_finetune"],
                                 "train_steps": ft["train_steps"], "epochs": ft["epochs"],
                                 "sparsity_before": pruned}
    model.eval()
    whole = sparsity_report(model, ("lm_head",))
    parts = _part_sparsity(model)
    record = {
        "method": method, "target_sparsity": sparsity if sparsity is not None else _pattern_sparsity(pattern),
        "pattern": pattern, "scope": scope, "calibration": calibration_source, "seed": seed,
        "calibration_truncated": extra.get("calibration_detail", {}).get("truncated", 0),
        "global": whole["global"], "lm_global": parts["lm"], "encoder_global": parts["encoder"], "parts": parts,
        "per_layer": whole["per_layer"],
        "per_block": report.get("per_block"), "layer_sparsities": report.get("layer_sparsities"),
        "hyperparameters": report.get("hyperparameters") or {k: v for k, v in method_kwargs.items()},
        "encoder_sparsity": encoder_sparsity,
        "base_model": str(model_dir), "seconds": round(time.time() - started, 1),
        "parameters": model.num_parameters(), **extra, **placement.record(),
    }
    model.to(torch.float32)  # ours are float32 checkpoints: a bfloat16 prune's weights saved as float32 (exactly)
    record["checkpoint"] = save_pruned(model, out_dir, layout)
    (out_dir / "sparsity.json").write_text(json.dumps(record, indent=2, default=_json_default))
    return record


def _recover(model: DrivingLLM, model_dir: Path, data_dir: Path, scope: str, finetune, seed: int, out_dir: Path,
             progress: bool, placement: Placement) -> dict:
    """A structurally pruned model's recovery training (`recovery_config`): the dense model in `model_dir` teaches."""
    config = recovery_config(scope, finetune)
    ft = _dg2pf(model, model_dir, data_dir, config, seed, out_dir, progress, placement=placement)
    return {"config": ft["hyperparameters"], "data": ft["data"], "history": ft["history"],
            "distilled_from": str(model_dir), "best_val_distilled": ft["best_val_gradual"],
            "val_before": ft["val_before_finetune"], "best_val": ft["best_val_finetune"],
            "train_steps": ft["train_steps"], "epochs": ft["epochs"]}


def _structure_fields(report: dict) -> dict:
    """What a structured method did (parameters before/after, widths, removed blocks), for sparsity.json."""
    return {k: v for k, v in report.items() if k not in ("method", "pattern", "structured")}


def _pattern_sparsity(pattern) -> float | None:
    from prunedrive.models.pruning.masks import parse_pattern

    nm = parse_pattern(pattern)
    return nm[0] / nm[1] if nm else None


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return float(x)


# -- plain Hugging Face causal LMs ------------------------------------------------------------------------------
HF_CALIBRATION_SCENARIO = "smoke/highway-cruise"  # expert rollout when no driving data directory is given


@functools.lru_cache(maxsize=4)
def _expert_rollout_split(n_steps: int, seed: int):
    """Driving data for calibration when there is no dataset: one expert episode (the smoke suite's first
    scenario, noise-free), its first `n_steps` steps, as a models.data.Split with the expert's answers."""
    import numpy as np
    import pandas as pd

    from prunedrive.app.dataset import rollout
    from prunedrive.harness.observation import OBS_SHAPES
    from prunedrive.models.data import Split
    from prunedrive.scenarios.loader import load_scenario

    rows, _ = rollout(load_scenario(HF_CALIBRATION_SCENARIO), seed=seed + 1, max_steps=max(n_steps, 1))
    obs = {k: np.stack([r[f"obs_{k}"].reshape(shape) for r in rows]) for k, shape in OBS_SHAPES.items()}
    return Split(obs, pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("obs_")} for r in rows]))


def hf_calibration_set(tokenizer, source: str, n_samples: int, data_dir: Path | None, seed: int) -> tuple[list[dict], str]:
    """(samples, description) for a HF causal LM: "driving", the driving data's train split (or, without one, an
    expert rollout) rendered as the text agent's scene-text prompts + expert answers; "generic", windows of English
    prose (pydoc_data.topics) with the driving samples' token counts (BOS first where the driving samples have
    it); "random", uniform token ids with the same counts. `hf_calibration` also cuts them to a context."""
    samples, description, _ = hf_calibration(tokenizer, source, n_samples, data_dir, seed)
    return samples, description


def hf_calibration(tokenizer, source: str, n_samples: int, data_dir: Path | None, seed: int,
                   max_length: int | None = None) -> tuple[list[dict], str, int]:
    """(samples, description, how many driving samples were cut) as `hf_calibration_set`, the driving samples
    cut to their first `max_length` tokens (the model's context) before the others copy their lengths."""
    from prunedrive.models.pruning.calibration import scene_text_calibration
    from prunedrive.models.scene_text import SCENE_TEXT_VERSION

    if source not in CALIBRATIONS:
        raise ValueError(f"unknown calibration source {source!r}; allowed: {', '.join(CALIBRATIONS)}")
    split, where = _driving_split(data_dir, "train", n_samples, seed)
    driving, cut = fit_to_context(scene_text_calibration(tokenizer, split, n_samples, seed), max_length)
    cut_text = f", {cut} cut to the model's {max_length} positions" if cut else ""
    if source == "driving":
        return driving, (f"driving ({len(driving)} samples{cut_text}, scene-text v{SCENE_TEXT_VERSION} prompts, "
                         f"{where})"), cut
    lengths = [sample_length(s) for s in driving]
    if source == "generic":
        corpus, text = generic_corpus()
        bos = tokenizer.bos_token_id
        bos = bos if bos is not None and all(int(s["input_ids"][0, 0]) == bos for s in driving) else None
        samples = prose_calibration(tokenizer(corpus, add_special_tokens=False)["input_ids"], lengths, seed, bos)
        text = f"English prose from {text}"
    else:
        samples = random_token_calibration(len(tokenizer), lengths, seed)
        text = "uniform token ids"
    return samples, (f"{source} ({len(samples)} samples, {sum(lengths)} tokens, token-count matched to the driving "
                     f"set of {where}{cut_text}: {text})"), cut


def _check_hf_options(spec, sparsity: float | None, pattern: str | None, scope: str, method_kwargs: dict) -> None:
    if scope != "lm":
        raise ValueError(f"scope {scope!r}: a plain causal LM has no vector encoder; use scope 'lm'")
    if spec.trains and spec.name != "dg2pf":
        raise ValueError(f"{spec.name} trains while pruning and is not wired for plain Hugging Face causal LMs")
    if spec.trains and (sparsity is None or pattern):
        raise ValueError("dg2pf takes --sparsity (unstructured, gradual magnitude); N:M patterns are not part of it")
    unknown = set(method_kwargs) - set(DG2PFConfig.__dataclass_fields__) if spec.trains else set()
    if unknown:
        raise ValueError(f"dg2pf: unknown settings {sorted(unknown)}; allowed: "
                         f"{', '.join(DG2PFConfig.__dataclass_fields__)}")


def _prune_hf_dir(model_dir: Path, method: str, sparsity: float | None, out_dir: Path, pattern, scope: str,
                  calibration: str, n_calibration: int, data_dir, seed: int, progress: bool,
                  trust_remote_code: bool, layout: str = "dense", placement: Placement | None = None,
                  **method_kwargs) -> dict:
    """A local HF causal LM directory: prune its decoder blocks' linears (Linear and GPT-2 Conv1D; output head
    and embeddings stay dense) with a one-shot method, save it (`save_pruned`: compressed-tensors sparse formats,
    loaded by models.hf_causal.load_causal_lm, or with `save_dense` the plain layout AutoModelForCausalLM.from_pretrained
    loads), the tokenizer next to it, plus sparsity.json, into `out_dir` (the
    caller's partial directory). Calibration and DG2PF sequences are cut to the model's context."""
    from prunedrive.models.hf_causal import load_causal_lm
    from prunedrive.models.pruning.masks import decoder_layers

    spec = pruning_method(method)
    placement = placement or Placement()
    torch.manual_seed(seed)
    model, tokenizer = load_causal_lm(model_dir, trust_remote_code=trust_remote_code, dtype=placement.dtype)
    raw = json.loads((model_dir / "config.json").read_text())
    saved_dtype = raw.get("dtype") or raw.get("torch_dtype")
    started = time.time()
    data = Path(data_dir) if data_dir else None
    limit = context_length(model)
    if spec.trains:
        report = _dg2pf_hf(model, tokenizer, sparsity, data, n_calibration, seed, out_dir, progress, method_kwargs,
                           limit, placement=placement)
        calibration_source, truncated = report.pop("data"), report.pop("truncated")
        model.eval()
    else:
        samples, calibration_source, truncated = (
            hf_calibration(tokenizer, calibration, n_calibration, data, seed, limit) if spec.calibrated
            else (None, "none", 0))
        with torch.no_grad(), placement.running(model):
            report = prune(model, method, sparsity, pattern, samples, **method_kwargs)
    blocks = decoder_layers(model)
    lm = sparsity_report(model)
    record = {
        "method": method, "target_sparsity": sparsity if sparsity is not None else report.get("target_sparsity"),
        "pattern": pattern, "scope": scope, "calibration": calibration_source, "seed": seed,
        "calibration_truncated": truncated,
        "global": lm["global"], "lm_global": lm["global"], "per_layer": lm["per_layer"],
        "per_block": report.get("per_block"), "layer_sparsities": report.get("layer_sparsities"),
        "hyperparameters": report.get("hyperparameters") or {k: v for k, v in method_kwargs.items()},
        "base_model": str(model_dir), "seconds": round(time.time() - started, 1),
        "parameters": {"lm": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                       "decoder_blocks": sum(p.numel() for p in blocks.parameters())},
        "format": "hf-causal-lm", "model_type": raw.get("model_type"),
        **{k: report[k] for k in ("outlier_ratios", "owl", "history", "train_steps", "epochs") if report.get(k)},
        **placement.record(),
    }
    if report.get("nm_skipped") is not None:
        record["lm_nm_skipped"] = report["nm_skipped"]
    if spec.structured:
        record["structure"] = _structure_fields(report)
    if isinstance(saved_dtype, str) and saved_dtype != "float32" and isinstance(getattr(torch, saved_dtype, None),
                                                                             torch.dtype):
        model.to(getattr(torch, saved_dtype))  # back to the checkpoint's dtype; zeros stay zeros
    else:
        model.to(torch.float32)  # a float32 checkpoint pruned in another --dtype is saved as float32 again
    record["checkpoint"] = save_pruned(model, out_dir, layout)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "sparsity.json").write_text(json.dumps(record, indent=2, default=float))
    return record


def _driving_split(data_dir: Path | None, split: str, n: int, seed: int):
    """(Split, description): `<data_dir>/<split>.parquet` when a data directory is given (an error names the
    missing file), else the first `n` steps of an expert rollout."""
    if data_dir is not None:
        return load_split(data_dir, split), f"{data_dir}/{split}.parquet"
    return _expert_rollout_split(n, seed), f"expert rollout of {HF_CALIBRATION_SCENARIO} (seed {seed + 1})"


def _fit_pair(prompt: list[int], answer: list[int], max_length: int | None) -> tuple[list[int], list[int], bool]:
    """(prompt, answer, cut?) within `max_length` tokens: the prompt loses its start (the answer is what the
    loss is on, and the scene's end, the ego's question, sits right before it)."""
    if max_length is None or len(prompt) + len(answer) <= max_length:
        return prompt, answer, False
    keep = max(max_length - len(answer), 1)
    prompt = prompt[-keep:]
    return prompt, answer[:max_length - len(prompt)], True


def scene_text_batches(tokenizer, split, batch_size: int, n_batches: int, seed: int,
                       max_length: int | None = None) -> tuple[list[dict], int]:
    """(teacher-forced training batches for a HF causal LM, how many sequences were cut): scene-text prompt +
    expert action answer (+ EOS), right-padded, each within `max_length` tokens (the model's context;
    `_fit_pair`); `labels` are the answer tokens, -100 on the prompt and the padding."""
    from prunedrive.models.hf_causal import answer_ids, prompt_ids

    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()[:batch_size * n_batches]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    batches, cut = [], 0
    for start in range(0, len(order), batch_size):
        pairs = []
        for r in order[start:start + batch_size]:
            answer = answer_ids(tokenizer, str(split.frame["a_action"].iloc[r])) + ([eos] if eos is not None else [])
            prompt, answer, was_cut = _fit_pair(prompt_ids(tokenizer, split.observation(r)), answer, max_length)
            pairs.append((prompt, answer))
            cut += was_cut
        width = max(len(p) + len(a) for p, a in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        for i, (p, a) in enumerate(pairs):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            mask[i, :len(p) + len(a)] = 1
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches, cut


def _dg2pf_hf(model, tokenizer, sparsity: float, data_dir: Path | None, n_samples: int, seed: int, out_dir: Path,
              progress: bool, overrides: dict, max_length: int | None = None,
              placement: Placement | None = None) -> dict:
    """DG2PF on a plain causal LM: distilled from a frozen copy of itself on scene-text prompts + expert answers
    (`n_samples` training sequences in batches of 4, a quarter as many for validation, each within `max_length`
    tokens); every Linear/Conv1D but the output head is pruned (global |W|). `overrides` set DG2PFConfig fields
    (e.g. max_epochs=2). The report's "truncated": how many sequences were cut."""
    import copy

    from prunedrive.models.pruning.dg2pf import causal_lm_forward

    batch_size = 4
    train_split, train_where = _driving_split(data_dir, "train", n_samples, seed)
    val_split, val_where = _driving_split(data_dir, "val", max(n_samples // 4, batch_size), seed + 1000)
    train, train_cut = scene_text_batches(tokenizer, train_split, batch_size, max(n_samples // batch_size, 1), seed,
                                          max_length)
    val, val_cut = scene_text_batches(tokenizer, val_split, batch_size, max(n_samples // (4 * batch_size), 1),
                                      seed + 1, max_length)
    settings = {"sparsity_epochs": 5, "max_epochs": 10, "finetune_max_epochs": 4, "patience": 2, **overrides,
                "sparsity": sparsity}
    config = DG2PFConfig(**settings)
    placement = placement or Placement()
    teacher = copy.deepcopy(model).to(placement.device)
    with placement.running(model, whole=True):
        report = dg2pf_prune(model, teacher, train, val, forward=placement.forward_on_device(causal_lm_forward),
                             config=config, checkpoint_dir=str(out_dir / "dg2pf-checkpoint"), progress=progress)
    report["hyperparameters"] = dict(config.__dict__)
    cut_text = f"; {train_cut + val_cut} cut to the model's {max_length} positions" if train_cut + val_cut else ""
    report["data"] = (f"none (trained on {sum(len(b['input_ids']) for b in train)} scene-text sequences from "
                      f"{train_where}, validated on {val_where}{cut_text})")
    report["truncated"] = train_cut + val_cut
    return report
