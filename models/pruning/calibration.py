"""Calibration data and the block-by-block machinery shared by Wanda, SparseGPT and OWL.

Block offload (`block_offload(device)`): for a model larger than the device's memory, the model stays where it is
(the CPU) and the sequential replay moves one decoder block at a time to the device, with the cached calibration
inputs (hidden states and the block's keywords) kept on the device, as the Wanda and SparseGPT reference code do.
The layers before block 0 (embeddings, rotary tables) run where the model is. The same code runs with the device
"cpu" (a no-op move), which is how the CPU tests check that offloading prunes exactly as in-memory pruning.

A calibration set is a list of LM forward-kwarg dicts, one sequence each:
`{"inputs_embeds": FloatTensor[1, T, H] | "input_ids": LongTensor[1, T], "attention_mask": LongTensor[1, T]}`.
Samples are assumed unpadded (batch 1): padded tokens would be counted in the input statistics.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn

from prunedrive.models.pruning.masks import decoder_layers, find_linears

FORWARD_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")


_OFFLOAD: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("block_offload", default=None)


@contextlib.contextmanager
def block_offload(device: str | torch.device | None):
    """Within it, capture_block_inputs leaves the block inputs on `device` and sequential_blocks / run_block move
    each decoder block there while they use it, and back after (None: no offload)."""
    token = _OFFLOAD.set(torch.device(device) if device is not None else None)
    try:
        yield
    finally:
        _OFFLOAD.reset(token)


def offload_device() -> torch.device | None:
    return _OFFLOAD.get()


def to_device(value, device: torch.device):
    """Tensors inside `value` (tuples, lists, dicts of them; anything else as is) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@contextlib.contextmanager
def on_offload_device(block: nn.Module):
    """The block on the offload device for the duration (moved back to where it was after); nothing without an
    offload. The moves run even where the block is there already (device "cpu"): one code path to test."""
    device = _OFFLOAD.get()
    if device is None:
        yield block
        return
    home = next(block.parameters(), torch.empty(0)).device
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


class _StopForward(Exception):
    """Raised by the layer-0 hook: nothing past the first block needs computing."""


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def capture_block_inputs(lm: nn.Module, calibration: list[dict]) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the LM up to decoder block 0 and record, per sample, the hidden states and every keyword the
    block receives (position_embeddings, attention_mask, position_ids, cache_position, ...), so blocks can
    later be replayed one at a time whatever the transformers version passes them."""
    layers = decoder_layers(lm)
    device = next(lm.parameters()).device
    hidden, kwargs = [], []

    def catch(module, args, kw):
        kw = _as_keywords(module, args, kw)
        hidden.append(kw.pop(next(iter(kw))).detach())  # the first argument: the hidden states
        kwargs.append(kw)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with eval_mode(lm):
            for sample in calibration:
                inputs = {k: v.to(device) for k, v in sample.items() if k in FORWARD_KEYS}
                with contextlib.suppress(_StopForward):
                    _forward_within_context(lm, inputs, sample_length(sample))
    finally:
        handle.remove()
    if not hidden:
        raise ValueError("empty calibration set")
    if _OFFLOAD.get() is not None:  # the cached inputs live on the device the blocks visit
        hidden, kwargs = to_device(hidden, _OFFLOAD.get()), to_device(kwargs, _OFFLOAD.get())
    return hidden, kwargs


# Config fields that bound a causal LM's positions, by family (Llama/OPT/most: max_position_embeddings; GPT-2
# and GPT-J: n_positions; older GPT-2 configs: n_ctx).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")


def context_length(lm: nn.Module) -> int | None:
    """How many positions `lm` takes (from its config), or None when its config sets no bound."""
    config = getattr(lm, "config", None)
    for field in CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_to_context(samples: list[dict], limit: int | None) -> tuple[list[dict], int]:
    """(samples cut to their first `limit` positions, how many were cut). A longer sequence would index past
    the model's position table (learned positions: IndexError) or use positions it was never trained on."""
    if limit is None:
        return samples, 0
    out, cut = [], 0
    for sample in samples:
        if sample_length(sample) > limit:
            sample = {k: v[:, :limit] if k in FORWARD_KEYS else v for k, v in sample.items()}
            cut += 1
        out.append(sample)
    return out, cut


