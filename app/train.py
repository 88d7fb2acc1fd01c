"""Train the driving LLM on CPU: expert data -> tokenizer -> AdamW with a cosine schedule.

Deterministic given the seed (model init, data order, no dropout); resumable from out_dir/checkpoint
(model.safetensors + our own optimizer state, loaded with torch.load(weights_only=True) + state.json).
Writes out_dir/train_log.jsonl (loss every `log_every` steps) and the final model via save_pretrained.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from prunedrive.harness.progress import Ticker, duration, estimate, live_bars, say
from prunedrive.models import text
from prunedrive.models.data import Split, load_split
from prunedrive.app.dataset import build_dataset
from prunedrive.app.zoo import default_model_dir, install_shipped, is_trained
from prunedrive.harness.results import atomic_write_text
from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.presets import Preset, get_preset
from prunedrive.models.tokenizer import DrivingTokenizer


def tokenizer_corpus(split: Split) -> list[str]:
    """What the tokenizer is trained on: every prompt and every answer of the split."""
    return [text.prompt(k) for k in text.QUESTIONS] + [a for k in text.QUESTIONS for a in split.frame[f"a_{k}"]]


def untrained_model(preset: Preset, split: Split, seed: int = 0, vocab: int | None = None) -> DrivingLLM:
    """Random weights of `preset` with a tokenizer trained on `split` (tests and benchmarks without a model)."""
    tokenizer = DrivingTokenizer.train(tokenizer_corpus(split), vocab or preset.train.tokenizer_vocab)
    torch.manual_seed(seed)
    return DrivingLLM(preset.model_config(), tokenizer).eval()


# Measured with `small` on the idle 2-core machine (README): seconds per rollout episode of 150 steps at most, on
# the 2 rollout processes; the expert drives the data episodes, the model so far the DAgger ones.
IDLE_SECONDS_PER_EPISODE = {"expert": 2.2, "dagger": 3.2}


def rollout_estimate(kind: str, episodes: int, max_steps: int | None) -> str:
    """How long `episodes` rollouts will take (see harness.progress.estimate)."""
    scale = min((max_steps or 150) / 150, 1.0)
    return estimate(IDLE_SECONDS_PER_EPISODE[kind] * episodes * scale)


def ensure_data(data_dir: Path, preset: Preset, seed: int = 0, progress: bool = True) -> None:
    """Build the train and val splits of `preset` in data_dir unless they are already there."""
    d = preset.data
    for split, n in (("train", d.train_episodes), ("val", d.val_episodes)):
        if not (data_dir / f"{split}.parquet").is_file():
            if progress:
                say(f"expert data ({split}): the expert drives {n} episodes of suite {d.scenarios} "
                    f"({rollout_estimate('expert', n, d.max_steps)})")
            build_dataset(data_dir, n, seed=seed, split=split, noise=d.noise, scenarios=d.scenarios,
                          max_steps=d.max_steps, progress=progress)


class Batches:
    """Tokenised (row, question) items and their padded batches, in a seeded order per epoch."""

    def __init__(self, split, tokenizer: DrivingTokenizer, perception_fraction: float, seed: int):
        self.obs = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in split.obs.items()}
        self.n, self.tok, self.fraction, self.seed = len(split), tokenizer, perception_fraction, seed
        self.prompts = {k: tokenizer.encode(text.prompt(k)) for k in text.QUESTIONS}
        self.answers = {}
        for kind in text.QUESTIONS:
            column = split.frame[f"a_{kind}"].tolist()
            unique = sorted(set(column))
            ids = dict(zip(unique, (e.ids for e in tokenizer.tok.encode_batch(unique, add_special_tokens=False))))
            self.answers[kind] = [ids[a] for a in column]

    def epoch(self, e: int) -> list[tuple[int, str]]:
        rng = np.random.default_rng([self.seed, e])
        items = [(r, "action") for r in range(self.n)]
        chosen = np.flatnonzero(rng.random(self.n) < self.fraction)
        kinds = rng.integers(len(text.PERCEPTION_KINDS), size=len(chosen))
        items += [(int(r), text.PERCEPTION_KINDS[k]) for r, k in zip(chosen, kinds)]
        return [items[i] for i in rng.permutation(len(items))]

    def collate(self, items: list[tuple[int, str]]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for row, kind in items:
            p, a = self.prompts[kind], self.answers[kind][row] + [self.tok.eos_id]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))
        ids = torch.full((len(items), width), self.tok.pad_id, dtype=torch.long)
        lab = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)], lab[i, : len(l)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(l), 1
        rows = torch.tensor([r for r, _ in items])
        return {**{k: v[rows] for k, v in self.obs.items()}, "input_ids": ids, "attention_mask": mask, "labels": lab}

    def stream(self, batch_size: int, start_step: int = 0):
        """Batches for steps start_step, start_step + 1, ... (an epoch's tail shorter than a batch is dropped)."""
        step, e = 0, 0
        while True:
            items = self.epoch(e)
            for b in range(len(items) // batch_size):
                if step >= start_step:
                    yield self.collate(items[b * batch_size:(b + 1) * batch_size])
                step += 1
            e += 1


def concat(a: Split, b: Split) -> Split:
    import pandas as pd

    return Split({k: np.concatenate([a.obs[k], b.obs[k]]) for k in a.obs},
                 pd.concat([a.frame, b.frame], ignore_index=True))


def dagger_data(model: DrivingLLM, ckpt: Path, preset: Preset, seed: int, progress: bool) -> Split:
    """Let the current model drive new training episodes, labelled by the expert (cached in ckpt/dagger)."""
    r, d = preset.train, preset.data
    directory = ckpt / "dagger"
    if not (directory / "dagger.parquet").is_file():
        if progress:
            say(f"DAgger: the model so far drives {r.dagger_episodes} training episodes, the expert labels them "
                f"({rollout_estimate('dagger', r.dagger_episodes, d.max_steps)})")
        model.eval()
        model.save_pretrained(directory / "policy")
        model.train()
        build_dataset(directory, r.dagger_episodes, seed=seed, split="dagger", scenarios=d.scenarios,
                      max_steps=d.max_steps, progress=progress, policy_dir=directory / "policy", beta=r.dagger_beta)
    return load_split(directory, "dagger")


class FirstSteps:
    """Says how long training will take before it gets going: the time of the first MEASURED steps (after one
    warm-up step) times the steps left, plus the DAgger rollouts when they are still ahead."""

    MEASURED = 3

    def __init__(self, total: int, start: int, dagger_step: int | None, enabled: bool):
        self.total, self.start, self.dagger_step, self.enabled = total, start, dagger_step, enabled
        self.t0 = None

    def after(self, step: int) -> None:
        if not self.enabled:
            return
        if step == self.start + 1:  # the first step pays for allocations and thread start-up
            self.t0 = time.perf_counter()
        elif step == self.start + 1 + self.MEASURED and self.t0 is not None:
            per_step = (time.perf_counter() - self.t0) / self.MEASURED
            dagger = (f", plus the DAgger rollouts at step {self.dagger_step}"
                      if self.dagger_step is not None and step <= self.dagger_step else "")
            say(f"training: {self.total - self.start} steps, {per_step:.2f} s each so far -> about "
                f"{duration(per_step * (self.total - step))} to go{dagger}")


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _driving_llm_loss(model: DrivingLLM, batch: dict) -> torch.Tensor:
    logits, labels = model(batch)
    return model.loss(logits, labels)


def pick_threads(model: torch.nn.Module, batch: dict, candidates=(1, 2), loss_fn=_driving_llm_loss) -> int:
    """The faster torch thread count for a training step right now. On a 2-core machine shared with other
    busy processes, 2 threads can be ~10-100x slower than 1 (every parallel region waits for a core), so
    `threads="auto"` probes instead of trusting the core count. The probe's gradients are discarded.
    loss_fn(model, batch) -> scalar loss (default: the DrivingLLM's)."""
    times = {}
    for n in candidates:
        torch.set_num_threads(n)
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            loss_fn(model, batch).backward()
            best = min(best, time.perf_counter() - t)
            if times and best > 2 * min(times.values()):
                break  # clearly slower: do not pay for a second run
        times[n] = best
    model.zero_grad(set_to_none=True)
    choice = min(times, key=times.get)
    torch.set_num_threads(choice)
    return choice


def save_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer, state: dict) -> None:
    """Write step-N/ complete under a temporary name, rename it, then point `latest` at it: a kill at any
    moment leaves the previous checkpoint readable (a torn one is never pointed at)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:07d}"
    tmp = ckpt / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")  # our own file; reloaded with weights_only=True
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(ckpt / name, ignore_errors=True)
    os.replace(tmp, ckpt / name)
    atomic_write_text(ckpt / "latest", name)
    for old in ckpt.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_state(ckpt: Path) -> tuple[Path, dict] | None:
    """(directory, state) of the latest checkpoint, or None; an unreadable one is an error that says what to do."""
    pointer = ckpt / "latest"
    if not pointer.is_file():
        return None
    directory = ckpt / pointer.read_text().strip()
    try:
        return directory, json.loads((directory / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{directory}: unreadable training checkpoint ({exc}); "
                         "start over with `prunedrive train --no-resume`") from None


def optimizer_step(model, optimizer, loss) -> float:
    """One update with gradient clipping at norm 1; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def restore_checkpoint(directory: Path, model, optimizer, command: str) -> int:
    """Load a checkpoint written by `save_checkpoint` into `model` and `optimizer`; returns its step."""
    try:
        load_model(model, str(directory / "model.safetensors"))
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        return int(json.loads((directory / "state.json").read_text())["step"])
    except Exception as exc:  # noqa: BLE001 -- safetensors and torch raise several types for a torn file
        raise ValueError(f"{directory}: unreadable training checkpoint ({type(exc).__name__}: {exc}); "
                         f"start over with `{command} --no-resume`") from None


def restart_log(out_dir: Path, step: int) -> Path:
    """train_log.jsonl without what an interrupted run logged after its last checkpoint (those steps are redone)."""
    log_path = out_dir / "train_log.jsonl"
    kept = log_path.read_text().splitlines() if step and log_path.is_file() else []
    log_path.write_text("".join(line + "\n" for line in kept if json.loads(line)["step"] <= step))
    return log_path


def train(preset: str | Preset = "small", data_dir: str | Path | None = None, out_dir: str | Path | None = None,
          seed: int = 0, resume: bool = True, progress: bool = True, threads: int | str = 2) -> Path:
    """Train `preset` (data -> tokenizer -> model) and save the model in out_dir (default: the zoo dir).
    Returns out_dir.

    threads: torch CPU threads, fixed by default because the model depends on it: the float summation
    order changes with the thread count, and 1500 steps amplify a 1e-6 difference into a different driver.
    Bitwise reproducible for the same seed, thread count and CPU. "auto" probes 1 vs 2 at the start and at
    every checkpoint and takes the faster (see pick_threads): quicker on a busy machine, not reproducible."""
    if threads != "auto" and not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads must be a positive integer or 'auto', not {threads!r}")
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if out_dir is None:
        out_dir = default_model_dir(preset.name)
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2 if threads == "auto" else threads)
    start = time.time()
    ensure_data(data_dir, preset, seed=seed, progress=progress)
    data_seconds = time.time() - start
    split = load_split(data_dir, "train")
    state_rows = len(split)  # identifies the expert data a checkpoint was trained on

    tok_path = out_dir / "checkpoint" / "tokenizer.json"
    ckpt = out_dir / "checkpoint"
    latest = checkpoint_state(ckpt) if resume else None
    state = latest[1] if latest else None
    if not (resume and state and state["config_hash"] == preset.hash() and state["seed"] == seed
            and state["rows"] == state_rows and tok_path.is_file()):
        state = None
    if state:
        tokenizer = DrivingTokenizer.from_file(tok_path)
    else:
        shutil.rmtree(ckpt / "dagger", ignore_errors=True)  # rollouts of an older model
        tokenizer = DrivingTokenizer.train(tokenizer_corpus(split), preset.train.tokenizer_vocab)
        ckpt.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tok_path)

    torch.manual_seed(seed)
    model = DrivingLLM(preset.model_config(), tokenizer)
    r = preset.train
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "latents" not in n and "type_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "latents" not in n and "type_embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.98))
    step = restore_checkpoint(latest[0], model, optimizer, "prunedrive train") if state else 0
    log_path = restart_log(out_dir, step)

    dagger_step = int(r.dagger_at * r.steps) if r.dagger_episodes else None
    if dagger_step is not None and step > dagger_step:  # resuming after the DAgger rollouts
        split = concat(split, dagger_data(model, ckpt, preset, seed, progress))
    batches = Batches(split, tokenizer, r.perception_fraction, seed)
    stream = batches.stream(r.batch_size, start_step=step)
    model.train()
    thread_log = []
    if threads == "auto":
        thread_log.append((step, pick_threads(model, batches.collate(batches.epoch(0)[: r.batch_size]))))
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]train {task.fields[preset]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    train_start, running, dagger_seconds = time.time(), [], 0.0
    ticker = Ticker(f"train {preset.name}", r.steps, "steps", enabled=progress, done=step)
    first_steps = FirstSteps(r.steps, step, dagger_step, enabled=progress)
    with Progress(*columns, disable=not live_bars(progress), transient=True) as bar, log_path.open("a") as log:
        task = bar.add_task("train", total=r.steps, completed=step, preset=preset.name, loss=float("nan"))
        while step < r.steps:
            if step == dagger_step:
                save_checkpoint(ckpt, model, optimizer, {"step": step, "config_hash": preset.hash(), "seed": seed,
                                                          "rows": state_rows})
                dagger_start = time.time()
                split = concat(split, dagger_data(model, ckpt, preset, seed, progress))
                dagger_seconds += time.time() - dagger_start
                batches = Batches(split, tokenizer, r.perception_fraction, seed)
                stream = batches.stream(r.batch_size, start_step=step)
            lr = lr_at(step, r.steps, r.lr, r.warmup, r.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits, labels = model(next(stream))
            running.append(optimizer_step(model, optimizer, model.loss(logits, labels)))
            step += 1
            first_steps.after(step)
            if step % r.log_every == 0 or step == r.steps:
                record = {"step": step, "loss": float(np.mean(running)), "lr": lr,
                          "elapsed_s": round(time.time() - train_start, 1)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(task, completed=step, loss=record["loss"])
                ticker.update(step, f"loss {record['loss']:.3f}")
                running = []
            if step % r.checkpoint_every == 0 or step == r.steps:
                save_checkpoint(ckpt, model, optimizer, {"step": step, "config_hash": preset.hash(), "seed": seed,
                                                          "rows": state_rows})
                if threads == "auto" and step < r.steps:  # the machine's load may have changed
                    thread_log.append((step, pick_threads(model, batches.collate(batches.epoch(0)[: r.batch_size]))))
    model.eval()
    model.save_pretrained(out_dir)
    summary = {"preset": preset.name, "config_hash": preset.hash(), "seed": seed, "steps": r.steps,
               "train_rows": state_rows, "parameters": model.num_parameters(), "data_seconds": round(data_seconds, 1),
               "train_seconds": round(time.time() - train_start - dagger_seconds, 1),
               "dagger_seconds": round(dagger_seconds, 1), "dagger_rows": len(split) - state_rows,
               "total_seconds": round(time.time() - start, 1),
               "data_dir": str(Path(data_dir).resolve()), "threads": thread_log or threads}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return out_dir


def cmd_train(preset: str = "small", out_dir: str | Path | None = None, data_dir: str | Path | None = None,
              seed: int = 0, resume: bool = True, threads: int | str = 2) -> Path:
    """CLI entry (`prunedrive train`): train and print where the model went. Returns the model dir.
    (`--format text` is app/train_text.py's cmd_train_text.)"""
    out = train(preset, data_dir=data_dir, out_dir=out_dir, seed=seed, resume=resume, progress=True, threads=threads)
    summary = json.loads((out / "train_summary.json").read_text())
    print(f"trained {summary['preset']} ({summary['parameters']['total']:,} parameters) in "
          f"{summary['total_seconds']:.0f} s (data {summary['data_seconds']:.0f} s) -> {out}")
    return out


def ensure_default_model(preset: str = "small", progress: bool = True, say=say) -> Path:
    """The zoo directory of `preset`: when absent or stale, the model shipped with the package if it has the
    current recipe hash (app/zoo.py's install_shipped), else trained (data + training, resumable). `say` prints
    the line that says which (the text-format model: app/train_text.py's ensure_text_model)."""
    directory = default_model_dir(preset)
    if not is_trained(directory, preset):
        if install_shipped(preset, directory):
            say(f"using the shipped {directory.name} model (trained by `prunedrive train --preset {preset}`, "
                f"recipe hash {get_preset(preset).hash()}), copied into {directory}")
        else:
            train(preset, out_dir=directory, progress=progress)
    return directory
