"""The driving LLM family of `prunedrive prune`: a trained DrivingLLM directory pruned by any registered method.

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

A method that trains (DG2PF, or a plug-in) gets the family's `Training` (models.pruning.method): fresh batches of
the driving data every epoch, the dense model as teacher, the whole model on the device. `finetune` gives a
one-shot method the pruned fine-tuning DG2PF ends with (fixed mask, task loss, early stopping) with DG2PF's whole
epoch budget, so that DG2PF's effect can be told apart from more training. A structured method (width, owl-width,
depth) gets the same budget as recovery training distilled from the dense model (`recovery_config`: DG2PF at
sparsity 0 on the smaller model, distillation on the logits).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from prunedrive.app.placement import Placement
from prunedrive.app.prune_output import TRAINING_CHECKPOINT, save_pruned, structure_fields
from prunedrive.models.card import write_model_card
from prunedrive.models.data import lm_calibration_lengths, lm_calibration_samples, load_split, synthetic_split
from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.pruning import (PruneRequest, Training, TrainingData, TrainingPlan, generic_corpus,
                                       prose_calibration, prune, pruning_method, random_token_calibration,
                                       sparsity_report)
from prunedrive.models.pruning.calibration import sample_length, to_device
from prunedrive.models.pruning.dg2pf import DG2PFConfig, dg2pf_prune, next_token
from prunedrive.models.pruning.dg2pf_method import training_config
from prunedrive.models.pruning.encoder import encoder_methods, prune_encoder
from prunedrive.models.pruning.masks import find_linears, parse_pattern

SCOPES = ("lm", "encoder", "all")
CALIBRATIONS = ("driving", "generic", "random")
# DG2PF on the driving LLM: keeps a run to minutes on 2 cores (DG2PFConfig's own defaults are the paper's).
DG2PF_DEFAULTS = {"sparsity_epochs": 5, "lr": 3e-4, "max_epochs": 10, "finetune_max_epochs": 4, "patience": 2,
                  "batch_size": 16, "train_batches": 24, "val_batches": 24}
# What a training method reports that the card keeps (its `parts` under the name DG2PF gave them).
TRAINING_FIELDS = ("history", "best_val_gradual", "val_before_finetune", "best_val_finetune", "train_steps", "epochs",
                   "parts")


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


def training_plan(sparsity: float | None, scope: str = "lm",
                  encoder_sparsity: float | None = None) -> tuple[float | None, TrainingPlan]:
    """(the target a training method trains to, the family's plan): DG2PF_DEFAULTS as the budget, the layers of
    `scope`; with scope "all", one target per part ({"encoder": encoder_sparsity or sparsity, "lm": sparsity});
    with scope "encoder", the target is encoder_sparsity when given."""
    targets = None
    if scope == "all":
        targets = {"encoder": sparsity if encoder_sparsity is None else encoder_sparsity, "lm": sparsity}
    target = encoder_sparsity if scope == "encoder" and encoder_sparsity is not None else sparsity
    return target, TrainingPlan(defaults=DG2PF_DEFAULTS, exclude=_scope_exclude(scope), targets=targets)


def dg2pf_config(sparsity: float, scope: str = "lm", encoder_sparsity: float | None = None, **overrides) -> DG2PFConfig:
    """The DG2PFConfig a driving prune uses: DG2PF_DEFAULTS, then `overrides` (DG2PFConfig fields, or
    `config=DG2PFConfig(...)` as the base), the target and layers of `scope` (`training_plan`)."""
    target, plan = training_plan(sparsity, scope, encoder_sparsity)
    return training_config(target, overrides, plan)


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


def _driving_batches(model: DrivingLLM, data_dir: Path, batch_size: int, train_batches: int, val_batches: int,
                     seed: int):
    """(train: epoch -> batches, fresh rows and questions every epoch; val: a fixed list)."""
    from prunedrive.app.train import Batches

    train = Batches(load_split(data_dir, "train"), model.tokenizer, 0.5, seed)
    val = Batches(load_split(data_dir, "val"), model.tokenizer, 0.5, seed + 1)

    def take(source: Batches, epoch: int, n: int) -> list[dict]:
        items = source.epoch(epoch)
        return [source.collate(items[i * batch_size:(i + 1) * batch_size]) for i in range(n)
                if i * batch_size < len(items)]

    return (lambda epoch: take(train, epoch, train_batches)), take(val, 0, val_batches)


def driving_training(model: DrivingLLM, model_dir: Path, data_dir: Path, plan: TrainingPlan, seed: int,
                     out_dir: Path, progress: bool, placement: Placement) -> Training:
    """What a training method (and --finetune) gets: the driving data's batches, the dense model in `model_dir`
    as teacher, the whole model on the placement's device (each batch moved there as it is used; the model back
    on the CPU after), a resumable checkpoint in `out_dir`."""
    device = torch.device(placement.device)

    def data(batch_size: int, train_batches: int, val_batches: int) -> TrainingData:
        train, val = _driving_batches(model, data_dir, batch_size, train_batches, val_batches, seed)
        return TrainingData(train, val, f"driving data's train split, {train_batches} batches of {batch_size} "
                                        f"drawn fresh every epoch; validation: {len(val)} batches of the val split")

    return Training(plan=plan, data=data, teacher=lambda: DrivingLLM.from_pretrained(model_dir).to(device),
                    forward=placement.forward_on_device(lambda m, b: next_token(*m(b))),
                    running=lambda module: placement.running(module, whole=True), device=device,
                    checkpoint_dir=out_dir / TRAINING_CHECKPOINT, progress=progress, seed=seed)


def _fine_tune(model: DrivingLLM, training: Training, config: DG2PFConfig, fixed_mask: dict | None = None) -> dict:
    """DG2PF's training as the family's --finetune (with fixed_mask: its pruned fine-tuning; without: recovery
    training distilled from the dense model)."""
    needs_teacher = config.distill and config.gradual and fixed_mask is None
    teacher = training.teacher() if needs_teacher else None
    data = training.data(config.batch_size, config.train_batches, config.val_batches)
    with training.running(model):
        report = dg2pf_prune(model, teacher, data.train, data.val, forward=training.forward, config=config,
                             checkpoint_dir=str(training.checkpoint_dir), progress=training.progress,
                             fixed_mask=to_device(fixed_mask, training.device))
    report["hyperparameters"] = json.loads(json.dumps(asdict(config)))  # as sparsity.json holds it (lists)
    report["data"] = data.description
    return report


def check_driving_options(spec, sparsity: float | None, scope: str, pattern: str | None,
                          encoder_sparsity: float | None, finetune) -> None:
    """Refuse settings this family cannot honour before anything is loaded (a ValueError naming them)."""
    if encoder_sparsity is not None and scope == "lm":
        raise ValueError("encoder_sparsity needs scope 'encoder' or 'all'")
    if encoder_sparsity is not None and pattern:
        raise ValueError("encoder_sparsity is for unstructured pruning; an N:M pattern sets both parts")
    if scope != "lm" and not spec.trains and not spec.prunes_linears:
        raise ValueError(f"scope {scope!r}: the encoder can be pruned by {', '.join(encoder_methods())}, "
                         f"not {spec.name}")
    if spec.trains and finetune:
        raise ValueError(f"{spec.name} trains while pruning already; finetune is for one-shot methods")
    check_training_target(spec, sparsity, pattern)


def check_training_target(spec, sparsity: float | None, pattern: str | None) -> None:
    """A method that trains is given a --sparsity, and no N:M pattern (not wired for training)."""
    if spec.trains and (sparsity is None or pattern):
        raise ValueError(f"{spec.name} takes --sparsity (it trains while pruning); N:M patterns are not part of it")


def _part_sparsity(model: DrivingLLM) -> dict[str, float]:
    enc = sparsity_report(model.encoder, ())
    return {"encoder": enc["global"], "lm": sparsity_report(model.lm)["global"]}


def prune_driving_dir(model_dir: Path, method: str, sparsity: float | None, out_dir: Path, pattern, scope: str,
                      calibration: str, n_calibration: int, data_dir: Path, seed: int, progress: bool,
                      encoder_sparsity: float | None, finetune, layout: str = "dense",
                      placement: Placement | None = None, **method_kwargs) -> dict:
    """A DrivingLLM directory pruned into `out_dir` (the caller's partial directory): the model, its card."""
    spec = pruning_method(method)
    placement = placement or Placement()
    torch.manual_seed(seed)
    model = DrivingLLM.from_pretrained(model_dir).to(placement.torch_dtype)  # calibration inputs in the dtype too
    started = time.time()
    target, plan = training_plan(sparsity, scope, encoder_sparsity)
    training = driving_training(model, model_dir, data_dir, plan, seed, out_dir, progress, placement)
    if spec.trains:
        report = spec.run(model, PruneRequest(target, pattern, None, dict(method_kwargs), training))
        calibration_source = f"none ({report.pop('data', 'trained on the driving data')})"
        extra = {k: report[k] for k in TRAINING_FIELDS if k in report}
        if "parts" in extra:
            extra["dg2pf_parts"] = extra.pop("parts")
    else:
        report, extra, calibration_source = _prune_one_shot(model, spec, sparsity, pattern, scope, calibration,
                                                            n_calibration, data_dir, seed, encoder_sparsity,
                                                            placement, method_kwargs)
        if finetune:
            extra["finetune"] = (_recover(model, model_dir, training, scope, finetune) if spec.structured
                                 else _finetune_one_shot(model, training, scope, finetune))
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
    write_model_card(out_dir, record, default=_json_default)
    return record


def _prune_one_shot(model: DrivingLLM, spec, sparsity: float | None, pattern, scope: str, calibration: str,
                    n_calibration: int, data_dir: Path, seed: int, encoder_sparsity: float | None,
                    placement: Placement, method_kwargs: dict) -> tuple[dict, dict, str]:
    """The encoder (scopes encoder, all) then the LM (scopes lm, all) pruned by a one-shot method; returns (the
    LM's report, the card's extra fields, the calibration's description)."""
    enc_target = encoder_sparsity if encoder_sparsity is not None else sparsity
    report, sources, extra = {}, [], {}
    if scope in ("encoder", "all"):
        batch = None
        if spec.calibrated:
            batch, enc_source = encoder_calibration_batch(calibration, n_calibration, data_dir, seed)
            sources.append(f"encoder: {enc_source}")
        with placement.running(model.encoder, whole=True):
            batch = to_device(batch, torch.device(placement.device))
            extra["encoder"] = prune_encoder(model.encoder, batch, spec.name, enc_target, pattern, **method_kwargs)
    if scope in ("lm", "all"):
        if spec.calibrated:  # captured after the encoder is pruned: the inputs the pruned LM will get
            samples, detail = calibration_with_source(model, calibration, n_calibration, data_dir, seed)
            extra["calibration_detail"] = detail
            sources.insert(0, detail["description"])
        else:
            samples = None
        with torch.no_grad(), placement.running(model.lm):
            report = prune(model.lm, spec.name, sparsity, pattern, samples, **method_kwargs)
        if spec.structured:  # a smaller LM: DrivingLLM rebuilds it from config.lm (models.pruning.surgery)
            model.config.lm = model.lm.config.to_dict()
            extra["structure"] = structure_fields(report)
    for key in ("outlier_ratios", "nm_skipped"):
        if report.get(key) is not None:
            extra[f"lm_{key}" if key == "nm_skipped" else key] = report[key]
    if spec.weighting is not None:  # OWL's settings, from the LM's report or else the encoder's
        extra["owl"] = report.get("owl") or extra.get("encoder", {}).get("owl")
    return report, extra, "; ".join(sources) if sources else "none"


def _finetune_one_shot(model: DrivingLLM, training: Training, scope: str, finetune) -> dict:
    """A one-shot method's pruned fine-tuning (`finetune_config`) under the mask it left."""
    pruned = _part_sparsity(model)
    config = finetune_config(scope, finetune)
    params = find_linears(model, config.exclude)
    mask = {n: lin.weight.detach() == 0 for n, lin in params.items()}
    ft = _fine_tune(model, training, config, fixed_mask=mask)
    return {"config": ft["hyperparameters"], "data": ft["data"], "history": ft["history"],
            "val_before": ft["val_before_finetune"], "best_val": ft["best_val_finetune"],
            "train_steps": ft["train_steps"], "epochs": ft["epochs"], "sparsity_before": pruned}


def _recover(model: DrivingLLM, model_dir: Path, training: Training, scope: str, finetune) -> dict:
    """A structurally pruned model's recovery training (`recovery_config`): the dense model in `model_dir` teaches."""
    ft = _fine_tune(model, training, recovery_config(scope, finetune))
    return {"config": ft["hyperparameters"], "data": ft["data"], "history": ft["history"],
            "distilled_from": str(model_dir), "best_val_distilled": ft["best_val_gradual"],
            "val_before": ft["val_before_finetune"], "best_val": ft["best_val_finetune"],
            "train_steps": ft["train_steps"], "epochs": ft["epochs"]}


def _pattern_sparsity(pattern) -> float | None:
    nm = parse_pattern(pattern)
    return nm[0] / nm[1] if nm else None


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return float(x)