def _forward_within_context(lm: nn.Module, inputs: dict, length: int) -> None:
    """lm(**inputs), with a clear error where a sample runs past a learned position table (GPT-2, OPT: an
    IndexError naming nothing). Rotary models take any length, so nothing is refused in advance."""
    try:
        lm(**inputs, use_cache=False)
    except IndexError as exc:
        limit = context_length(lm)
        if limit is None or length <= limit:
            raise
        raise ValueError(f"a calibration sample has {length} positions; {type(lm).__name__} takes {limit} "
                         "(cut the samples with models.pruning.calibration.fit_to_context)") from exc


def _as_keywords(module: nn.Module, args: tuple, kw: dict) -> dict:
    """Every argument of a block call by name, in signature order (GPT-2's blocks get the cache and the mask
    positionally; replaying them by name works whatever the order)."""
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kw)
    except (TypeError, ValueError):  # an exotic signature: keep the old convention
        kw = dict(kw)
        return {"hidden_states": args[0], **kw} if args else kw
    out = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(f"{type(module).__name__}.forward takes *{name}: cannot replay it by keyword")
        else:
            out[name] = value
    return out


def _output(out):
    return out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...)


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """One decoder block on the stored inputs; returns its outputs (the next block's inputs). Under block_offload
    the block visits the device for the call."""
    with on_offload_device(block), eval_mode(block):
        return [_output(block(h, **kw)) for h, kw in zip(hidden, kwargs)]


@torch.no_grad()
def feed_linears(run: Callable[[], object], linears: dict[str, nn.Linear], add: Callable[[str, torch.Tensor], None],
                 rows: dict[str, torch.Tensor] | None = None):
    """Call `run()` with hooks that hand each linear's input, flattened to [tokens, in_features] in fp32,
    to `add(name, x)`. `rows` (optional, {name: bool [tokens]}): keep only those rows of that linear's input
    (validity masks: padded object slots must not enter any statistic); each linear must then be called once."""
    def hook(name):
        def add_rows(_m, inp, _out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            if rows is not None and name in rows:
                keep = rows[name].reshape(-1).to(x.device)
                if keep.shape[0] != x.shape[0]:
                    raise ValueError(f"{name}: {keep.shape[0]} row flags for {x.shape[0]} input rows")
                x = x[keep]
            add(name, x)
        return add_rows

    handles = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


def sequential_blocks(lm: nn.Module, calibration: list[dict], make_stats: Callable[[nn.Linear], object]) -> Iterator:
    """Yield (block index, linears, stats) per decoder block, stats gathered on the block's current inputs.

    The caller prunes the block before asking for the next one; the block is then re-run, so the
    *pruned* outputs become the next block's calibration inputs (sequential, as Wanda/SparseGPT/OWL do).
    Under block_offload the block stays on the device from its statistics through its pruning to its replay.
    """
    hidden, kwargs = capture_block_inputs(lm, calibration)
    for i, block in enumerate(decoder_layers(lm)):
        with on_offload_device(block):
            linears = find_linears(block)
            stats = {name: make_stats(lin) for name, lin in linears.items()}
            feed_linears(lambda: run_block(block, hidden, kwargs), linears, lambda name, x: stats[name].add(x))
            yield i, linears, stats
            hidden = run_block(block, hidden, kwargs)


def generic_text_calibration(tokenizer_vocab_size: int, n_samples: int = 128, length: int = 128, seed: int = 0,
                             token_pool: torch.Tensor | None = None, bos_token_id: int | None = None) -> list[dict]:
    """The "random" control: shuffled-token sequences, carrying no content at all (real generic text is
    `prose_calibration`).

    Without `token_pool`, token ids are drawn uniformly from [0, vocab) (a domain-free control).
    With `token_pool` (a 1-D tensor of ids, e.g. a tokenized generic corpus), each sequence is a random draw
    from that pool: real unigram statistics, word order destroyed. `bos_token_id` is prepended when given.
    """
    gen = torch.Generator().manual_seed(seed)
    body = length - (bos_token_id is not None)
    samples = []
    for _ in range(n_samples):
        if token_pool is None:
            ids = torch.randint(0, tokenizer_vocab_size, (body,), generator=gen)
        else:
            ids = token_pool[torch.randint(0, len(token_pool), (body,), generator=gen)]
        if bos_token_id is not None:
            ids = torch.cat([torch.tensor([bos_token_id]), ids])
        samples.append({"input_ids": ids[None].long(), "attention_mask": torch.ones(1, length, dtype=torch.long)})
    return samples


def driving_calibration(samples: list[dict], n_samples: int | None = None, seed: int = 0) -> list[dict]:
    """Driving-domain calibration from already-built LM forward kwargs (e.g. DrivingLLM prompt embeddings).

    Keeps the LM input keys, adds an all-ones attention_mask when missing, and optionally takes a seeded
    random subset of `n_samples`.
    """
    order = list(range(len(samples)))
    if n_samples is not None and n_samples < len(order):
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))[:n_samples].tolist()
    out = []
    for i in order:
        s = samples[i]
        x = s.get("inputs_embeds", s.get("input_ids"))
        if x is None:
            raise ValueError(f"calibration sample {i} has neither inputs_embeds nor input_ids")
        if x.shape[0] != 1:
            raise ValueError(f"calibration sample {i} must have batch size 1, got {tuple(x.shape)}")
        sample = {k: v for k, v in s.items() if k in FORWARD_KEYS}
        sample.setdefault("attention_mask", torch.ones(1, x.shape[1], dtype=torch.long))
        out.append(sample)
    return out


