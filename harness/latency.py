"""Latency in the loop: how long an agent's decision takes in simulated time, and what the car drives meanwhile.

Models (`--latency`):
  none          today's synchronous loop: the world waits for the agent (no clock at all, bit-identical)
  fixed:MS      every decision takes MS milliseconds of simulated time
  profile:FILE  a device profile (YAML) maps what the step computed (its compute report) to a latency
  measured      the agent's own measured time per decision (CUDA events on a GPU, else wall time): real, but
                NOT reproducible

Semantics (`LatencyClock`, the same in every backend), with P the suite's policy period and the simulator
ticking every tick_s (embedded: 1/15 s; CARLA: 1/20 s):
  - the agent reads the observation at a policy step's time t (only when it is free: see below);
  - its control takes effect at the first simulator tick at or after t + latency;
  - until then the previous control is held; before the first answer of an episode: full brake;
  - the agent is free again at t + latency and reads the next observation at the first policy step at or after
    that, so a slow agent decides less often (observations that arrive while it thinks are skipped).
A decision's latency comes from its own compute report (tokens, parameters: per row, never the batch's), so
results under `fixed:` and `profile:` do not depend on --batch or --workers.
"""
from __future__ import annotations

import hashlib
import re
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from prunedrive.harness.action import BRAKE, Control

LATENCY_FORMS = "none, fixed:MS (milliseconds >= 0), profile:FILE (a YAML device profile), measured"
EXECUTION_PATHS = ("dense", "sparse_kernel")  # sparse_kernel: the installed kernels skip weights (executed < dense)
PROFILE_FIELDS = {
    "name": "a name for the device",
    "source": "where the numbers come from (a measurement, a datasheet)",
    "measured": "true (fitted from measurements) or false (declared)",
    "overhead_ms": "fixed cost per decision, ms >= 0",
    "prefill_ms_per_token": "ms per prompt token >= 0",
    "decode_ms_per_token": "ms per generated token >= 0",
    "ms_per_gflop": "ms per GFLOP of the step's own compute >= 0 (2 x parameters x tokens)",
    "flops": "which parameters the FLOPs term counts: dense (all) or effective (non-zero)",
    "speed_factors": f"a multiplier > 0 per execution path ({', '.join(EXECUTION_PATHS)})",
}
_REQUIRED = ("source", "measured", "overhead_ms")
_EPS = 1e-9
# Latencies are rounded to the microsecond: FLOPs apportioned over a batch differ from K = 1's in the last bits,
# and a tick boundary must not depend on them.
_ROUND_S = 6


class LatencyError(ValueError):
    """A bad --latency value or profile file (the CLI exits 2)."""


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    measured: bool
    overhead_ms: float
    prefill_ms_per_token: float = 0.0
    decode_ms_per_token: float = 0.0
    ms_per_gflop: float = 0.0
    flops: str = "effective"
    speed_factors: dict = field(default_factory=lambda: {path: 1.0 for path in EXECUTION_PATHS})

    def latency_ms(self, report: dict) -> float:
        tokens_in, tokens_out = _finite(report.get("tokens_in")), _finite(report.get("tokens_out"))
        params = _finite(report.get("nonzero_params" if self.flops == "effective" else "params"))
        gflops = 2.0 * params * (tokens_in + tokens_out) / 1e9
        ms = (self.overhead_ms + self.prefill_ms_per_token * tokens_in + self.decode_ms_per_token * tokens_out
              + self.ms_per_gflop * gflops)
        return ms * self.speed_factors[execution_path(report)]


