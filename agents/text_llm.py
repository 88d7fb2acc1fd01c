"""Any local Hugging Face causal LM as a driving agent: observation -> scene text -> greedy answer -> Control.

    prunedrive run --suite smoke --agent text-llm --model ~/models/Qwen2.5-0.5B-Instruct
    prunedrive run --suite smoke --agent text-llm --model DIR --agent-arg max_new_tokens=48

The observation is rendered by models.scene_text (versioned), wrapped in the tokenizer's chat template when it
has one, and answered by greedy decoding with the KV cache. Decoding stops at EOS, at a stop string ("Reason"
by default: the action lines come first), as soon as the text so far parses as a complete action
(`stop_when_parsed`), or after `max_new_tokens`. An answer that does not parse gives the safe action (full brake)
and is counted in `parse_failures` and in the decision's compute (`parse_failed`, as agents/llm.py); it never
ends the episode. Same model + observation -> same control (greedy, no sampling).

The directory is checked once, when the agent is built (and by `AgentSpec.check` before a run drives, through
`check_model`), not per episode: models.hf_causal.check_drivable renders the chat template on the longest
probe scene within a size, memory and time limit and checks that prompt plus max_new_tokens fit the model's
positions.

Compute per act() (`last_compute()`, the fields of agents/llm.py), measured by forward hooks, so it holds for
any architecture:
  linear FLOPs  = sum over every nn.Linear and transformers Conv1D (lm_head included) of 2 * W * rows, rows =
                  the rows that actually went through the layer in this act (prefill: all prompt tokens, or
                  only the last one for an lm_head that the model lets skip the rest; each decode step: 1).
                  W = weight.numel() (dense_flops) or its non-zeros (effective_flops); executed_flops = dense:
                  this agent runs masked weights densely, the zeros are multiplied too.
  attention     = 4 * d_attn * (query x key pairs) * layers, d_attn = heads * head_dim from the config: the
                  prefill's causal T(T+1)/2 pairs, each decode step's whole context. Full causal attention is
                  assumed (a sliding window shorter than the context is not discounted). Same in all three.
  Embeddings, norms, activations, softmax, rotary and biases are not counted.
peak_mem_bytes: the process's peak resident set (getrusage), as agents/llm.py.
device, dtype: the model and its inputs on `device` (cpu, cuda, cuda:N), weights in `dtype` (float32, bfloat16,
float16, or "auto": the checkpoint's own), checked by models.device (float16 on the CPU is refused). On a CUDA
device each decision also reports device_time_s (CUDA events, synchronised) and device_peak_mem_bytes (reset per
episode), as agents/llm.py.
"""
from __future__ import annotations

import inspect
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from prunedrive.agents.llm import parse_or_brake
from prunedrive.harness.action import Control
from prunedrive.harness.compute import apportion, split_device_time
from prunedrive.models.device import (DeviceClock, check_device, check_precision, device_figures, is_cuda,
                                      reset_peak_memory)
from prunedrive.models import text
from prunedrive.models.hf_causal import (check_causal_lm_dir, check_drivable, load_causal_lm, max_positions,
                                         prompt_ids, uses_chat_template)
from prunedrive.models.pruning.masks import find_linears, in_features
from prunedrive.scenarios.loader import Scenario

DEFAULT_STOP_STRINGS = ("Reason",)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_width(config) -> tuple[int, int]:
    """(layers, d_attn = query heads x head dim) from a transformers config."""
    cfg = _text_config(config)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    return int(layers), int(heads) * int(head_dim)


