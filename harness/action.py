"""The action every backend accepts: CARLA's VehicleControl semantics."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gymnasium import spaces

# Order of the action vector.
ACTION_FIELDS = ("throttle", "brake", "steer")


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

    @classmethod
    def from_array(cls, action) -> "Control":
        a = np.asarray(action, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action must be finite, got {a.tolist()}")
        return cls(
            throttle=float(np.clip(a[0], 0.0, 1.0)),
            brake=float(np.clip(a[1], 0.0, 1.0)),
            steer=float(np.clip(a[2], -1.0, 1.0)),
        )

    def to_array(self) -> np.ndarray:
        return np.array([self.throttle, self.brake, self.steer], np.float32)


BRAKE = Control(throttle=0.0, brake=1.0, steer=0.0)
