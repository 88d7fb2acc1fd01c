"""The agent protocol: what the runner calls, once per episode and once per step."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

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


def compute_report(agent: Agent) -> dict[str, float]:
    """Model-backed agents expose `last_compute()`: fields of harness.compute.StepCompute
    (tokens_in, tokens_out, dense_flops, effective_flops, params, nonzero_params, peak_mem_bytes)
    for their last `act`. Other agents report nothing."""
    report = getattr(agent, "last_compute", None)
    return report() if callable(report) else {}
