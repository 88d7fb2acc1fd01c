"""The action every backend accepts: CARLA's VehicleControl semantics."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gymnasium import spaces

# Order of the action vector.
ACTION_FIELDS = ("throttle", "brake", "steer")
MAX_STEER_RAD = np.pi / 4  # front-wheel angle at steer = 1, in every backend


def action_space() -> spaces.Box:
    return spaces.Box(
        low=np.array([0.0, 0.0, -1.0], np.float32),
        high=np.array([1.0, 1.0, 1.0], np.float32),
        dtype=np.float32,
    )


@dataclass(frozen=True)
class Control:
    """throttle in [0, 1], brake in [0, 1], steer in [-1, 1] (positive steers right)."""

    throttle: float = 0.0
    brake: float = 0.0
    steer: float = 0.0

    def to_array(self) -> np.ndarray:
        return np.array([self.throttle, self.brake, self.steer], np.float32)


@dataclass(frozen=True, eq=False)
class CheckedControl(Control):
    """A Control that `checked_control` made (finite floats in range): the env steps it without checking it
    again, so an action is validated once. Equal to the Control with the same values."""

    def __eq__(self, other):
        if not isinstance(other, Control):
            return NotImplemented
        return (self.throttle, self.brake, self.steer) == (other.throttle, other.brake, other.steer)

    __hash__ = Control.__hash__


BRAKE = Control(throttle=0.0, brake=1.0, steer=0.0)

_RANGES = {"throttle": (0.0, 1.0), "brake": (0.0, 1.0), "steer": (-1.0, 1.0)}


class ActionError(ValueError):
    """An agent returned something that is not a control: the episode fails, the run goes on."""


def checked_control(action, agent: str = "agent", step: int = 0) -> tuple[CheckedControl, bool]:
    """The action as a `Control` inside VehicleControl's ranges, and whether it had to be clamped.

    Accepts a `Control` or three numbers (throttle, brake, steer). Out-of-range values are clamped, as
    CARLA clamps a VehicleControl; a missing, non-numeric or non-finite value raises `ActionError`
    naming the agent, the step and the value."""
    if isinstance(action, Control):
        values = [action.throttle, action.brake, action.steer]
    else:
        try:
            values = list(np.asarray(action, dtype=object).reshape(-1))
        except Exception:  # noqa: BLE001 -- anything not array-like is reported below
            values = []
        if len(values) != 3:
            raise ActionError(f"agent {agent!r}, step {step}: the action must be a Control or (throttle, brake, steer), "
                              f"got {action!r}")
    checked = []
    for name, value in zip(ACTION_FIELDS, values):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ActionError(f"agent {agent!r}, step {step}: {name} must be a number, got {value!r}")
        if not np.isfinite(value):
            raise ActionError(f"agent {agent!r}, step {step}: {name} must be finite, got {value!r}")
        checked.append(float(value))
    clamped = [float(np.clip(v, *_RANGES[n])) for n, v in zip(ACTION_FIELDS, checked)]
    return CheckedControl(*clamped), clamped != checked