class TextLLMAgent:
    def __init__(self, model_dir: str | Path, name: str | None = None, max_new_tokens: int = 48,
                 trust_remote_code: bool = False, dtype: str = "float32", device: str = "cpu",
                 stop_strings: tuple[str, ...] | list[str] | str | None = DEFAULT_STOP_STRINGS,
                 stop_when_parsed: bool = True, chat_template: bool | None = None):
        """model_dir: a local HF causal LM directory (models.hf_causal.load_causal_lm checks it). chat_template:
        None = use the tokenizer's when it has one, False = always the plain prompt."""
        self.model_dir = str(model_dir)
        self.max_new_tokens = _max_new_tokens(max_new_tokens)
        self.device = check_device(device, "device")
        if dtype != "auto":
            check_precision(self.device, dtype, ("device", "dtype"))
        self.model, self.tokenizer = load_causal_lm(model_dir, trust_remote_code=trust_remote_code, dtype=dtype)
        self.model.to(self.device)
        check_drivable(model_dir, self.tokenizer, self.model.config, self.max_new_tokens, chat_template)
        self.name = name or f"text-llm-{Path(model_dir).name}"
        self.stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ())
        self.stop_when_parsed = stop_when_parsed
        self.chat_template = chat_template
        self.uses_chat_template = chat_template is not False and uses_chat_template(self.tokenizer)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._logits_kw = self._last_logits_only()
        self._takes_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        self._cache_kw = self._cache_keyword()
        self.layers, self.d_attn = attention_width(self.model.config)
        self.max_positions, _ = max_positions(self.model.config)
        self.parse_failures = 0
        self.steps = 0
        self.last_text = ""
        self._last: dict[str, float] = {}
        self._last_batch: list[dict[str, float]] = []
        self._linears = find_linears(self.model, exclude=())
        self._rows: dict[str, int] = {}
        self._prefill_rows: dict[str, int] = {}
        self.last_rows: dict[str, int] = {}
        self._counting = False
        self._hooks = [lin.register_forward_hook(self._count_rows(name)) for name, lin in self._linears.items()]
        self.refresh_compute()

    def _last_logits_only(self) -> dict:
        """Ask the model for the last position's logits only, where its forward lets us (saves the prefill's
        lm_head rows; the hooks count what actually ran either way)."""
        params = inspect.signature(self.model.forward).parameters
        for key in ("logits_to_keep", "num_logits_to_keep"):
            if key in params:
                return {key: 1}
        return {}

    def _cache_keyword(self) -> str:
        """transformers >= 5.2x calls the KV cache `cache`; older versions `past_key_values`."""
        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _count_rows(self, name: str):
        width = in_features(self._linears[name])

        def hook(_module, inputs, _output):
            if self._counting:
                self._rows[name] = self._rows.get(name, 0) + inputs[0].numel() // width
        return hook

    # -- Agent protocol ----------------------------------------------------------------------------
    def reset(self, scenario: Scenario) -> None:
        self.refresh_compute()  # weights may have been pruned since the last episode
        reset_peak_memory(self.device)

    def act(self, observation: dict[str, np.ndarray]) -> Control:
        ids = self._prompt(observation)
        with DeviceClock(self.device) as clock:
            generated, decode_steps = self._counted_decode([ids])
        self.last_rows = dict(self._rows)  # rows through each linear in this act (name -> rows)
        control, failed = self._control(generated[0])
        self._last = {**self._compute(len(ids), decode_steps, len(generated[0]), self._rows),
                      "parse_failed": float(failed), **device_figures(self.device, clock.seconds)}
        return control

    def last_compute(self) -> dict[str, float]:
        return dict(self._last)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- lockstep batches (harness.agent) ------------------------------------------------------------
    def act_batch(self, observations: list[dict[str, np.ndarray]]) -> list[Control]:
        """One control per observation, decoded together: the prompts left-padded to the longest (attention
        mask 0 on the padding, position ids counted from each row's first real token, so a row sees the
        positions batch 1 gives it), one forward per step for all rows with one KV cache, each row stopping
        on its own (a stopped row is fed along until the last row stops, its tokens ignored). Unlike the
        vector agent's, the call is not padded to K rows: prompts differ in length, so the padded length
        already depends on which episodes share the call, and extra rows would cost a whole prefill each
        (the text agent's time is mostly prefill). A row's greedy tokens equal act()'s wherever the float
        arithmetic allows: the padded shape changes the summation order of some products, and where two
        logits are that close the token can differ (benchmarks/throughput.py --tokens measures how often).
        The same calls give the same tokens: in one process a suite's schedule, and so each call, is the same
        for a given K; across Ray workers which episodes share a call can change from run to run.

        Compute per row (`last_compute_batch()`): the row's own tokens_in/tokens_out; the call's FLOPs (every
        row through the padded prompt and every decode step) split over the rows in proportion to what each
        would have cost alone (its own prompt and decode steps), so they sum to what the call computed."""
        n = len(observations)
        if n == 0:
            self._last_batch = []
            return []
        if not self._takes_positions:  # left padding would shift the positions of shorter prompts: one by one
            controls, self.last_texts, self._last_batch = [], [], []
            for observation in observations:
                controls.append(self.act(observation))
                self.last_texts.append(self.last_text)
                self._last_batch.append(self.last_compute())
            return controls
        prompts = [self._prompt(o) for o in observations]
        with DeviceClock(self.device) as clock:
            generated, decode_steps = self._counted_decode(prompts)
        width = max(len(p) for p in prompts)
        controls, own, texts = [], [], []
        for ids, answer in zip(prompts, generated):
            control, failed = self._control(answer)
            controls.append(control)
            texts.append(self.last_text)
            alone = {name: (len(ids) if self._prefill_rows.get(name, 0) == n * width else
                            self._prefill_rows.get(name, 0) // n) + len(answer) - 1 for name in self._rows}
            own.append({**self._compute(len(ids), len(answer) - 1, len(answer), alone), "parse_failed": float(failed)})
        apportion(own, self._compute(width, decode_steps, 0, self._rows, rows=n))
        if is_cuda(self.device):  # the call's device time over its rows, like its FLOPs
            for report in own:
                report.update(device_figures(self.device, clock.seconds))
            split_device_time(own, clock.seconds)
        self.last_rows = dict(self._rows)
        self.last_texts = texts  # each row's answer (last_text: the last row's)
        self._last_batch = own
        self._last = dict(own[-1])
        return controls

    def last_compute_batch(self) -> list[dict[str, float]]:
        return [dict(report) for report in self._last_batch]

    # -- decoding ----------------------------------------------------------------------------------
    def _prompt(self, observation: dict[str, np.ndarray]) -> list[int]:
        ids = prompt_ids(self.tokenizer, observation, self.chat_template)
        if self.max_positions and len(ids) + self.max_new_tokens > self.max_positions:
            raise ValueError(f"{self.name}: the scene prompt has {len(ids)} tokens, plus max_new_tokens="
                             f"{self.max_new_tokens} that exceeds the model's {self.max_positions} positions")
        return ids

    def _control(self, generated: list[int]) -> tuple[Control, bool]:
        """The answer's control and whether it fell back (did not parse), counted."""
        self.last_text = self.tokenizer.decode(generated, skip_special_tokens=True)
        control, failed = parse_or_brake(self.last_text)
        self.steps += 1
        self.parse_failures += failed
        return control, failed

    def _stop(self, generated: list[int]) -> bool:
        if generated[-1] in self.eos_ids:
            return True
        if not (self.stop_strings or self.stop_when_parsed):
            return False
        so_far = self.tokenizer.decode(generated, skip_special_tokens=True)
        return any(s in so_far for s in self.stop_strings) or (
            self.stop_when_parsed and text.parse_action(so_far) is not None)

    def _counted_decode(self, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
        """_greedy with the forward hooks counting: self._rows (whole call), self._prefill_rows (prefill)."""
        self._rows, self._prefill_rows = {}, {}
        self._counting = True
        try:
            return self._greedy(prompts)
        finally:
            self._counting = False

    @torch.inference_mode()
    def _greedy(self, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
        """Greedy decoding with the KV cache for one or more prompts (left-padded, see act_batch): one
        prefill, then one row per prompt per fed-back token until every row stopped. Returns each row's
        generated ids and the number of decode forwards (after the prefill)."""
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        context = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(context)
        for i, ids in enumerate(prompts):
            context[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = dict(self._logits_kw)
        if self._takes_positions:
            extra["position_ids"] = positions
        out = self.model(input_ids=context, attention_mask=mask, use_cache=True, **extra)
        self._prefill_rows = dict(self._rows)
        generated: list[list[int]] = [[] for _ in prompts]
        running = list(range(len(prompts)))
        decode_steps = 0
        while True:
            tokens = torch.argmax(out.logits[:, -1], dim=-1)
            chosen = tokens.tolist()
            for i in running:
                generated[i].append(chosen[i])
            running = [i for i in running if not (len(generated[i]) >= self.max_new_tokens or self._stop(generated[i]))]
            if not running:
                return generated, decode_steps
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            positions = positions[:, -1:] + 1
            if self._takes_positions:
                extra["position_ids"] = positions
            cache = getattr(out, "cache", None)
            cache = cache if cache is not None else out.past_key_values
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, use_cache=True,
                             **{self._cache_kw: cache}, **extra)
            decode_steps += 1

    # -- compute accounting ------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_compute(self) -> None:
        """Re-read weight sizes and non-zeros (call after pruning the model in place)."""
        unique = list({id(p): p for p in self.model.parameters()}.values())
        self.params = sum(p.numel() for p in unique)
        self.nonzero_params = sum(int(torch.count_nonzero(p)) for p in unique)
        self._sizes = {n: (lin.weight.numel(), int(torch.count_nonzero(lin.weight))) for n, lin in self._linears.items()}

    def _compute(self, tokens_in: int, decode_steps: int, tokens_out: int, linear_rows: dict[str, int],
                 rows: int = 1) -> dict[str, float]:
        """FLOPs of `rows` prompts of tokens_in tokens decoded for decode_steps steps, with `linear_rows` rows
        through each linear (in all)."""
        dense = sum(2 * self._sizes[n][0] * r for n, r in linear_rows.items())
        effective = sum(2 * self._sizes[n][1] * r for n, r in linear_rows.items())
        pairs = tokens_in * (tokens_in + 1) // 2 + sum(tokens_in + j + 1 for j in range(decode_steps))
        attention = 4 * self.d_attn * pairs * self.layers * rows
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"tokens_in": float(tokens_in), "tokens_out": float(tokens_out),
                "dense_flops": float(dense + attention), "effective_flops": float(effective + attention),
                "executed_flops": float(dense + attention), "params": float(self.params),
                "nonzero_params": float(self.nonzero_params), "peak_mem_bytes": float(peak)}


def _max_new_tokens(value) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {value!r}")
    return count


def make_text_llm_agent(model: str | Path, device: str = "cpu", dtype: str = "float32", **options) -> TextLLMAgent:
    """The registry's `text-llm`: named after the model directory, so a dense model and its pruned variants stay
    apart. device and dtype are named here so that --device/--dtype reach it (app.run.with_precision)."""
    return TextLLMAgent(model, device=device, dtype=dtype, **options)


def check_text_llm_model(model: str | Path, max_new_tokens: int = 48, trust_remote_code: bool = False,
                         chat_template: bool | None = None, device: str = "cpu", dtype: str = "float32",
                         **_other_options) -> None:
    """What building the agent checks about its model directory, without loading the weights: AgentSpec.check
    calls it in the process that plans the run, before any episode (Ray workers build their agents later)."""
    if dtype == "auto":
        check_device(device, "device")
    else:
        check_precision(device, dtype, ("device", "dtype"))
    check_causal_lm_dir(model, _max_new_tokens(max_new_tokens), trust_remote_code=trust_remote_code,
                        chat_template=chat_template)


make_text_llm_agent.check_model = check_text_llm_model