def _finite(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def execution_path(report: dict) -> str:
    """`sparse_kernel` when the installed kernels multiply fewer weights than the dense model has, else dense."""
    dense, executed = _finite(report.get("dense_flops")), _finite(report.get("executed_flops"))
    return "sparse_kernel" if 0 < executed < dense else "dense"


def load_profile(path: str | Path) -> Profile:
    """A device profile from YAML (yaml.safe_load); every bad field is a LatencyError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise LatencyError(f"--latency profile:{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LatencyError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise LatencyError(f"{path}: a device profile is a mapping with fields {', '.join(PROFILE_FIELDS)}")
    unknown = sorted(map(str, set(data) - set(PROFILE_FIELDS)))
    if unknown:
        raise LatencyError(f"{path}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(PROFILE_FIELDS)}")
    for name in _REQUIRED:
        if name not in data:
            raise LatencyError(f"{path}: field {name!r} is missing ({PROFILE_FIELDS[name]})")
    if not isinstance(data["measured"], bool):
        raise LatencyError(f"{path}: field 'measured' is {data['measured']!r}; allowed: true, false")
    if not isinstance(data["source"], str) or not data["source"].strip():
        raise LatencyError(f"{path}: field 'source' must be a non-empty text ({PROFILE_FIELDS['source']})")
    values = {"name": str(data.get("name", path.stem)), "source": data["source"], "measured": data["measured"]}
    for name in ("overhead_ms", "prefill_ms_per_token", "decode_ms_per_token", "ms_per_gflop"):
        if name in data:
            values[name] = _number(path, name, data[name], positive=False)
    flops = data.get("flops", "effective")
    if flops not in ("dense", "effective"):
        raise LatencyError(f"{path}: field 'flops' is {flops!r}; allowed: dense, effective")
    values["flops"] = flops
    factors = data.get("speed_factors", {})
    if not isinstance(factors, dict):
        raise LatencyError(f"{path}: field 'speed_factors' must be a mapping of {', '.join(EXECUTION_PATHS)} to numbers")
    unknown = sorted(map(str, set(factors) - set(EXECUTION_PATHS)))
    if unknown:
        raise LatencyError(f"{path}: field 'speed_factors' has unknown path(s) {', '.join(unknown)}; "
                           f"allowed: {', '.join(EXECUTION_PATHS)}")
    values["speed_factors"] = {p: _number(path, f"speed_factors.{p}", factors.get(p, 1.0), positive=True)
                               for p in EXECUTION_PATHS}
    return Profile(**values)


def _number(path: Path, name: str, value, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise LatencyError(f"{path}: field {name!r} is {value!r}; allowed: a finite number "
                           f"{'> 0' if positive else '>= 0'}")
    return float(value)


@dataclass(frozen=True)
class LatencyModel:
    """What `--latency` names. `spec` is what the user wrote; `identity` is what a run records and compares
    (a profile by its content's hash, so an edited file is another setting)."""

    kind: str                    # fixed | profile | measured
    spec: str
    fixed_ms: float = 0.0
    profile: Profile | None = None
    identity: str = ""

    @property
    def reproducible(self) -> bool:
        return self.kind != "measured"

    @property
    def label(self) -> str:
        """How tables name it: a declared profile and measured time say so."""
        if self.kind == "measured":
            return "measured (not reproducible)"
        if self.kind == "profile":
            return f"profile {self.profile.name} ({'measured' if self.profile.measured else 'declared'})"
        return f"fixed {self.fixed_ms:g} ms"

    def latency_s(self, report: dict, agent_wall_s: float) -> float:
        if self.kind == "fixed":
            ms = self.fixed_ms
        elif self.kind == "profile":
            ms = self.profile.latency_ms(report)
        else:  # measured: on a GPU the decision's CUDA-event time (its row's share in a batch), else wall time
            device_s = _finite(report.get("device_time_s"))
            ms = 1000.0 * (device_s if device_s > 0 else agent_wall_s)
        return round(max(ms, 0.0) / 1000.0, _ROUND_S)


def parse_latency(spec: str | None) -> LatencyModel | None:
    """A --latency value -> its model; None for `none` (the synchronous loop). LatencyError names the option."""
    text = (spec or "none").strip()
    if text == "none":
        return None
    if text == "measured":
        return LatencyModel("measured", text, identity="measured")
    kind, colon, value = text.partition(":")
    if kind == "fixed" and colon:
        try:
            ms = float(value)
        except ValueError:
            ms = float("nan")
        if not math.isfinite(ms) or ms < 0:
            raise LatencyError(f"--latency {text}: fixed:MS needs milliseconds >= 0, got {value!r}")
        return LatencyModel("fixed", text, fixed_ms=ms, identity=f"fixed:{ms:g}")
    if kind == "profile" and colon and value:
        profile = load_profile(value)
        digest = hashlib.sha256(Path(value).read_bytes()).hexdigest()[:16]
        return LatencyModel("profile", text, profile=profile, identity=f"profile:{profile.name}:{digest}")
    raise LatencyError(f"--latency {text!r} is not a latency model; allowed: {LATENCY_FORMS}")


def latency_identity(spec: str | None) -> str | None:
    """What a run's identity records for `spec`: None for none (runs from before latency existed match)."""
    model = parse_latency(spec)
    return model.identity if model is not None else None


@dataclass
class Decision:
    latency_s: float
    effect_tick: int     # absolute simulator tick (from the episode's start) at which its control takes effect
    observed_tick: int   # the tick of the observation it was chosen for


class LatencyClock:
    """One episode's simulated time under a latency model: who is free, which control holds at each tick."""

    def __init__(self, model: LatencyModel, policy_period_s: float, ticks_per_step: int):
        if ticks_per_step < 1:
            raise ValueError(f"ticks_per_step must be >= 1, got {ticks_per_step}")
        self.model, self.period_s, self.ticks_per_step = model, policy_period_s, ticks_per_step
        self.tick_s = policy_period_s / ticks_per_step
        self.step = 0                  # policy steps done
        self.free_at_s = 0.0           # when the agent has finished its last decision
        self.pending: list[tuple[Decision, Control]] = []
        self.held: Control = BRAKE     # before the first answer: full brake
        self.held_observed_tick: int | None = None  # None: the brake placeholder

    def free(self) -> bool:
        """Whether the agent reads the observation of this policy step."""
        return self.free_at_s <= self.step * self.period_s + _EPS

    def decide(self, control: Control, report: dict, agent_wall_s: float) -> Decision:
        """The agent answered `control` for this step's observation: schedule it."""
        latency_s = self.model.latency_s(report, agent_wall_s)
        observed_tick = self.step * self.ticks_per_step
        decision = Decision(latency_s, observed_tick + math.ceil(latency_s / self.tick_s - _EPS), observed_tick)
        self.pending.append((decision, control))
        self.free_at_s = self.step * self.period_s + latency_s
        return decision

    def tick_controls(self) -> tuple[list[Control], int]:
        """The control in effect at each simulator tick of this policy step (then the step is counted done),
        and how many of those ticks drove on a stale control: the brake placeholder, or a control chosen on an
        observation more than one policy period old (a synchronous agent's never is)."""
        first = self.step * self.ticks_per_step
        controls, stale = [], 0
        for tick in range(first, first + self.ticks_per_step):
            while self.pending and self.pending[0][0].effect_tick <= tick:
                decision, self.held = self.pending.pop(0)
                self.held_observed_tick = decision.observed_tick
            controls.append(self.held)
            old = self.held_observed_tick is None or (tick - self.held_observed_tick) * self.tick_s > self.period_s + _EPS
            stale += int(old)
        self.step += 1
        return controls, stale


# -- per-episode metrics ---------------------------------------------------------------------------------
# Per step row: whether the agent decided on this step's observation, that decision's latency (s) and the
# absolute simulator tick its control took effect (-1: no decision), the step's ticks and how many were stale.
LATENCY_STEP_COLUMNS = ("decided", "latency_s", "effect_tick", "ticks", "stale_ticks")


def latency_metrics(steps: dict, policy_period_s: float, sim_time_s: float) -> dict:
    """Per episode: decision latency mean/p95 (ms), decisions, effective control rate (Hz), deadline misses
    (decisions slower than the policy period) and the share of simulated time driven on a stale control."""
    decided = np.asarray(steps.get("decided", []), np.float64) > 0
    latency = np.asarray(steps.get("latency_s", []), np.float64)[decided] if len(decided) else np.array([])
    stale = np.asarray(steps.get("stale_ticks", []), np.float64)
    ticks = float(np.sum(np.asarray(steps.get("ticks", []), np.float64)))
    return {
        "decisions": float(decided.sum()),
        "decision_latency_ms_mean": float(latency.mean() * 1000) if len(latency) else float("nan"),
        "decision_latency_ms_p95": float(np.percentile(latency, 95) * 1000) if len(latency) else float("nan"),
        "control_hz": float(decided.sum() / sim_time_s) if sim_time_s > 0 else float("nan"),
        "deadline_misses": float((latency > policy_period_s + _EPS).sum()),
        "deadline_miss_share": float((latency > policy_period_s + _EPS).mean()) if len(latency) else float("nan"),
        "stale_share": float(stale.sum() / ticks) if ticks else float("nan"),
    }


def run_id_suffix(spec: str | None) -> str:
    """A suffix for a pipeline's fixed run id (bench, claims), so runs under other latency settings get their
    own directory instead of a refused resume: '' for none."""
    model = parse_latency(spec)
    return "" if model is None else "-latency-" + re.sub(r"[^A-Za-z0-9_.=+-]", "=", model.identity)


def budget_table(episodes, budget_ms: float | None = None):
    """Per agent of a run under a latency model: decisions per episode, decision latency (mean, and the worst
    episode's p95), deadline-miss share, effective control rate, and whether the p95 meets `budget_ms` per
    decision (`bench --budget`); None for a run without latency columns."""
    import pandas as pd

    if "decisions" not in episodes:
        return None
    rows = []
    for agent, group in episodes.groupby("agent", sort=False):
        p95 = float(group["decision_latency_ms_p95"].max())
        rows.append({"agent": agent, "decisions": float(group["decisions"].mean()),
                     "latency_ms_mean": float(group["decision_latency_ms_mean"].mean()), "latency_ms_p95": p95,
                     "deadline_miss_share": float(group["deadline_miss_share"].mean()),
                     "control_hz": float(group["control_hz"].mean()),
                     "meets_budget": (p95 <= budget_ms) if budget_ms is not None else None})
    return pd.DataFrame(rows)
