"""Prune a trained DrivingLLM directory with one method and write a normal model directory.

The output loads with `DrivingLLM.from_pretrained` (zeros stored in model.safetensors) and carries
`sparsity.json`: global and per-layer sparsity, method, hyper-parameters, calibration source.
Scope "lm" (default, as OWLed) prunes the language model's decoder linears; "all" also prunes the
vector encoder's linears, with the same method where it has a one-shot form.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path

import torch

from prunedrive.models.data import lm_calibration_samples, load_split
from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.hf_causal import is_hf_causal_lm_dir
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
                    progress: bool = True, overwrite: bool = False, trust_remote_code: bool = False,
                    **method_kwargs) -> dict:
    """Prune `model_dir` into `out_dir`; returns what sparsity.json holds. The model is written to a
    hidden sibling directory and renamed when complete, so `out_dir` holds a whole model or none.
    `model_dir` is a DrivingLLM directory, or any local Hugging Face causal LM directory (config.json whose
    model_type is not prunedrive's driving LLM; see `_prune_hf_dir`)."""
    spec = pruning_method(method)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_output(model_dir, out_dir, overwrite)
    if is_hf_causal_lm_dir(model_dir):
        return _prune_hf_dir(model_dir, method, sparsity, out_dir, pattern, scope, calibration, n_calibration,
                             data_dir, seed, progress, trust_remote_code, **method_kwargs)
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
    """(samples, description) for a HF causal LM: the driving data's train split (or, without one, an expert
    rollout) rendered as the text agent's scene-text prompts + expert answers; or shuffled token ids."""
    from prunedrive.models.pruning.calibration import scene_text_calibration
    from prunedrive.models.scene_text import SCENE_TEXT_VERSION

    if source == "driving":
        split, where = _driving_split(data_dir, "train", n_samples, seed)
        samples = scene_text_calibration(tokenizer, split, n_samples, seed)
        return samples, f"driving ({len(samples)} samples, scene-text v{SCENE_TEXT_VERSION} prompts, {where})"
    if source == "generic":
        return (generic_text_calibration(len(tokenizer), n_samples=n_samples, length=GENERIC_LENGTH, seed=seed),
                f"generic ({n_samples} samples)")
    raise ValueError(f"unknown calibration source {source!r}; allowed: {', '.join(CALIBRATIONS)}")


def _prune_hf_dir(model_dir: Path, method: str, sparsity: float | None, final_dir: Path, pattern, scope: str,
                  calibration: str, n_calibration: int, data_dir, seed: int, progress: bool,
                  trust_remote_code: bool, **method_kwargs) -> dict:
    """A local HF causal LM directory: prune its decoder blocks' linears (Linear and GPT-2 Conv1D; output head
    and embeddings stay dense) with a one-shot method, save with save_pretrained (safetensors, loads with
    AutoModelForCausalLM.from_pretrained), the tokenizer next to it, plus sparsity.json."""
    from prunedrive.models.hf_causal import load_causal_lm
    from prunedrive.models.pruning.masks import decoder_layers

    spec = pruning_method(method)
    if scope != "lm":
        raise ValueError(f"scope {scope!r}: a plain causal LM has no vector encoder; use scope 'lm'")
    if spec.trains and method != "dg2pf":
        raise ValueError(f"{method} trains while pruning and is not wired for plain Hugging Face causal LMs")
    if spec.trains and (sparsity is None or pattern):
        raise ValueError("dg2pf takes --sparsity (unstructured, gradual magnitude); N:M patterns are not part of it")
    unknown = set(method_kwargs) - set(DG2PFConfig.__dataclass_fields__) if spec.trains else set()
    if unknown:
        raise ValueError(f"dg2pf: unknown settings {sorted(unknown)}; allowed: "
                         f"{', '.join(DG2PFConfig.__dataclass_fields__)}")
    out_dir = final_dir.with_name(f".{final_dir.name}.partial")  # DG2PF resumes from it
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, tokenizer = load_causal_lm(model_dir, trust_remote_code=trust_remote_code, dtype="float32")
    raw = json.loads((model_dir / "config.json").read_text())
    saved_dtype = raw.get("dtype") or raw.get("torch_dtype")
    started = time.time()
    data = Path(data_dir) if data_dir else None
    if spec.trains:
        report = _dg2pf_hf(model, tokenizer, sparsity, data, n_calibration, seed, out_dir, progress, method_kwargs)
        calibration_source = report.pop("data")
        model.eval()
    else:
        samples, calibration_source = (hf_calibration_set(tokenizer, calibration, n_calibration, data, seed)
                                       if spec.calibrated else (None, "none"))
        with torch.no_grad():
            report = prune(model, method, sparsity, pattern, samples, **method_kwargs)
    blocks = decoder_layers(model)
    lm = sparsity_report(model)
    record = {
        "method": method, "target_sparsity": sparsity if sparsity is not None else report.get("target_sparsity"),
        "pattern": pattern, "scope": scope, "calibration": calibration_source, "seed": seed,
        "global": lm["global"], "lm_global": lm["global"], "per_layer": lm["per_layer"],
        "per_block": report.get("per_block"), "layer_sparsities": report.get("layer_sparsities"),
        "hyperparameters": report.get("hyperparameters") or {k: v for k, v in method_kwargs.items()},
        "base_model": str(model_dir), "seconds": round(time.time() - started, 1),
        "parameters": {"lm": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                       "decoder_blocks": sum(p.numel() for p in blocks.parameters())},
        "format": "hf-causal-lm", "model_type": raw.get("model_type"),
    }
    if isinstance(saved_dtype, str) and saved_dtype != "float32" and isinstance(getattr(torch, saved_dtype, None),
                                                                             torch.dtype):
        model.to(getattr(torch, saved_dtype))  # back to the checkpoint's dtype; zeros stay zeros
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "sparsity.json").write_text(json.dumps(record, indent=2, default=float))
    if final_dir.exists():  # --overwrite, checked by the caller
        shutil.rmtree(final_dir)
    os.replace(out_dir, final_dir)
    return record


