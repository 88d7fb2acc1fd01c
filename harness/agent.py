"""The agent protocol: what the runner calls, once per episode and once per step.

Every agent: `name`, `reset(scenario)` (once per episode, before its first step) and `act(observation)`.

The optional hooks are declared below: `BatchAgent` (act_batch) and `AgentHooks` (the others); the harness
reads each through `hook(agent, name)`, so none is called that is not declared there.

Lockstep batches (`--batch K`, harness.lockstep.Lockstep): one worker runs up to K episodes side by side and
steps the running ones together. What an agent sees there depends on what it implements:

* `act_batch(observations) -> list[Control]` (optional): one call per lockstep step with the observations
  of every running episode of this agent instance (1..K of them, in a stable slot order), one control
  each, same order. One instance serves all K episodes, so `reset(scenario)` is still called once per
  episode, at that episode's start, while the agent's other episodes are running: an agent with
  act_batch must keep no per-episode state between steps, or keep it per slot by also implementing
  `reset_batch(slot, scenario)` (called right after reset(scenario) for the episode that starts in `slot`,
  0 <= slot < K, a slot is reused only after its episode ended); the harness then calls
  `act_batch(observations, slots=[...])` with each observation's slot. The LLM agent keeps no episode
  state beyond counters, so it implements neither.
  `configure_batch(capacity)` (optional): called once before the first act_batch with K, the most
  observations any act_batch call will get (the LLM agent pads every call to K rows, so that a row's
  arithmetic, and thus its greedy tokens, never depend on which other episodes share its batch).
  `last_compute_batch() -> list[dict]` (optional, model-backed agents): the compute fields of
  `last_compute()` per row of the last act_batch, already apportioned (FLOPs summing to the batch's).
  If act_batch raises (anything but a harness time limit), the harness asks `act(observation)` of each of
  those episodes, one by one, for that step: an exception there, or a bad control from either call, fails
  only its own episode. act_batch returning the wrong number of controls counts as raising. A time
  limit hit inside act_batch fails every episode of that call (`agent timeout`, an infrastructure
  failure that `--resume` runs again).
* No act_batch: `act(observation)` is called one episode at a time, as at K = 1. An agent with
  per-episode state cannot serve two running episodes, so the harness gives each running episode its
  own copy (`copy.deepcopy`, made once per slot and reused). Model-backed agents (those with
  `last_compute`) are not copied (a model per slot could exhaust memory): their episodes run one at a
  time, interleaved with the batch. `batch_copies = True / False` on the agent overrides that choice;
  an agent that cannot be deep-copied also runs one episode at a time.

At K = 1 (the default) none of this is used: episodes run one after another through `act`.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np

from prunedrive.harness.action import Control
from prunedrive.scenarios.loader import Scenario


@runtime_checkable
class Agent(Protocol):
    name: str

    def reset(self, scenario: Scenario) -> None:
        """Called before each episode."""

    def act(self, observation: dict[str, np.ndarray]) -> Control:
        """The control for this step, from the object-level observation."""


@runtime_checkable
class BatchAgent(Agent, Protocol):
    """An agent that decides the steps of several episodes in one call (used at K > 1 only; see above)."""

    def act_batch(self, observations: list[dict[str, np.ndarray]]) -> list[Control]:
        """One control per observation, same order; called with `slots=[...]` (each observation's slot) as
        well when the agent implements `reset_batch`."""


class AgentHooks(Protocol):
    """The optional hooks besides act_batch: an agent implements any of them, or none. Read through `hook`."""

    batch_copies: bool  # at K > 1 without act_batch: True/False overrides whether each slot gets a deep copy

    def last_compute(self) -> dict[str, float]:
        """Model-backed agents: fields of harness.compute.StepCompute (tokens_in, tokens_out, dense_flops,
        effective_flops, params, nonzero_params, peak_mem_bytes) for their last `act`."""

    def configure_batch(self, capacity: int) -> None:
        """Called once before the first act_batch with K, the most observations any act_batch call gets."""

    def reset_batch(self, slot: int, scenario: Scenario) -> None:
        """Called right after reset(scenario) for the episode that starts in `slot` (0 <= slot < K)."""

    def last_compute_batch(self) -> list[dict[str, float]]:
        """The compute fields of `last_compute()` per row of the last act_batch, already apportioned."""


HOOKS = frozenset({"act_batch", *AgentHooks.__annotations__,
                   *(name for name in vars(AgentHooks) if not name.startswith("_"))})


def hook(agent: Agent, name: str) -> Callable | None:
    """The agent's optional hook `name` (one declared in BatchAgent or AgentHooks), or None when it has none."""
    if name not in HOOKS:
        raise ValueError(f"{name!r} is not a declared agent hook; declared: {', '.join(sorted(HOOKS))}")
    method = getattr(agent, name, None)
    return method if callable(method) else None


def compute_report(agent: Agent) -> dict[str, float]:
    """Model-backed agents expose `last_compute()` (AgentHooks) for their last `act`. Other agents report
    nothing."""
    report = hook(agent, "last_compute")
    return report() if report is not None else {}


def batched(agent: Agent) -> bool:
    """Whether the agent decides many episodes' steps in one call (`act_batch`)."""
    return hook(agent, "act_batch") is not None


def batch_compute_report(agent: Agent, rows: int) -> list[dict[str, float]]:
    """Per-row compute of the agent's last act_batch (`last_compute_batch()`), or nothing per row."""
    report = hook(agent, "last_compute_batch")
    reports = report() if report is not None else None
    return list(reports) if reports is not None and len(reports) == rows else [{} for _ in range(rows)]


def copyable(agent: Agent) -> bool:
    """Whether running episodes of an agent without act_batch may each get their own deep copy."""
    choice = getattr(agent, "batch_copies", None)
    if choice is not None:
        return bool(choice)
    return hook(agent, "last_compute") is None
