"""DG2PF (Fontana et al., IEEE Trans. AI 2024): distilled gradual pruning, then pruned fine-tuning.

Phase "gradual" (Algorithm 1): at epoch i (1-based) the target is min(i / s_e, 1) * S. On every batch,
simulated pruning: magnitude masks from the current weights, masked values saved and zeroed, forward and
backward, masked values restored, then the (clipped) AdamW step, so a pruned weight whose gradient pushes it
up can re-enter the kept set later. Loss (alpha * KL_T(teacher || student) + (1 - alpha) * CE) * T^2 against
the frozen unpruned teacher. From epoch s_e on (sparsity = S), continue while validation loss improves.
Phase "finetune" (Algorithm 2): final mask fixed from the best gradual weights, task loss (CE) only,
gradients and values of pruned weights held at zero, until validation stops improving. The final mask is
then applied permanently.

Loss positions: the caller's `forward(model, batch) -> (logits, labels)` returns aligned logits [..., V]
and labels [...] with -100 where no loss is wanted (for the driving LLM: everything but the answer tokens).
Validation: CE of the masked student on `val_batches` (lower is better), or `evaluate(student)`.

Departures from the authors' public code (rom42pla/dg2pf), which is an earlier variant: it prunes once
(global, central signed-percentile band of all "weight" tensors, norms included), has no simulated pruning
(pruned weights are frozen at zero from the start), uses AdamW lr 1e-5, a plateau patience of 4 and
grad-norm clipping 0.5. Here we follow the paper's algorithms; lr 1e-5 and clip 0.5 are kept as defaults,
patience defaults to 1 (the paper's "while validation improves"); only nn.Linear weights are pruned
(lm_head excluded), by |W|.
Departures from the paper / its code: the KL term is summed over the vocabulary and averaged over selected
positions (the code's `F.kl_div(..., reduction="mean")` also divides by the class count, which for a 32k
vocabulary would all but switch distillation off); CE is multiplied by T^2 too, as the paper's formula
says; masks can be recomputed every `mask_interval` batches (1 = paper) because a global top-k over a
7B-parameter model on every batch is costly; the best state is kept in memory (and in the checkpoint).
Resuming restores student, optimizer, phase, epoch, best state and history, not RNG state or data order.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunedrive.models.pruning.masks import EXCLUDE, find_linears, sparsity_report, unstructured_mask

Forward = Callable[[nn.Module, object], tuple[torch.Tensor, torch.Tensor]]
CHECKPOINT = "dg2pf_state.pt"


@dataclass
class DG2PFConfig:
    sparsity: float = 0.5  # target S
    sparsity_epochs: int = 10  # s_e: epochs to reach S
    scope: str = "global"  # "global": one |W| threshold over all pruned layers; "layer": one per layer
    temperature: float = 4.0
    alpha: float = 0.75
    lr: float = 1e-5
    weight_decay: float = 0.01
    patience: int = 1  # epochs without validation improvement before a phase ends
    max_epochs: int = 30  # cap on phase-1 epochs (including the s_e ramp)
    finetune_max_epochs: int = 20
    grad_clip: float = 0.5
    mask_interval: int = 1
    exclude: tuple[str, ...] = EXCLUDE


def magnitude_masks(params: dict[str, torch.Tensor], sparsity: float, scope: str = "global") -> dict:
    """True = pruned. Global: the int(S * total) smallest |w| over all tensors; layer: per tensor."""
    if scope == "layer":
        return {n: unstructured_mask(p.detach().abs(), sparsity, per_row=False) for n, p in params.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flat = unstructured_mask(torch.cat([p.detach().abs().flatten() for p in params.values()])[None], sparsity,
                             per_row=False)[0]
    sizes = [p.numel() for p in params.values()]
    return {n: m.view_as(p) for (n, p), m in zip(params.items(), flat.split(sizes))}


def _selected(logits: torch.Tensor, labels: torch.Tensor):
    keep = labels.reshape(-1) != -100
    return logits.reshape(-1, logits.shape[-1])[keep].float(), labels.reshape(-1)[keep], keep


def distillation_loss(student_logits, teacher_logits, labels, T: float, alpha: float) -> torch.Tensor:
    s, y, keep = _selected(student_logits, labels)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep].float()
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
    return (alpha * kl + (1 - alpha) * F.cross_entropy(s, y)) * T * T


def task_loss(logits, labels) -> torch.Tensor:
    s, y, _ = _selected(logits, labels)
    return F.cross_entropy(s, y)


def next_token(logits: torch.Tensor, labels: torch.Tensor):
    """Align unshifted causal-LM outputs: position t's logits predict labels[t + 1].
    For DrivingLLM (whose forward returns unshifted logits, labels): `lambda m, b: next_token(*m(b))`."""
    return logits[:, :-1], labels[:, 1:]


def causal_lm_forward(model: nn.Module, batch: dict):
    """`forward` for a HF causal LM batch with `labels` (-100 = no loss)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return next_token(model(**inputs).logits, batch["labels"])


