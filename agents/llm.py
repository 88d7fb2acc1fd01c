"""The driving LLM as an agent: observation -> latent tokens + the action question -> greedy answer -> Control.

An answer that does not parse gives the safe action (full brake) and is counted in `parse_failures`;
it never ends the episode. Each decision reports it in its compute (`parse_failed`: 1 fell back, 0 parsed),
so it reaches the step rows, the episode's `parse_failures` and the parse-failure rate of harness.metrics.

Lockstep batches (`--batch K`, harness.agent): `act_batch(observations)` decodes many episodes' steps in one
generate() call, padded to K rows so that a given K is deterministic; per row it reports its own tokens and
its share of the call's FLOPs (`last_compute_batch()`). The agent keeps no per-episode state beyond counters.

Compute per act() (`last_compute()`), counted analytically from the shapes actually run:
  linear FLOPs  = sum over nn.Linear of 2 * W * rows, W = weight.numel() (dense) or its non-zeros
                  (effective); rows = tokens through that layer: encoder layers (measured once by hooks
                  on a dummy call; padded object slots are computed, so they count), decoder layers: every
                  LM token processed (latents + prompt, then each fed-back token), lm_head: one row per
                  generated token (the prefill keeps only the last position's logits).
  attention     = 4 * d_attn * (query rows x key rows): LM causal prefill T(T+1)/2 per layer, each
                  decode step attends to its whole context; encoder object self-attention and latent
                  cross-attention likewise. Same in dense and effective (masks do not skip scores).
  Norms, activations, softmax, rotary and biases are ignored (<2% here).
  executed FLOPs: as effective, but W = what the installed kernel multiplies: weight.numel() for a layer run
                  dense (its zeros are multiplied too), the non-zeros on csr, the padded rows on ell, half on
                  2:4 semi-structured (models/sparse_linear.py). Equals dense_flops unless sparse="auto".
peak_mem_bytes: the process's peak resident set (getrusage ru_maxrss): what the OS saw, simulator and
  Python included; monotonic over the process, so compare it across processes, not within one.

Device and precision (`device`, `dtype`; models.device checks them): the model's weights live on the device in
the dtype; observations go there as float32 and the encoder casts its O(1) features to the dtype (coordinates are
turned into features in float32). On a CUDA device each act()/act_batch() also reports `device_time_s` (the
decode's GPU time, CUDA events, synchronised; a batch's split over its rows like its FLOPs) and
`device_peak_mem_bytes` (torch.cuda.max_memory_allocated, reset at every reset(): per episode); on the CPU neither
is reported (the step rows hold NaN) and the runner's wall time is the step's time.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunedrive.harness.action import BRAKE, Control
from prunedrive.harness.compute import apportion, split_device_time
from prunedrive.harness.observation import MAX_PEDESTRIANS, MAX_VEHICLES, OBS_SHAPES
from prunedrive.models import text
from prunedrive.models.device import (DeviceClock, check_precision, device_figures, is_cuda, reset_peak_memory,
                                      torch_dtype)
from prunedrive.models.driving_llm import DrivingLLM, collate
from prunedrive.models.pruning.masks import find_linears
from prunedrive.models.sparse_linear import accelerate, executed_weights
from prunedrive.scenarios.loader import Scenario


def _linear_weights(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def parse_or_brake(answer: str) -> tuple[Control, bool]:
    """The answer's action, or the safe action (full brake) and True when the answer does not parse."""
    control = text.parse_action(answer)
    return (BRAKE, True) if control is None else (control, False)


