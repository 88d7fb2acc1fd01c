"""Trivial baselines for contrast: they ignore the scene."""
from __future__ import annotations

import zlib

import numpy as np

from prunedrive.harness.action import Control
from prunedrive.scenarios.loader import Scenario


class ConstantAgent:
    """Fixed throttle, wheel straight: drives into whatever is ahead and off any curve."""

    name = "constant"

    def __init__(self, throttle: float = 0.5):
        self.control = Control(throttle=throttle)

    def reset(self, scenario: Scenario) -> None:
        pass

    def act(self, observation) -> Control:
        return self.control


class RandomAgent:
    """Uniform random controls, seeded per scenario so runs repeat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def reset(self, scenario: Scenario) -> None:
        self.rng = np.random.default_rng([self.seed, zlib.crc32(scenario.name.encode())])

    def act(self, observation) -> Control:
        throttle, brake, steer = self.rng.uniform((0, 0, -1), (1, 1, 1))
        return Control(throttle=float(throttle), brake=float(brake), steer=float(steer))
