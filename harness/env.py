"""The Gymnasium environment: one scenario on one backend, object-level observations,
CARLA-style continuous control, Leaderboard events in `info`."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from prunedrive.harness.action import action_space, checked_control
from prunedrive.harness.backends.base import Backend, BackendState
from prunedrive.harness.criteria import RouteCriteria
from prunedrive.harness.events import COLLISIONS, Event
from prunedrive.harness.observation import build_observation, observation_space
from prunedrive.harness.route import RoutePolyline
from prunedrive.scenarios.loader import Scenario


@dataclass
class EpisodeOutcome:
    """What the scorer needs at the end of an episode; the env's last `info["outcome"]`."""

    route_completion: float
    route_length_m: float
    events: list[Event]
    collision_ended: bool
    sim_time_s: float
    efficiency: float
    comfort: float
    steps: int
    outside_lanes_m: float = 0.0


def make_backend(scenario: Scenario, render: bool = False, **options) -> Backend:
    """The scenario's backend (harness.backends: built-in or plug-in); `options` go to its constructor."""
    from prunedrive.harness.backends import backend_class

    return backend_class(scenario.backend)(scenario, render=render, **options)


class DriveEnv(gym.Env):
    """Drive one scenario's route. `reset(seed=...)` picks the traffic; the route is the scenario's.

    terminated: the route is finished, the ego crashed and the simulator stopped it, or a
    route-ending criterion fired (deviation, blocked). truncated: the route timeout.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, scenario: Scenario, backend: Backend | None = None, render_mode: str | None = None,
                 **backend_options):
        self.scenario = scenario
        self.render_mode = render_mode
        self.backend = backend or make_backend(scenario, render=render_mode == "rgb_array", **backend_options)
        self.observation_space = observation_space()
        self.action_space = action_space()
        self.metadata = {**self.metadata, "render_fps": int(round(1.0 / self.backend.dt))}
        self.criteria: RouteCriteria | None = None
        self._step = 0
        self._collided = False
        self._done = False

    def _observe(self, state: BackendState) -> dict[str, np.ndarray]:
        c = self.criteria
        return build_observation(state.ego, c.route.ahead(c.segment), c.heading_error, c.lateral_m,
                                 c.remaining_m, state.objects)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        episode_seed = int(self.np_random.integers(2**31 - 1)) if seed is None else int(seed)
        state = self.backend.reset(episode_seed)
        route = RoutePolyline(self.backend.route_polyline())
        # A backend that keeps the Leaderboard's own route timeout (CARLA) ends the route itself.
        duration_s = math.inf if hasattr(self.backend, "route_timeout_s") else self.scenario.duration_s
        self.criteria = RouteCriteria(route, self.backend.dt, duration_s, self.scenario.blocked_s,
                                      self.scenario.deviation_m)
        self.criteria.locate(state)
        self._step = 0
        self._collided = False
        self._done = False
        self._state = state
        return self._observe(state), {"route_length_m": route.length, "sim_time_s": state.sim_time_s}

    def step(self, action):
        if self.criteria is None or self._done:
            raise RuntimeError("call reset() before step(), and again after an episode ends")
        control, _ = checked_control(action, agent="env.step", step=self._step + 1)
        return self._advance(lambda: self.backend.step(control))

    @property
    def ticks_per_step(self) -> int | None:
        """Simulator ticks per env step, for a backend that steps per tick (`step_ticks`); else None."""
        return getattr(self.backend, "ticks_per_step", None) if hasattr(self.backend, "step_ticks") else None

    def step_ticks(self, controls: list):
        """One env step with a control per simulator tick (harness.latency: controls that take effect between
        policy steps); otherwise exactly `step`. Controls are checked (harness.action) by the caller."""
        if self.criteria is None or self._done:
            raise RuntimeError("call reset() before step_ticks(), and again after an episode ends")
        if self.ticks_per_step is None:
            raise ValueError(f"the {self.scenario.backend} backend does not step per simulator tick; latency "
                             "models (--latency other than none) need one that does (highway)")
        return self._advance(lambda: self.backend.step_ticks(list(controls)))

    def _advance(self, backend_step):
        previous = self.criteria.route_completion
        started = time.perf_counter()
        state, step_events = backend_step()
        sim_wall_s = time.perf_counter() - started
        self._step += 1
        self._state = state
        events = self.criteria.update(state, self._step, step_events.events)
        self._collided = self._collided or any(e.kind in COLLISIONS for e in events)
        completion = self.criteria.route_completion
        terminated = completion >= 100.0 or step_events.ended or self.criteria.stopped
        truncated = self.criteria.timed_out and not terminated
        self.last_sim_wall_s = sim_wall_s  # kept out of `info`: timings differ run to run
        info = {"events": events, "route_completion": completion, "sim_time_s": state.sim_time_s}
        if terminated or truncated:
            info["events"] = events + self.criteria.finish(self._step)
            info["outcome"] = self.outcome(collision_ended=step_events.ended and self._collided)
            self._done = True
        reward = (completion - previous) / 100.0  # route progress; the harness scores with the Leaderboard
        return self._observe(state), float(reward), bool(terminated), bool(truncated), info

    def outcome(self, collision_ended: bool) -> EpisodeOutcome:
        c = self.criteria
        return EpisodeOutcome(
            route_completion=c.route_completion, route_length_m=c.route.length, events=list(c.events),
            collision_ended=collision_ended, sim_time_s=self._state.sim_time_s, efficiency=c.efficiency,
            comfort=c.comfort, steps=self._step, outside_lanes_m=c.outside_m,
        )

    def render(self):
        return self.backend.render()

    def close(self):
        self.backend.close()


def make_drive_env(scenario: Scenario | str, **kwargs) -> DriveEnv:
    """The entry point of `prunedrive/Drive-v0` (registered by `import prunedrive`): `scenario` is a
    `Scenario` or "SUITE/SCENARIO", a suite name or YAML path and one of its scenarios' names."""
    if isinstance(scenario, str):
        from prunedrive.scenarios.loader import load_scenario

        scenario = load_scenario(scenario)
    return DriveEnv(scenario, **kwargs)