class LLMAgent:
    def __init__(self, model: DrivingLLM | str | Path, name: str | None = None, max_new_tokens: int = 24,
                 full_answer: bool = False, sparse: str = "dense", device: str = "cpu", dtype: str = "float32"):
        """model: a DrivingLLM or a directory saved by save_pretrained. full_answer=False stops decoding once
        the actions are complete (at "Reason"), saving the reason's tokens. sparse="auto" runs each pruned
        Linear through the execution path measured fastest for this agent's row counts (`self.paths`,
        re-chosen when the non-zeros change); "dense" runs the masked dense weights as they are."""
        if sparse not in ("dense", "auto"):
            raise ValueError(f"sparse must be 'dense' or 'auto', got {sparse!r}")
        self.device, self.dtype = check_precision(device, dtype, ("device", "dtype"))
        self.sparse = sparse
        self.paths: dict[str, str] = {}
        self.path_report: dict = {}
        self._pruned_fingerprint: tuple | None = None
        self.model = model if isinstance(model, DrivingLLM) else DrivingLLM.from_pretrained(model)
        self.model.to(device=self.device, dtype=torch_dtype(self.dtype))
        self.model.eval()
        self.name = name or f"llm-{self.model.config.preset}"
        self.max_new_tokens = max_new_tokens
        self.stop_text = None if full_answer else "Reason"
        self.prompt = text.prompt("action")
        self.parse_failures = 0
        self.steps = 0
        self.last_text = ""
        self._last: dict[str, float] = {}
        self._last_batch: list[dict[str, float]] = []
        self.batch_rows: int | None = None  # act_batch pads to this many rows (configure_batch)
        self._encoder_rows = self._measure_encoder_rows()
        self.refresh_compute()

    # -- Agent protocol ----------------------------------------------------------------------------
    def reset(self, scenario: Scenario) -> None:
        self.refresh_compute()  # weights may have been pruned since the last episode
        reset_peak_memory(self.device)

    def act(self, observation: dict[str, np.ndarray]) -> Control:
        with DeviceClock(self.device) as clock:
            ids, stats = self.model.generate(self._inputs([observation]), self.prompt, self.max_new_tokens,
                                             self.stop_text)
        self.last_text = self.model.tokenizer.decode(ids[0])
        control, failed = parse_or_brake(self.last_text)
        self.steps += 1
        self.parse_failures += failed
        self._last = {**self._compute(stats["tokens_in"], stats["decode_steps"], len(ids[0])),
                      "parse_failed": float(failed), **device_figures(self.device, clock.seconds)}
        return control

    def _inputs(self, observations: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """The collated float32 observations on the model's device."""
        return {k: v.to(self.device) for k, v in collate(observations).items()}

    def last_compute(self) -> dict[str, float]:
        return dict(self._last)

    # -- lockstep batches (harness.agent) ------------------------------------------------------------
    def configure_batch(self, capacity: int) -> None:
        """Pad every act_batch to `capacity` rows (see act_batch)."""
        self.batch_rows = int(capacity)
        self._pruned_fingerprint = None  # sparse="auto": the row counts changed; the next reset() measures again

    def act_batch(self, observations: list[dict[str, np.ndarray]]) -> list[Control]:
        """One control per observation, decoded together: one generate() over the collated batch (one shared
        prompt, one KV cache, per-row stopping). The batch is padded to `batch_rows` rows (copies of the first
        observation, which stop with it) so every call runs the same shapes: a row's arithmetic, and so its
        greedy tokens, depend only on its own observation and the batch size, never on which episodes share
        the call, and a given K is deterministic. Against act() (one row) the float summation order of the
        matrix products may differ, and where two logits are that close the greedy token can differ
        (benchmarks/throughput.py --tokens measures how often).

        Compute per row (`last_compute_batch()`): tokens_in and tokens_out are the row's own; the call's FLOPs
        (all rows, padding included, each fed back every decode step until the last row stopped) are split
        over the rows in proportion to what each row alone would have cost (its own decode steps), so they sum
        to what the call computed. With one row and no padding this is exactly act()'s accounting."""
        n = len(observations)
        if n == 0:
            self._last_batch = []
            return []
        rows = list(observations) + [observations[0]] * max(0, (self.batch_rows or n) - n)
        with DeviceClock(self.device) as clock:
            ids, stats = self.model.generate(self._inputs(rows), self.prompt, self.max_new_tokens, self.stop_text)
        tokens_in, batch_steps = stats["tokens_in"], stats["decode_steps"]
        controls, own, texts = [], [], []
        for row in ids[:n]:
            self.last_text = self.model.tokenizer.decode(row)
            texts.append(self.last_text)
            control, failed = parse_or_brake(self.last_text)
            self.steps += 1
            self.parse_failures += failed
            controls.append(control)
            own.append({**self._compute(tokens_in, self._own_decode_steps(row), len(row)),
                        "parse_failed": float(failed)})
        # Every row of the call (padding included) processed tokens_in + batch_steps tokens.
        per_row = self._compute(tokens_in, batch_steps, 0)
        apportion(own, {field: value * len(rows) for field, value in per_row.items()})
        if is_cuda(self.device):  # the call's device time over its rows, like its FLOPs
            for report in own:
                report.update(device_figures(self.device, clock.seconds))
            split_device_time(own, clock.seconds)
        self.last_texts = texts  # each row's answer (last_text: the last row's)
        self._last_batch = own
        self._last = dict(own[-1])
        return controls

    def last_compute_batch(self) -> list[dict[str, float]]:
        return [dict(report) for report in self._last_batch]

    def _own_decode_steps(self, row: list[int]) -> int:
        """The tokens generate() feeds back for this row alone (what batch 1 would run): up to its stop."""
        n = len(row)
        if self.stop_text and n and self.stop_text in self.model.tokenizer.decode(row[-4:]):
            return n - 1  # stopped at the token that completed the stop text
        if n >= self.max_new_tokens:
            return max(self.max_new_tokens - 1, 0)  # ran out of tokens
        return n  # stopped at eos: all its tokens were fed back

    # -- compute accounting ------------------------------------------------------------------------
    def refresh_compute(self) -> None:
        """Re-read weight sizes and non-zeros (call after pruning the model in place)."""
        m = self.model
        unique = {id(p): p for p in m.parameters()}.values()
        self.params = sum(p.numel() for p in unique)
        self.nonzero_params = sum(int(torch.count_nonzero(p)) for p in unique)
        if self.sparse == "auto":
            self._accelerate_if_pruned_changed()
        dense_nnz = lambda lin: (lin.weight.numel(), int(torch.count_nonzero(lin.weight)),  # noqa: E731
                                 executed_weights(lin))
        self._decoder = np.sum([dense_nnz(l) for l in _linear_weights(m.lm.model.layers).values()], axis=0)
        self._head = np.array(dense_nnz(m.lm.get_output_embeddings()))
        enc = _linear_weights(m.encoder)
        self._encoder = np.sum([2 * self._encoder_rows.get(n, 0) * np.array(dense_nnz(l)) for n, l in enc.items()],
                               axis=0)

    def _measure_encoder_rows(self) -> dict[str, int]:
        rows: dict[str, int] = {}
        hooks = [lin.register_forward_hook(lambda mod, inp, out, n=n: rows.__setitem__(n, inp[0][..., 0].numel()))
                 for n, lin in _linear_weights(self.model.encoder).items()]
        try:
            with torch.no_grad():
                self.model.encoder(self._inputs([{k: np.zeros(s, np.float32) for k, s in OBS_SHAPES.items()}]))
        finally:
            for h in hooks:
                h.remove()
        return rows

    def _accelerate_if_pruned_changed(self) -> None:
        """Choose execution paths by measurement; only again when some layer's non-zeros changed (timing takes
        a few seconds, reset() is called every episode)."""
        linears = find_linears(self.model)
        fingerprint = tuple(int(torch.count_nonzero(lin.weight)) for lin in linears.values())
        if fingerprint == self._pruned_fingerprint:
            return
        prefill = self.model.prefix_tokens + len(self.model.prompt_ids(self.prompt))
        # Decoder layers: one prefill of all LM input rows, then one row per fed-back token, for each of the
        # K rows act_batch decodes together (configure_batch): the paths are chosen at the agent's own rows.
        k = self.batch_rows or 1
        decode = {k * prefill: 1.0, k: float(max(self.max_new_tokens - 1, 1))}
        encoder = {f"encoder.{n}": {max(r, 1) * k: 1.0} for n, r in self._encoder_rows.items()}
        self.path_report = accelerate(self.model, decode, layer_rows=encoder)
        self.paths = {n: c.path for n, c in self.path_report.items()}
        self._pruned_fingerprint = fingerprint

    def _compute(self, tokens_in: int, decode_steps: int, tokens_out: int) -> dict[str, float]:
        cfg = self.model.lm.config
        d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        processed = tokens_in + decode_steps
        pairs = tokens_in * (tokens_in + 1) // 2 + sum(tokens_in + j + 1 for j in range(decode_steps))
        lm_attention = 4 * d_attn * pairs * cfg.num_hidden_layers
        e = self.model.config
        objects = 3 + MAX_VEHICLES + MAX_PEDESTRIANS  # ego, route, light + all slots (padded ones are computed)
        enc_attention = 4 * e.enc_dim * (objects * objects + e.num_latents * objects)
        dense, effective, executed = (2 * processed * self._decoder + 2 * (1 + decode_steps) * self._head
                                      + self._encoder + lm_attention + enc_attention)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"tokens_in": float(tokens_in), "tokens_out": float(tokens_out), "dense_flops": float(dense),
                "effective_flops": float(effective), "executed_flops": float(executed),
                "params": float(self.params), "nonzero_params": float(self.nonzero_params),
                "peak_mem_bytes": float(peak)}


def make_llm_agent(model: str | Path, device: str = "cpu", dtype: str = "float32", **options) -> LLMAgent:
    """The registry's `llm`: named after the model directory, so a dense model and its pruned variants stay apart.
    device and dtype are named here so that --device/--dtype reach it (app.run.with_precision)."""
    return LLMAgent(model, name=f"llm-{Path(model).name}", device=device, dtype=dtype, **options)


def check_llm_model(model: str | Path, device: str = "cpu", dtype: str = "float32", **_other_options) -> None:
    """Before a run drives (AgentSpec.check, in the planning process): the device exists and takes the dtype."""
    check_precision(device, dtype, ("device", "dtype"))


make_llm_agent.check_model = check_llm_model