def _driving_split(data_dir: Path | None, split: str, n: int, seed: int):
    """(Split, description): `<data_dir>/<split>.parquet` when a data directory is given (an error names the
    missing file), else the first `n` steps of an expert rollout."""
    if data_dir is not None:
        return load_split(data_dir, split), f"{data_dir}/{split}.parquet"
    return _expert_rollout_split(n, seed), f"expert rollout of {HF_CALIBRATION_SCENARIO} (seed {seed + 1})"


def scene_text_batches(tokenizer, split, batch_size: int, n_batches: int, seed: int) -> list[dict]:
    """Teacher-forced training batches for a HF causal LM: scene-text prompt + expert action answer (+ EOS),
    right-padded; `labels` are the answer tokens, -100 on the prompt and the padding."""
    from prunedrive.models.hf_causal import answer_ids, prompt_ids

    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()[:batch_size * n_batches]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    batches = []
    for start in range(0, len(order), batch_size):
        pairs = []
        for r in order[start:start + batch_size]:
            answer = answer_ids(tokenizer, str(split.frame["a_action"].iloc[r])) + ([eos] if eos is not None else [])
            pairs.append((prompt_ids(tokenizer, split.observation(r)), answer))
        width = max(len(p) + len(a) for p, a in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        for i, (p, a) in enumerate(pairs):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            mask[i, :len(p) + len(a)] = 1
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _dg2pf_hf(model, tokenizer, sparsity: float, data_dir: Path | None, n_samples: int, seed: int, out_dir: Path,
              progress: bool, overrides: dict) -> dict:
    """DG2PF on a plain causal LM: distilled from a frozen copy of itself on scene-text prompts + expert answers
    (`n_samples` training sequences in batches of 4, a quarter as many for validation); every Linear/Conv1D but
    the output head is pruned (global |W|). `overrides` set DG2PFConfig fields (e.g. max_epochs=2)."""
    import copy

    from prunedrive.models.pruning.dg2pf import causal_lm_forward

    batch_size = 4
    train_split, train_where = _driving_split(data_dir, "train", n_samples, seed)
    val_split, val_where = _driving_split(data_dir, "val", max(n_samples // 4, batch_size), seed + 1000)
    train = scene_text_batches(tokenizer, train_split, batch_size, max(n_samples // batch_size, 1), seed)
    val = scene_text_batches(tokenizer, val_split, batch_size, max(n_samples // (4 * batch_size), 1), seed + 1)
    settings = {"sparsity_epochs": 5, "max_epochs": 10, "finetune_max_epochs": 4, **overrides, "sparsity": sparsity}
    config = DG2PFConfig(**settings)
    teacher = copy.deepcopy(model)
    report = dg2pf_prune(model, teacher, train, val, forward=causal_lm_forward, config=config,
                         checkpoint_dir=str(out_dir / "dg2pf-checkpoint"), progress=progress)
    report["hyperparameters"] = dict(config.__dict__)
    report["data"] = (f"none (trained on {sum(len(b['input_ids']) for b in train)} scene-text sequences from "
                      f"{train_where}, validated on {val_where})")
    return report
