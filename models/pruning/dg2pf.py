"""DG2PF (Fontana et al., IEEE Trans. AI 2024): distilled gradual pruning, then pruned fine-tuning.

Phase "gradual" (Algorithm 1): at epoch i (1-based) the target is min(i / s_e, 1) * S. On every batch,
simulated pruning: magnitude masks recomputed from the current weights, masked values saved and zeroed, forward
and backward, masked values restored, then the (clipped) AdamW step, so a pruned weight whose gradient pushes it
up can re-enter the kept set later. Loss (alpha * KL_T(teacher || student) + (1 - alpha) * CE) * T^2 against
the frozen unpruned teacher. From epoch s_e on (sparsity = S), continue while validation loss improves
(`patience` epochs without improvement end the phase).
Phase "finetune" (Algorithm 2): final mask fixed from the best gradual weights, task loss (CE) only,
gradients and values of pruned weights held at zero, until validation stops improving. The final mask is
then applied permanently.

Ablations (DG2PFConfig): `distill=False` trains phase 1 on the task loss alone (plain CE, no teacher, no T^2);
`gradual=False` skips phase 1: one-shot magnitude pruning to S of the starting weights, then phase 2 (pruned
fine-tuning) alone. `dg2pf_prune(..., fixed_mask=...)` fine-tunes an already pruned model (e.g. Wanda's) with
phase 2 under its own mask: the same training budget without the method, to separate the two.
Parts: `targets={"encoder": 0.3, "lm": 0.5}` gives every part (layers whose name starts with the prefix) its own
target and its own |W| threshold (scope "global" = one per part), instead of one threshold across parts of very
different weight scales; the report has each part's sparsity.

Data: `train_batches` is re-iterable (the same batches every epoch) or a callable `epoch -> batches` (fresh data
every epoch; the epoch index counts both phases, 0-based, so a resumed run sees the same data).

Loss positions: the caller's `forward(model, batch) -> (logits, labels)` returns aligned logits [..., V]
and labels [...] with -100 where no loss is wanted (for the driving LLM: everything but the answer tokens).
Validation: CE of the masked student on `val_batches` (lower is better), or `evaluate(student)`.

The authors' public code (rom42pla/dg2pf, disprunq.py) is an earlier variant: one-shot global pruning of the
central signed-percentile band of all parameters (the "weight"-only filter is commented out, so biases and
norm parameters are pruned too), pruned values frozen at zero, no simulated pruning, KL with
`reduction="batchmean"` (summed over classes, averaged over the batch), AdamW lr 1e-5 with weight_decay 0, a
plateau patience of 4 and grad-norm clipping 0.5. Here we follow the paper's algorithms. Our KL is the same
batchmean: summed over the vocabulary, averaged over the selected (answer) positions, each position being one
"sample". CE is multiplied by T^2 too, as the paper's formula (and the code) says. Only nn.Linear weights are
pruned (lm_head excluded), by |W|; biases, norms and embeddings are not. lr 1e-5 and clip 0.5 are the defaults;
patience defaults to 2 (one bad epoch on a small validation set is noise). Weight decay: AdamW's decoupled decay
(`weight_decay`, default 0.01, torch's default; the reference uses 0) is applied to every parameter on every
step: in phase 1 it also shrinks the restored values of currently pruned weights (making re-entry a little
harder); in phase 2 pruned weights are exactly zero, so decay cannot move them. Masks can be recomputed every
`mask_interval` batches (1 = paper, the default) because a global top-k over a 7B-parameter model on every batch
is costly; the best state is kept in memory (and in the checkpoint). Resuming restores student, optimizer, phase,
epoch, best state and history, not RNG state.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunedrive.harness.progress import Ticker, live_bars
from prunedrive.models.pruning.masks import EXCLUDE, find_linears, sparsity_report, unstructured_mask

Forward = Callable[[nn.Module, object], tuple[torch.Tensor, torch.Tensor]]
CHECKPOINT = "dg2pf_state.pt"


@dataclass
class DG2PFConfig:
    sparsity: float = 0.5  # target S
    sparsity_epochs: int = 10  # s_e: epochs to reach S
    scope: str = "global"  # "global": one |W| threshold over all pruned layers (of a part); "layer": one per layer
    temperature: float = 4.0
    alpha: float = 0.75
    lr: float = 1e-5
    weight_decay: float = 0.01  # AdamW's decoupled decay, every parameter (see the module docstring)
    patience: int = 2  # epochs without validation improvement before a phase ends
    max_epochs: int = 30  # cap on phase-1 epochs (including the s_e ramp)
    finetune_max_epochs: int = 20
    grad_clip: float = 0.5
    mask_interval: int = 1  # batches between mask recomputations in phase 1 (1: every batch, the paper)
    exclude: tuple[str, ...] = EXCLUDE
    distill: bool = True  # False: ablation without distillation (phase 1 on the task loss only)
    gradual: bool = True  # False: ablation without the ramp (one-shot magnitude to S, then phase 2 only)
    targets: dict | None = None  # {name prefix: target sparsity}: one target and threshold per part; None: one
    # Data budget, read by the caller that builds the batches (app.prune_driving), not by dg2pf_prune:
    batch_size: int = 16
    train_batches: int = 24  # per epoch, drawn fresh every epoch
    val_batches: int = 24  # fixed validation set


def part_of(name: str, prefixes) -> str | None:
    """The first prefix that `name` is, or starts with followed by a dot."""
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def part_masks(params: dict[str, torch.Tensor], targets: dict[str, float], fraction: float = 1.0,
               scope: str = "global") -> dict:
    """Masks with one target per part: layers under prefix p get `fraction * targets[p]`, thresholded within
    the part (`scope` global) or per layer. Every layer must belong to a part."""
    groups: dict[str, dict] = {p: {} for p in targets}
    for n, p in params.items():
        part = part_of(n, targets)
        if part is None:
            raise ValueError(f"DG2PF: layer {n} is in none of the target parts {sorted(targets)}")
        groups[part][n] = p
    masks = {}
    for part, group in groups.items():
        if group:
            masks.update(magnitude_masks(group, fraction * targets[part], scope))
    return {n: masks[n] for n in params}


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
    """One simulated-pruning step with the given masks; returns the loss (None if no selected positions).
    Without distillation (`config.distill` False) the teacher is not run and the loss is the plain task CE."""
    if config.distill:
        with torch.no_grad():
            teacher_logits, _ = forward(teacher, batch)
    saved = _zero(params, masks)
    logits, labels = forward(student, batch)
    if not (labels != -100).any():
        _restore(params, masks, saved)
        return None
    if config.distill:
        loss = distillation_loss(logits, teacher_logits, labels, config.temperature, config.alpha)
    else:
        loss = task_loss(logits, labels)
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
    if not live_bars(enabled):
        yield from iterable
        return
    try:
        from rich.progress import track
    except ImportError:
        yield from iterable
        return
    total = len(iterable) if hasattr(iterable, "__len__") else None
    yield from track(iterable, description=description, total=total, transient=True)


def dg2pf_prune(student: nn.Module, teacher: nn.Module | None, train_batches, val_batches: Iterable,
                forward: Forward, config: DG2PFConfig | None = None, checkpoint_dir: str | None = None,
                progress: bool = True, evaluate: Callable[[nn.Module], float] | None = None,
                fixed_mask: dict[str, torch.Tensor] | None = None) -> dict:
    """Prune `student` in place (teacher: the unpruned model, frozen; unused, and may be None, without
    distillation or without phase 1). `train_batches`: re-iterable batches, or `epoch -> batches` for fresh data
    every epoch; `val_batches` re-iterable. `fixed_mask` ({layer name: bool mask}, e.g. the zeros a one-shot method
    left): skip phase 1 and fine-tune (phase 2) under that mask. Returns `sparsity_report(student)` plus history,
    best validation losses, per-part sparsities, epochs and steps trained, and the config."""
    config = config or DG2PFConfig()
    if not (0 <= config.sparsity < 1 and config.sparsity_epochs >= 1 and config.patience >= 1
            and config.mask_interval >= 1):
        raise ValueError(f"bad DG2PF config: {config}")
    targets = dict(config.targets) if config.targets else None
    if targets and not all(0 <= t < 1 for t in targets.values()):
        raise ValueError(f"DG2PF targets must be in [0, 1): {targets}")
    params = {n: lin.weight for n, lin in find_linears(student, tuple(config.exclude)).items()}
    if fixed_mask is not None:
        missing = set(params) - set(fixed_mask)
        if missing:
            raise ValueError(f"fixed_mask lacks {sorted(missing)[:3]}")
        fixed_mask = {n: fixed_mask[n].to(torch.bool) for n in params}
    needs_teacher = config.distill and config.gradual and fixed_mask is None
    if needs_teacher and teacher is None:
        raise ValueError("DG2PF with distillation needs the teacher (the unpruned model)")
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student.train()

    def masks_at(fraction: float) -> dict:
        if targets:
            return part_masks(params, targets, fraction, config.scope)
        return magnitude_masks(params, fraction * config.sparsity, config.scope)

    def epoch_batches():
        data_epoch = len(state["history"])  # one history entry per trained epoch, both phases
        return train_batches(data_epoch) if callable(train_batches) else train_batches

    def val(masks):
        if evaluate is None:
            return validation_loss(student, val_batches, forward, params, masks)
        saved = _zero(params, masks)
        try:
            return float(evaluate(student))
        finally:
            _restore(params, masks, saved)

    state = {"phase": "gradual", "epoch": 0, "best_val": math.inf, "bad_epochs": 0, "history": [],
             "best_student": None, "final_mask": None, "best_val_gradual": None, "steps": 0,
             "val_before_finetune": None}
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

    def start_finetune(final_mask):
        nonlocal optimizer
        state["final_mask"] = final_mask
        state.update(phase="finetune", epoch=0, bad_epochs=0, best_val_gradual=state["best_val"], best_val=math.inf)
        _zero(params, final_mask)
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        state["best_student"] = {k: t.detach().clone() for k, t in student.state_dict().items()}  # baseline
        state["best_val"] = state["val_before_finetune"] = val(final_mask)  # fine-tuning must beat the pruned model

    if state["phase"] == "gradual" and (fixed_mask is not None or not config.gradual):
        start_finetune(fixed_mask if fixed_mask is not None else masks_at(1.0))  # no ramp: one-shot to S
        state["best_val_gradual"] = None
        checkpoint()

    # Plain lines for a log: epochs trained of the most the phases allow (early stopping usually ends sooner).
    one_shot = fixed_mask is not None or not config.gradual
    most_epochs = (0 if one_shot else max(config.max_epochs, config.sparsity_epochs)) + config.finetune_max_epochs
    ticker = Ticker(f"DG2PF to sparsity {config.sparsity:g}", most_epochs, "epochs at most", enabled=progress,
                    done=len(state["history"]), eta_bound=True)

    def epoch_done():
        last = state["history"][-1]
        val_loss = "" if last["val_loss"] is None else f", val loss {last['val_loss']:.3f}"
        ticker.update(len(state["history"]), f"{last['phase']} epoch {last['epoch']}, sparsity {last['sparsity']:.3f}"
                      f"{val_loss}")

    # Phase 1: distilled gradual pruning with simulated pruning
    while state["phase"] == "gradual":
        state["epoch"] += 1
        epoch = state["epoch"]
        fraction = min(epoch / config.sparsity_epochs, 1.0)
        sparsity = fraction * config.sparsity
        losses, masks = [], None
        desc = f"DG2PF gradual {epoch} s={sparsity:.3f}"
        for b, batch in enumerate(_progress(epoch_batches(), desc, progress)):
            if masks is None or b % config.mask_interval == 0:
                masks = masks_at(fraction)  # from the current weights: recomputed every batch (mask_interval 1)
            losses.append(gradual_step(student, teacher, batch, forward, optimizer, params, masks, config))
            state["steps"] += 1
        train_loss = _mean(losses)
        if epoch < config.sparsity_epochs:  # the ramp makes the pruned model worse: judge only once S is reached
            stop = False
            state["history"].append({"phase": "gradual", "epoch": epoch, "sparsity": sparsity,
                                     "train_loss": train_loss, "val_loss": None})
        else:
            stop = end_of_epoch(masks_at(fraction), train_loss)
        epoch_done()
        if stop or epoch >= max(config.max_epochs, config.sparsity_epochs):
            if state["best_student"] is not None:
                student.load_state_dict(state["best_student"])
            start_finetune(masks_at(1.0))
        checkpoint()

    # Phase 2: pruned fine-tuning with the fixed final mask
    masks = state["final_mask"]
    sparsity = config.sparsity
    while state["phase"] == "finetune":
        state["epoch"] += 1
        if state["epoch"] > config.finetune_max_epochs:
            stop = True
        else:
            losses = []
            for batch in _progress(epoch_batches(), f"DG2PF finetune {state['epoch']}", progress):
                losses.append(finetune_step(student, batch, forward, optimizer, params, masks, config))
                state["steps"] += 1
            stop = end_of_epoch(masks, _mean(losses))
            epoch_done()
        if stop:
            student.load_state_dict(state["best_student"])
            _zero(params, masks)  # the final mask, permanently
            state["phase"] = "done"
        checkpoint()

    ticker.finish(f"{len(state['history'])} epochs")
    report = sparsity_report(student, tuple(config.exclude))
    report.update(history=state["history"], best_val_gradual=state["best_val_gradual"],
                  best_val_finetune=state["best_val"], config=asdict(config), train_steps=state["steps"],
                  val_before_finetune=state["val_before_finetune"],
                  epochs={"gradual": sum(h["phase"] == "gradual" for h in state["history"]),
                          "finetune": sum(h["phase"] == "finetune" for h in state["history"])},
                  parts=part_sparsities(student, targets or {}, tuple(config.exclude)))
    return report


@torch.no_grad()
def part_sparsities(model: nn.Module, targets: dict, exclude=EXCLUDE) -> dict[str, float]:
    """Sparsity of each part's pruned layers (empty without parts)."""
    out = {}
    linears = find_linears(model, tuple(exclude))
    for part in targets:
        ws = [m.weight for n, m in linears.items() if part_of(n, [part])]
        out[part] = sum(int((w == 0).sum()) for w in ws) / max(sum(w.numel() for w in ws), 1)
    return out
