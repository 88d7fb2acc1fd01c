"""Train a plain Hugging Face causal LM to drive from the scene text: `prunedrive train --format text`.

The second built-in model family. Same expert data as the vector model (app/dataset.py rows, the preset's data
recipe), rendered as text: the prompt is exactly what agents/text_llm.py sends (models.hf_causal.prompt_ids:
models.scene_text's rendering of the observation + the action question, through the tokenizer's chat template
when it has one; ours has none, so a plain prompt ending in "Answer:" after a BOS), the target is the row's
action answer (`a_action`, read back by models.text.parse_action) followed by EOS. The loss is on the answer
tokens only (prompt and padding are -100).

From scratch (default): a `LlamaForCausalLM` with the preset's LM sizes (hidden size, layers, heads, intermediate
size: `tiny`/`small`/`base` are the same scale as the vector model's language model) and a byte-level BPE
trained with `tokenizers` on the rendered prompts and answers (digit runs isolated, as models/tokenizer.py),
wrapped as a `PreTrainedTokenizerFast` with <s>/</s>/<pad> that puts <s> in front of every encoded text.
`--init DIR` fine-tunes a local causal LM checkpoint (any architecture models.hf_causal.load_causal_lm loads) with
its own tokenizer instead.

The output is a standard model directory (config.json, model.safetensors, generation_config.json, tokenizer
files) that AutoModelForCausalLM.from_pretrained loads, `prunedrive run --agent text-llm --model DIR` drives and
`prunedrive prune` prunes, plus train_summary.json ({"prunedrive_format": "text", preset, data_dir, steps, ...}),
train_log.jsonl and checkpoint/ (resumable, atomic: app/train.py's helpers). Deterministic for the same seed,
thread count and CPU: seeded init and data order, and torch's generator re-seeded every step (dropout in an
--init model stays reproducible across a resume).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from prunedrive.harness.progress import Ticker, live_bars
from prunedrive.app.train import (FirstSteps, checkpoint_state, ensure_data, lr_at, optimizer_step, pick_threads,
                                  restart_log, restore_checkpoint, save_checkpoint)
from prunedrive.app.zoo import TEXT_MARKER, default_model_dir, is_trained
from prunedrive.harness.results import atomic_write_text
from prunedrive.models import scene_text
from prunedrive.models.data import Split, load_split
from prunedrive.models.hf_causal import answer_ids, prompt_ids
from prunedrive.models.presets import Preset, get_preset

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
DECODE_ROOM = 48  # tokens the text agent may generate after the prompt (TextLLMAgent's default max_new_tokens)
TOKENIZER_DIR = "tokenizer"  # under checkpoint/


# -- tokenizer ---------------------------------------------------------------------------------------------------
def tokenizer_corpus(split: Split) -> list[str]:
    """What the text tokenizer is trained on: every row's rendered prompt and every distinct answer."""
    prompts = [scene_text.action_prompt(split.observation(i)) for i in range(len(split))]
    return prompts + sorted(set(split.frame["a_action"]))


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts` as a transformers PreTrainedTokenizerFast: <pad>=0, <s>=1, </s>=2,
    <s> prepended to every encoded text (add_special_tokens=True), digit runs kept apart from words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    numbers = [" ".join(str(n) for n in range(501))] * 50  # whole tokens for numbers the corpus lacks
    tok.train_from_iterator([*texts, *numbers], trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1_000_000)


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _save_tokenizer(tokenizer, directory: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: a kill leaves the old one or none, never half."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


# -- sequences ---------------------------------------------------------------------------------------------------
def pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


class TextBatches:
    """Per row: prompt ids (exactly the text agent's) and answer ids + EOS; padded batches in a seeded order."""

    def __init__(self, split: Split, tokenizer, seed: int):
        self.n, self.seed, self.pad = len(split), seed, pad_id(tokenizer)
        self.prompts = [prompt_ids(tokenizer, split.observation(i)) for i in range(self.n)]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        column = [str(a) for a in split.frame["a_action"]]
        ids = {a: answer_ids(tokenizer, a) + eos for a in sorted(set(column))}
        self.answers = [ids[a] for a in column]

    def longest(self) -> int:
        return max(len(p) + len(a) for p, a in zip(self.prompts, self.answers))

    def prompt_lengths(self) -> dict:
        lengths = [len(p) for p in self.prompts]
        return {"mean": round(float(np.mean(lengths)), 1), "max": int(max(lengths)),
                "answer_mean": round(float(np.mean([len(a) for a in self.answers])), 1)}

    def collate(self, rows) -> dict[str, torch.Tensor]:
        width = max(len(self.prompts[r]) + len(self.answers[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            p, a = self.prompts[r], self.answers[r]
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            mask[i, :len(p) + len(a)] = 1
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def stream(self, batch_size: int, start_step: int = 0):
        """Batches for steps start_step, start_step + 1, ...: each epoch a seeded permutation of the rows, its
        tail shorter than a batch dropped (same scheme as app/train.py's Batches)."""
        step, e = 0, 0
        while True:
            order = np.random.default_rng([self.seed, e]).permutation(self.n)
            for b in range(self.n // batch_size):
                if step >= start_step:
                    yield self.collate(order[b * batch_size:(b + 1) * batch_size].tolist())
                step += 1
            e += 1


def text_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (transformers shifts the labels)."""
    return model(**batch).loss


# -- models ------------------------------------------------------------------------------------------------------
def llama_for(preset: Preset, tokenizer, seed: int):
    """A fresh LlamaForCausalLM of the preset's LM sizes (tied embeddings, as the vector model's LM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = preset.text_lm()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=lm["hidden_size"],
                         intermediate_size=lm["intermediate_size"], num_hidden_layers=lm["num_layers"],
                         num_attention_heads=lm["num_heads"], num_key_value_heads=lm["num_heads"],
                         max_position_embeddings=preset.text_train.max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _init_fingerprint(init: Path) -> str:
    """Identifies an --init checkpoint cheaply: its config.json and the names and sizes of its weight files."""
    parts = [(init / "config.json").read_text()]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(init.glob("*.safetensors*"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def _save_model(model, out_dir: Path, progress: bool) -> None:
    """save_pretrained (safetensors), without transformers' "Writing model shards" bar unless progress."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out_dir))  # model.safetensors
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _max_positions(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _default_data_dir(preset: Preset, out_dir: Path) -> Path:
    """The vector model's zoo data when it is already there (same preset -> same data recipe, same rows),
    else <out_dir>/data (built)."""
    vector = default_model_dir(preset.name) / "data"
    if all((vector / f"{s}.parquet").is_file() for s in ("train", "val")):
        return vector
    return out_dir / "data"


# -- training ----------------------------------------------------------------------------------------------------
def train_text(preset: str | Preset = "small", data_dir: str | Path | None = None, out_dir: str | Path | None = None,
               seed: int = 0, resume: bool = True, progress: bool = True, threads: int | str = 2,
               init: str | Path | None = None) -> Path:
    """Train the text-format model of `preset` (or fine-tune `init`) and save it in out_dir (default: the zoo's
    text-<preset>-<hash>; --init needs an explicit out_dir). Returns out_dir. `threads` as app.train.train."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from prunedrive.models.hf_causal import load_causal_lm, load_tokenizer

    if threads != "auto" and not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads must be a positive integer or 'auto', not {threads!r}")
    preset = get_preset(preset) if isinstance(preset, str) else preset
    init = Path(init).expanduser() if init is not None else None
    if init is not None:
        load_tokenizer(init)  # checks the directory first: a clear error before any data is built
        if out_dir is None:
            raise ValueError("--init DIR needs --model-out: a fine-tuned checkpoint has no zoo name")
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir(preset.name, "text")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_summary.json").unlink(missing_ok=True)  # written last: its presence means finished
    data_dir = Path(data_dir) if data_dir is not None else _default_data_dir(preset, out_dir)
    torch.set_num_threads(2 if threads == "auto" else threads)
    r = preset.text_train
    start = time.time()
    ensure_data(data_dir, preset, seed=seed, progress=progress)
    data_seconds = time.time() - start
    split = load_split(data_dir, "train")
    rows = len(split)
    if rows == 0:
        raise ValueError(f"{data_dir}/train.parquet has no rows")
    key = preset.text_hash() + (f"-init-{_init_fingerprint(init)}" if init is not None else "")

    ckpt = out_dir / "checkpoint"
    tok_dir = ckpt / TOKENIZER_DIR
    latest = checkpoint_state(ckpt) if resume else None
    state = latest[1] if latest else None
    if not (resume and state and state.get("config_hash") == key and state.get("seed") == seed
            and state.get("rows") == rows and state.get("init") == (str(init.resolve()) if init else None)
            and (init is not None or (tok_dir / "tokenizer.json").is_file())):
        state = None
    if init is not None:
        model, tokenizer = load_causal_lm(init, dtype="float32")
        torch.manual_seed(seed)
    elif state:
        tokenizer = _load_tokenizer(tok_dir)
        model = llama_for(preset, tokenizer, seed)
    else:
        tokenizer = train_tokenizer(tokenizer_corpus(split), r.tokenizer_vocab)
        ckpt.mkdir(parents=True, exist_ok=True)
        _save_tokenizer(tokenizer, tok_dir)
        tokenizer = _load_tokenizer(tok_dir)  # train on exactly what the saved directory gives back
        model = llama_for(preset, tokenizer, seed)
    model.float()
    batches = TextBatches(split, tokenizer, seed)
    limit = _max_positions(model)
    if limit and batches.longest() + DECODE_ROOM > limit:
        raise ValueError(f"the longest scene-text sequence has {batches.longest()} tokens, plus {DECODE_ROOM} to "
                         f"decode that exceeds the model's {limit} positions")
    batch_size = min(r.batch_size, rows)
    base_lr = r.finetune_lr if init is not None else r.lr
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=base_lr, betas=(0.9, 0.98))
    step = restore_checkpoint(latest[0], model, optimizer, "prunedrive train --format text") if state else 0
    log_path = restart_log(out_dir, step)

    def checkpoint() -> None:
        save_checkpoint(ckpt, model, optimizer, {"step": step, "config_hash": key, "seed": seed, "rows": rows,
                                                  "init": str(init.resolve()) if init else None})

    stream = batches.stream(batch_size, start_step=step)
    model.train()
    thread_log = []
    if threads == "auto":
        thread_log.append((step, pick_threads(model, batches.collate(list(range(batch_size))), loss_fn=text_loss)))
    columns = [TextColumn("[bold]train text {task.fields[preset]}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TextColumn("loss {task.fields[loss]:.3f}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    logged = [json.loads(line)["loss"] for line in log_path.read_text().splitlines()]  # kept by restart_log
    train_start, running, last_loss = time.time(), [], (logged[-1] if logged else float("nan"))
    ticker = Ticker(f"train text {preset.name}", r.steps, "steps", enabled=progress, done=step)
    first_steps = FirstSteps(r.steps, step, None, enabled=progress)
    with Progress(*columns, disable=not live_bars(progress), transient=True) as bar, log_path.open("a") as log:
        task = bar.add_task("train", total=r.steps, completed=step, preset=preset.name, loss=float("nan"))
        while step < r.steps:
            lr = lr_at(step, r.steps, base_lr, r.warmup, r.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(seed * 1_000_003 + step)  # dropout (an --init model's) is the same on a resume
            running.append(optimizer_step(model, optimizer, text_loss(model, next(stream))))
            step += 1
            first_steps.after(step)
            if step % r.log_every == 0 or step == r.steps:
                last_loss = float(np.mean(running))
                record = {"step": step, "loss": last_loss, "lr": lr, "elapsed_s": round(time.time() - train_start, 1)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(task, completed=step, loss=last_loss)
                ticker.update(step, f"loss {last_loss:.3f}")
                running = []
            if step % r.checkpoint_every == 0 or step == r.steps:
                checkpoint()
                if threads == "auto" and step < r.steps:
                    thread_log.append((step, pick_threads(model, batches.collate(list(range(batch_size))),
                                                          loss_fn=text_loss)))
    if not step:  # steps == 0: still a loadable model
        checkpoint()
    model.eval()
    _save_model(model, out_dir, progress)
    tokenizer.save_pretrained(str(out_dir))
    unique = {id(p): p for p in model.parameters()}.values()
    summary = {TEXT_MARKER: "text", "format": "text", "preset": preset.name, "config_hash": preset.text_hash(),
               "init": str(init.resolve()) if init is not None else None, "model_type": model.config.model_type,
               "seed": seed, "steps": r.steps, "batch_size": batch_size, "lr": base_lr, "train_rows": rows,
               "parameters": sum(p.numel() for p in unique), "vocab": len(tokenizer),
               "scene_text_version": scene_text.SCENE_TEXT_VERSION, "tokens": batches.prompt_lengths(),
               "final_loss": last_loss, "data_seconds": round(data_seconds, 1),
               "train_seconds": round(time.time() - train_start, 1), "total_seconds": round(time.time() - start, 1),
               "data_dir": str(Path(data_dir).resolve()), "threads": thread_log or threads}
    atomic_write_text(out_dir / "train_summary.json", json.dumps(summary, indent=2))  # last: marks it finished
    return out_dir


def cmd_train_text(preset: str = "small", out_dir: str | Path | None = None, data_dir: str | Path | None = None,
                   seed: int = 0, resume: bool = True, threads: int | str = 2, init: str | Path | None = None) -> Path:
    """CLI entry (`prunedrive train --format text`): train and print where the model went."""
    out = train_text(preset, data_dir=data_dir, out_dir=out_dir, seed=seed, resume=resume, progress=True,
                     threads=threads, init=init)
    summary = json.loads((out / "train_summary.json").read_text())
    what = f"fine-tuned {summary['init']}" if summary["init"] else f"trained text {summary['preset']}"
    print(f"{what} ({summary['model_type']}, {summary['parameters']:,} parameters) in {summary['total_seconds']:.0f} s "
          f"(data {summary['data_seconds']:.0f} s), final loss {summary['final_loss']:.3f} -> {out}")
    return out


def ensure_text_model(preset: str = "small", progress: bool = True) -> Path:
    """The zoo directory text-<preset>-<hash>, training it (data + training, resumable) when absent or stale."""
    directory = default_model_dir(preset, "text")
    if not is_trained(directory, preset, "text"):
        train_text(preset, out_dir=directory, progress=progress)
    return directory
