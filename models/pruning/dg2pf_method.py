"""DG2PF as a registered pruning method: its settings from the model family's training plan and the method's
options, its data, teacher and device from the request's `Training` (models.pruning.method). The algorithm is
models.pruning.dg2pf.
"""
from __future__ import annotations

import json
from dataclasses import asdict

from torch import nn

from prunedrive.models.pruning.dg2pf import DG2PFConfig, dg2pf_prune
from prunedrive.models.pruning.method import PruneRequest, PruningMethod, TrainingPlan

# In a recipe (the bench's cache key) of every DG2PF prune: bump when a change to DG2PF or to its driving data
# changes what it produces. 2: fresh data every epoch, 24 validation batches, patience 2, per-part targets.
RECIPE_FORMAT = 2


def training_config(sparsity: float | None, options: dict, plan: TrainingPlan) -> DG2PFConfig:
    """The family's `plan.defaults`, then `options` (DG2PFConfig fields, or `config=DG2PFConfig(...)` as the
    base), the target `sparsity`, the plan's `exclude` (when it has one) and its per-part `targets` (unless the
    options give targets). An unknown setting is refused, naming the allowed ones."""
    options = dict(options)
    base = options.pop("config", None)
    settings = {**plan.defaults, **(asdict(base) if isinstance(base, DG2PFConfig) else {}), **options}
    unknown = set(settings) - set(DG2PFConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"dg2pf: unknown settings {sorted(unknown)}; allowed: "
                         f"{', '.join(DG2PFConfig.__dataclass_fields__)}")
    settings["sparsity"] = sparsity
    if plan.exclude is not None:
        settings["exclude"] = plan.exclude
    if plan.targets and not settings.get("targets"):
        settings["targets"] = dict(plan.targets)
    return DG2PFConfig(**settings)


def recipe(sparsity: float | None, options: dict, plan: TrainingPlan) -> dict:
    """What decides a DG2PF prune besides the dense weights and the common settings (the bench's cache key)."""
    return {"dg2pf_format": RECIPE_FORMAT, "dg2pf": asdict(training_config(sparsity, options, plan))}


def run(model: nn.Module, request: PruneRequest) -> dict:
    """Distilled gradual pruning, then pruned fine-tuning, of `model` in place on the training the family offers.
    The report is dg2pf_prune's, plus `hyperparameters` (the config, as JSON holds it), `data` and `truncated`
    (what the batches are)."""
    training = request.training
    if training is None:
        raise ValueError("dg2pf trains while pruning: it needs the request's training context (training data, "
                         "teacher), which `prunedrive prune` (prunedrive.app.prune.prune_model_dir) gives")
    if request.pattern:
        raise ValueError("dg2pf takes --sparsity (unstructured, gradual magnitude); N:M patterns are not part of it")
    config = training_config(request.sparsity, request.options, training.plan)
    teacher = training.teacher() if config.distill and config.gradual else None
    data = training.data(config.batch_size, config.train_batches, config.val_batches)
    with training.running(model):
        report = dg2pf_prune(model, teacher, data.train, data.val, forward=training.forward, config=config,
                             checkpoint_dir=str(training.checkpoint_dir), progress=training.progress)
    report["hyperparameters"] = json.loads(json.dumps(asdict(config)))  # as sparsity.json holds it (lists)
    report.update(data=data.description, truncated=data.truncated)
    return report


METHOD = PruningMethod("dg2pf", run, calibrated=False, trains=True, recipe=recipe)