@torch.no_grad()
def _zero(params, masks) -> dict:
    """Zero the masked entries; returns their dense values for restoring."""
    saved = {n: params[n][m].clone() for n, m in masks.items()}
    for n, m in masks.items():
        params[n][m] = 0
    return saved


@torch.no_grad()
def _restore(params, masks, saved):
    for n, m in masks.items():
        params[n][m] = saved[n]


def gradual_step(student, teacher, batch, forward: Forward, optimizer, params, masks, config: DG2PFConfig):
    """One simulated-pruning step with the given masks; returns the loss (None if no selected positions)."""
    with torch.no_grad():
        teacher_logits, _ = forward(teacher, batch)
    saved = _zero(params, masks)
    logits, labels = forward(student, batch)
    if not (labels != -100).any():
        _restore(params, masks, saved)
        return None
    loss = distillation_loss(logits, teacher_logits, labels, config.temperature, config.alpha)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _restore(params, masks, saved)  # restored *before* the step: pruned weights keep training, can come back
    nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
    optimizer.step()
    return loss.item()


def finetune_step(student, batch, forward: Forward, optimizer, params, masks, config: DG2PFConfig):
    """One pruned fine-tuning step: task loss, pruned weights get no gradient and stay exactly zero."""
    logits, labels = forward(student, batch)
    if not (labels != -100).any():
        return None
    loss = task_loss(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for n, m in masks.items():
        if params[n].grad is not None:
            params[n].grad[m] = 0
    nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
    optimizer.step()
    _zero(params, masks)  # AdamW's decoupled decay and momentum cannot move a zero with zero grad, but be exact
    return loss.item()


@torch.no_grad()
def validation_loss(student, val_batches, forward: Forward, params, masks) -> float:
    """Mean task loss of the *masked* student (dense values restored afterwards)."""
    saved = _zero(params, masks)
    was_training = student.training
    student.eval()
    total, n = 0.0, 0
    for batch in val_batches:
        logits, labels = forward(student, batch)
        if (labels != -100).any():
            total, n = total + task_loss(logits, labels).item(), n + 1
    student.train(was_training)
    _restore(params, masks, saved)
    return total / max(n, 1)


def _mean(losses) -> float | None:
    losses = [x for x in losses if x is not None]
    return sum(losses) / len(losses) if losses else None


def _progress(iterable, description: str, enabled: bool):
    if not enabled:
        yield from iterable
        return
    try:
        from rich.progress import track
    except ImportError:
        yield from iterable
        return
    total = len(iterable) if hasattr(iterable, "__len__") else None
    yield from track(iterable, description=description, total=total, transient=True)


def dg2pf_prune(student: nn.Module, teacher: nn.Module, train_batches: Iterable, val_batches: Iterable,
                forward: Forward, config: DG2PFConfig | None = None, checkpoint_dir: str | None = None,
                progress: bool = True, evaluate: Callable[[nn.Module], float] | None = None) -> dict:
    """Prune `student` in place (teacher: the unpruned model, frozen). Batches must be re-iterable
    (a list or a DataLoader). Returns `sparsity_report(student)` plus history and best validation losses."""
    config = config or DG2PFConfig()
    if not (0 <= config.sparsity < 1 and config.sparsity_epochs >= 1 and config.patience >= 1):
        raise ValueError(f"bad DG2PF config: {config}")
    params = {n: lin.weight for n, lin in find_linears(student, tuple(config.exclude)).items()}
    teacher.eval().requires_grad_(False)
    student.train()

    def val(masks):
        if evaluate is None:
            return validation_loss(student, val_batches, forward, params, masks)
        saved = _zero(params, masks)
        try:
            return float(evaluate(student))
        finally:
            _restore(params, masks, saved)

    state = {"phase": "gradual", "epoch": 0, "best_val": math.inf, "bad_epochs": 0, "history": [],
             "best_student": None, "final_mask": None, "best_val_gradual": None}
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    path = os.path.join(checkpoint_dir, CHECKPOINT) if checkpoint_dir else None
    if path and os.path.exists(path):
        saved_state = torch.load(path, map_location="cpu", weights_only=True)  # our own file, tensors only
        student.load_state_dict(saved_state.pop("student"))
        optimizer.load_state_dict(saved_state.pop("optimizer"))
        saved_state.pop("config", None)
        state.update(saved_state)

    def checkpoint():
        if path:
            os.makedirs(checkpoint_dir, exist_ok=True)
            torch.save({**state, "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                        "config": asdict(config)}, path + ".tmp")
            os.replace(path + ".tmp", path)  # never leave a half-written checkpoint

    def end_of_epoch(masks, train_loss):
        """Validation, best-state bookkeeping; True when the phase should stop."""
        v = val(masks)
        state["history"].append({"phase": state["phase"], "epoch": state["epoch"], "sparsity": sparsity,
                                 "train_loss": train_loss, "val_loss": v})
        if v < state["best_val"]:
            state["best_val"], state["bad_epochs"] = v, 0
            state["best_student"] = {k: t.detach().clone() for k, t in student.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        return state["bad_epochs"] >= config.patience

    # Phase 1: distilled gradual pruning with simulated pruning
    while state["phase"] == "gradual":
        state["epoch"] += 1
        epoch = state["epoch"]
        sparsity = min(epoch / config.sparsity_epochs, 1.0) * config.sparsity
        losses, masks = [], None
        desc = f"DG2PF gradual {epoch} s={sparsity:.3f}"
        for b, batch in enumerate(_progress(train_batches, desc, progress)):
            if masks is None or b % config.mask_interval == 0:
                masks = magnitude_masks(params, sparsity, config.scope)
            losses.append(gradual_step(student, teacher, batch, forward, optimizer, params, masks, config))
        train_loss = _mean(losses)
        if epoch < config.sparsity_epochs:  # the ramp makes the pruned model worse: judge only once S is reached
            stop = False
            state["history"].append({"phase": "gradual", "epoch": epoch, "sparsity": sparsity,
                                     "train_loss": train_loss, "val_loss": None})
        else:
            stop = end_of_epoch(magnitude_masks(params, sparsity, config.scope), train_loss)
        if stop or epoch >= max(config.max_epochs, config.sparsity_epochs):
            if state["best_student"] is not None:
                student.load_state_dict(state["best_student"])
            state["final_mask"] = magnitude_masks(params, config.sparsity, config.scope)
            state.update(phase="finetune", epoch=0, bad_epochs=0, best_val_gradual=state["best_val"])
            _zero(params, state["final_mask"])
            optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            state["best_student"] = {k: t.detach().clone() for k, t in student.state_dict().items()}  # baseline
        checkpoint()

    # Phase 2: pruned fine-tuning with the fixed final mask
    masks = state["final_mask"]
    sparsity = config.sparsity
    while state["phase"] == "finetune":
        state["epoch"] += 1
        if state["epoch"] > config.finetune_max_epochs:
            stop = True
        else:
            losses = [finetune_step(student, batch, forward, optimizer, params, masks, config)
                      for batch in _progress(train_batches, f"DG2PF finetune {state['epoch']}", progress)]
            stop = end_of_epoch(masks, _mean(losses))
        if stop:
            student.load_state_dict(state["best_student"])
            _zero(params, masks)  # the final mask, permanently
            state["phase"] = "done"
        checkpoint()

    report = sparsity_report(student, tuple(config.exclude))
    report.update(history=state["history"], best_val_gradual=state["best_val_gradual"],
                  best_val_finetune=state["best_val"], config=asdict(config))
    return report
