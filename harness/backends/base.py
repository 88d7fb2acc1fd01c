"""The interface between the simulator-neutral env and a simulator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from prunedrive.harness.action import Control
from prunedrive.harness.events import StepEvents
from prunedrive.harness.observation import EgoState, WorldObjects


@dataclass
class BackendState:
    """What a backend reads off its simulator after a reset or a step (world frame)."""

    ego: EgoState
    objects: WorldObjects
    outside_route_lanes: bool = False  # ego off the road or in a lane of the opposite direction
    sim_time_s: float = 0.0


class Backend(Protocol):
    """A simulator behind the env. Backends report state and events; they never score."""

    dt: float  # simulated seconds per env step

    def reset(self, seed: int) -> BackendState: ...

    def route_polyline(self) -> np.ndarray:
        """World-frame (n, 2) points of the route set up by the last reset, start to goal."""
        ...

    def step(self, control: Control) -> tuple[BackendState, StepEvents]: ...

    def render(self) -> np.ndarray | None:
        """An RGB frame (H, W, 3) uint8 of the current state, or None when not available."""
        ...

    def close(self) -> None: ...


class SimulatorError(RuntimeError):
    """The simulator failed (crashed, timed out): the episode is `failed: simulator`."""
