"""Prune a trained DrivingLLM directory with one method and write a normal model directory.

The output loads with `DrivingLLM.from_pretrained` (zeros stored in model.safetensors) and carries
`sparsity.json`: global and per-layer sparsity, method, hyper-parameters, calibration source.
Scope "lm" (default, as OWLed) prunes the language model's decoder linears; "all" also prunes the
vector encoder's linears, with the same method where it has a one-shot form.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from prunedrive.models.data import lm_calibration_samples, load_split
from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.pruning import (generic_text_calibration, prune, prune_linears_with_inputs, pruning_method,
                                       sparsity_report)
from prunedrive.models.pruning.dg2pf import DG2PFConfig, dg2pf_prune, next_token

RECIPE_FORMAT = 1  # bump when a change to the pruning code changes what a recipe produces
SCOPES = ("lm", "all")
CALIBRATIONS = ("driving", "generic")
GENERIC_LENGTH = 64  # tokens: about a driving sample's latents + prompt + answer


def training_data_dir(model_dir: Path) -> Path:
    """The expert data a model was trained on (recorded by training), else <model_dir>/data."""
    summary = model_dir / "train_summary.json"
    if summary.is_file():
        return Path(json.loads(summary.read_text())["data_dir"])
    return model_dir / "data"


def calibration_set(model: DrivingLLM, source: str, n_samples: int, data_dir: Path, seed: int) -> list[dict]:
    """Driving samples (OWLed's choice: [latents] + prompt + answer from expert data) or, as the ablation,
    uniformly random token ids of the model's own vocabulary (no driving content at all)."""
    if source == "driving":
        return lm_calibration_samples(model, load_split(data_dir, "train"), n_samples=n_samples, seed=seed)
    if source == "generic":
        return generic_text_calibration(len(model.tokenizer), n_samples=n_samples, length=GENERIC_LENGTH, seed=seed)
    raise ValueError(f"unknown calibration source {source!r}; allowed: {', '.join(CALIBRATIONS)}")


def _dg2pf(model: DrivingLLM, model_dir: Path, data_dir: Path, sparsity: float, scope: str, seed: int,
           out_dir: Path, progress: bool, config: DG2PFConfig | None) -> dict:
    from prunedrive.app.train import Batches

    teacher = DrivingLLM.from_pretrained(model_dir)
    batch_size, train_batches, val_batches = 16, 24, 6  # per epoch: keeps DG2PF to minutes on 2 cores
    train = Batches(load_split(data_dir, "train"), model.tokenizer, 0.5, seed)
    val = Batches(load_split(data_dir, "val"), model.tokenizer, 0.5, seed + 1)

    def batches(source: Batches, n: int) -> list[dict]:
        items = source.epoch(0)
        return [source.collate(items[i * batch_size:(i + 1) * batch_size]) for i in range(n)
                if i * batch_size < len(items)]

    config = config or DG2PFConfig(sparsity=sparsity, sparsity_epochs=5, lr=3e-4, max_epochs=10,
                                   finetune_max_epochs=4, exclude=("lm_head",) if scope == "all" else ("lm_head", "encoder"))
    report = dg2pf_prune(model, teacher, batches(train, train_batches), batches(val, val_batches),
                         forward=lambda m, b: next_token(*m(b)), config=config,
                         checkpoint_dir=str(out_dir / "dg2pf-checkpoint"), progress=progress)
    report["hyperparameters"] = {k: v for k, v in config.__dict__.items()}
    return report


def recipe(method: str, sparsity: float | None, pattern: str | None = None, scope: str = "lm",
           calibration: str = "driving", n_calibration: int = 64, seed: int = 0, **method_kwargs) -> dict:
    """Everything that decides a pruned model besides the dense weights (FORMAT: bump when the code does)."""
    return {"format": RECIPE_FORMAT, "method": method, "sparsity": sparsity, "pattern": pattern, "scope": scope,
            "calibration": None if not pruning_method(method).calibrated else calibration,
            "n_calibration": None if not pruning_method(method).calibrated else n_calibration, "seed": seed,
            "hyperparameters": method_kwargs}


def _check_output(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"--out {out_dir} is the input model directory; pruning would overwrite the dense weights")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {out_dir} exists and is not empty; pick a new directory or pass --overwrite")


def prune_model_dir(model_dir: str | Path, method: str, sparsity: float | None, out_dir: str | Path,
                    pattern: str | None = None, scope: str = "lm", calibration: str = "driving",
                    n_calibration: int = 64, data_dir: str | Path | None = None, seed: int = 0,
                    progress: bool = True, overwrite: bool = False, **method_kwargs) -> dict:
    """Prune `model_dir` into `out_dir`; returns what sparsity.json holds. The model is written to a
    hidden sibling directory and renamed when complete, so `out_dir` holds a whole model or none."""
    spec = pruning_method(method)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_output(model_dir, out_dir, overwrite)
    final_dir, out_dir = out_dir, out_dir.with_name(f".{out_dir.name}.partial")  # DG2PF resumes from it
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir) if data_dir else training_data_dir(model_dir)
    torch.manual_seed(seed)
    model = DrivingLLM.from_pretrained(model_dir)
    started = time.time()
    if spec.trains:
        if sparsity is None or pattern:
            raise ValueError("dg2pf takes --sparsity (unstructured, gradual magnitude); N:M patterns are not part of it")
        report = _dg2pf(model, model_dir, data_dir, sparsity, scope, seed, out_dir, progress, None)
        calibration_source = "none (trained on the driving data's train split)"
    else:
        samples = calibration_set(model, calibration, n_calibration, data_dir, seed) if spec.calibrated else None
        with torch.no_grad():
            report = prune(model.lm, method, sparsity, pattern, samples, **method_kwargs)
        if scope == "all":
            _prune_encoder(model, "magnitude" if method in ("magnitude",) else "wanda" if method == "owl" else method,
                           report["target_sparsity"], pattern, data_dir, n_calibration, seed)
        calibration_source = f"{calibration} ({n_calibration} samples)" if spec.calibrated else "none"
    model.eval()
    whole = sparsity_report(model, ("lm_head",))
    record = {
        "method": method, "target_sparsity": sparsity if sparsity is not None else report.get("target_sparsity"),
        "pattern": pattern, "scope": scope, "calibration": calibration_source, "seed": seed,
        "global": whole["global"], "lm_global": sparsity_report(model.lm)["global"], "per_layer": whole["per_layer"],
        "per_block": report.get("per_block"), "layer_sparsities": report.get("layer_sparsities"),
        "hyperparameters": report.get("hyperparameters") or {k: v for k, v in method_kwargs.items()},
        "base_model": str(model_dir), "seconds": round(time.time() - started, 1),
        "parameters": model.num_parameters(),
    }
    model.save_pretrained(out_dir)
    (out_dir / "sparsity.json").write_text(json.dumps(record, indent=2, default=float))
    if final_dir.exists():  # --overwrite, checked above
        shutil.rmtree(final_dir)
    os.replace(out_dir, final_dir)
    return record


def _prune_encoder(model: DrivingLLM, method: str, sparsity: float, pattern, data_dir: Path, n: int, seed: int):
    from prunedrive.models.driving_llm import collate

    split = load_split(data_dir, "train")
    rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    batch = collate([split.observation(r) for r in rows])
    prune_linears_with_inputs(model.encoder, lambda encoder: encoder(batch), method, sparsity, pattern)