def scene_text_calibration(tokenizer, split, n_samples: int | None = 64, seed: int = 0, with_answer: bool = True,
                           chat_template: bool | None = None, max_length: int | None = None) -> list[dict]:
    """Driving-domain calibration for any HF causal LM: per sampled row of a driving `split` (models.data.Split:
    expert episodes from `load_split`, or `synthetic_split` for tests), the action prompt exactly as the text
    agent renders it (models.scene_text through the tokenizer's chat template when it has one), followed by the
    expert's action answer (`a_action`) when `with_answer`. Returns LM forward-kwarg dicts
    `{"input_ids": [1, T], "attention_mask": [1, T]}` (batch 1, unpadded), truncated to `max_length` tokens."""
    from prunedrive.models.hf_causal import answer_ids, prompt_ids

    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
    if n_samples is not None:
        order = order[:n_samples]
    samples = []
    for r in order:
        ids = prompt_ids(tokenizer, split.observation(r), chat_template)
        if with_answer and "a_action" in split.frame:
            ids += answer_ids(tokenizer, str(split.frame["a_action"].iloc[r]))
        if max_length is not None:
            ids = ids[:max_length]
        ids = torch.tensor([ids], dtype=torch.long)
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    if not samples:
        raise ValueError("empty calibration split")
    return samples


# -- generic text ----------------------------------------------------------------------------------------------------
GENERIC_CORPUS = "pydoc_data.topics"


def generic_corpus() -> tuple[str, str]:
    """(text, description): non-driving English prose that ships with every Python, the `pydoc_data.topics`
    documentation sections (the language reference as `help()` shows it: prose with some code), sections in
    sorted order, blank-line separated. Not C4 (which Wanda/OWL calibrate on), but real running text."""
    import sys

    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    version = ".".join(map(str, sys.version_info[:2]))
    return text, (f"{GENERIC_CORPUS} (Python {version} documentation topics, {len(topics)} sections, "
                  f"{len(text)} characters)")


def prose_calibration(token_ids: list[int] | torch.Tensor, lengths: list[int], seed: int = 0,
                      bos_token_id: int | None = None) -> list[dict]:
    """Generic-text calibration: one sample per entry of `lengths` (so the token count matches a reference set,
    e.g. the driving samples), each a contiguous window of `token_ids` (a tokenized corpus: word order kept) at a
    seeded random offset. `bos_token_id` replaces the first token of a window when given."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if not lengths:
        raise ValueError("no sample lengths")
    if len(ids) < max(lengths):
        raise ValueError(f"corpus of {len(ids)} tokens is shorter than a sample ({max(lengths)} tokens)")
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        start = int(torch.randint(0, len(ids) - length + 1, (1,), generator=gen))
        window = ids[start:start + length].clone()
        if bos_token_id is not None:
            window[0] = bos_token_id
        samples.append({"input_ids": window[None], "attention_mask": torch.ones(1, length, dtype=torch.long)})
    return samples


def random_token_calibration(vocab_size: int, lengths: list[int], seed: int = 0) -> list[dict]:
    """The "random" control, token-count matched: per entry of `lengths`, ids drawn uniformly from [0, vocab)."""
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab_size, (1, n), generator=gen),
             "attention_mask": torch.ones(1, n, dtype=torch.long)} for n in lengths]


def sample_length(sample: dict) -> int:
    """Positions of one calibration sample (inputs_embeds or input_ids, batch 1)."""
    x = sample.get("inputs_embeds", sample.get("input_ids"))
    return int(x.shape[1])
