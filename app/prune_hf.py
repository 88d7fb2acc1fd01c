"""The Hugging Face causal LM family of `prunedrive prune`: any local causal LM directory (config.json whose
model_type is not prunedrive's driving LLM) pruned by a registered method: its decoder blocks' linears (Linear and
GPT-2 Conv1D; output head and embeddings stay dense). Calibration is the text agent's scene-text prompts of
driving data (or of an expert rollout when there is none), or prose / random ids of the same token counts; a
method that trains gets scene-text prompts + expert answers, a frozen copy of the model as teacher. Calibration
and training sequences are cut to the model's context.
"""
from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path

import torch

from prunedrive.app.placement import Placement
from prunedrive.app.prune_driving import CALIBRATIONS, check_training_target
from prunedrive.app.prune_output import TRAINING_CHECKPOINT, save_pruned, structure_fields
from prunedrive.models.card import write_model_card
from prunedrive.models.data import load_split
from prunedrive.models.pruning import (PruneRequest, Training, TrainingData, TrainingPlan, generic_corpus,
                                       prose_calibration, prune, pruning_method, random_token_calibration,
                                       sparsity_report)
from prunedrive.models.pruning.calibration import context_length, fit_to_context, sample_length

HF_CALIBRATION_SCENARIO = "smoke/highway-cruise"  # expert rollout when no driving data directory is given
# A training method's budget on a plain causal LM (DG2PF's keys; the batches come from n_calibration sequences).
HF_TRAINING_DEFAULTS = {"sparsity_epochs": 5, "max_epochs": 10, "finetune_max_epochs": 4, "patience": 2}
HF_TRAINING_BATCH = 4


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



def check_hf_options(spec, sparsity: float | None, pattern: str | None, scope: str, method_kwargs: dict) -> None:
    """Refuse settings this family cannot honour before anything is loaded (a training method's options are
    checked by its own recipe, as they would be resolved)."""
    if scope != "lm":
        raise ValueError(f"scope {scope!r}: a plain causal LM has no vector encoder; use scope 'lm'")
    check_training_target(spec, sparsity, pattern)
    if spec.trains and spec.recipe is not None:
        spec.recipe(sparsity, dict(method_kwargs), TrainingPlan(defaults=HF_TRAINING_DEFAULTS))


def prune_hf_dir(model_dir: Path, method: str, sparsity: float | None, out_dir: Path, pattern, scope: str,
                 calibration: str, n_calibration: int, data_dir, seed: int, progress: bool,
                 trust_remote_code: bool, layout: str = "dense", placement: Placement | None = None,
                 **method_kwargs) -> dict:
    """A local HF causal LM directory pruned into `out_dir` (the caller's partial directory): the model (saved by
    `save_pruned`: compressed-tensors sparse formats, loaded by models.hf_causal.load_causal_lm, or the plain
    layout AutoModelForCausalLM.from_pretrained loads), the tokenizer next to it, and its card."""
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
        training = hf_training(model, tokenizer, data, n_calibration, seed, out_dir, progress, limit, placement)
        report = spec.run(model, PruneRequest(sparsity, pattern, None, dict(method_kwargs), training))
        calibration_source, truncated = report.pop("data", "none (trained on scene text)"), report.pop("truncated", 0)
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
        record["structure"] = structure_fields(report)
    if isinstance(saved_dtype, str) and saved_dtype != "float32" and isinstance(getattr(torch, saved_dtype, None),
                                                                             torch.dtype):
        model.to(getattr(torch, saved_dtype))  # back to the checkpoint's dtype; zeros stay zeros
    else:
        model.to(torch.float32)  # a float32 checkpoint pruned in another --dtype is saved as float32 again
    record["checkpoint"] = save_pruned(model, out_dir, layout)
    tokenizer.save_pretrained(out_dir)
    write_model_card(out_dir, record, default=float)
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


def hf_training(model, tokenizer, data_dir: Path | None, n_samples: int, seed: int, out_dir: Path, progress: bool,
                max_length: int | None, placement: Placement) -> Training:
    """What a training method gets on a plain causal LM: scene-text prompts + expert answers (`n_samples` training
    sequences in batches of 4, a quarter as many for validation, each within `max_length` tokens; the method's
    own batch settings do not apply), a frozen copy of the model as teacher, every Linear/Conv1D but the output
    head to prune (the method's default), the whole model on the placement's device."""
    from prunedrive.models.pruning.dg2pf import causal_lm_forward

    device = torch.device(placement.device)

    def data(_batch_size: int, _train_batches: int, _val_batches: int) -> TrainingData:
        batch_size = HF_TRAINING_BATCH
        train_split, train_where = _driving_split(data_dir, "train", n_samples, seed)
        val_split, val_where = _driving_split(data_dir, "val", max(n_samples // 4, batch_size), seed + 1000)
        train, train_cut = scene_text_batches(tokenizer, train_split, batch_size, max(n_samples // batch_size, 1),
                                              seed, max_length)
        val, val_cut = scene_text_batches(tokenizer, val_split, batch_size, max(n_samples // (4 * batch_size), 1),
                                          seed + 1, max_length)
        cut_text = f"; {train_cut + val_cut} cut to the model's {max_length} positions" if train_cut + val_cut else ""
        return TrainingData(train, val, f"none (trained on {sum(len(b['input_ids']) for b in train)} scene-text "
                                        f"sequences from {train_where}, validated on {val_where}{cut_text})",
                            truncated=train_cut + val_cut)

    return Training(plan=TrainingPlan(defaults=HF_TRAINING_DEFAULTS), data=data,
                    teacher=lambda: copy.deepcopy(model).to(device),
                    forward=placement.forward_on_device(causal_lm_forward),
                    running=lambda module: placement.running(module, whole=True), device=device,
                    checkpoint_dir=out_dir / TRAINING_CHECKPOINT, progress=progress, seed=seed)
