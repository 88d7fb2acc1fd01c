"""The Gymnasium environment: one scenario on one backend, object-level observations,
CARLA-style continuous control, Leaderboard events in `info`.

The runner talks to the env through `reset`, `step` and `info` only (and `render`/`metadata` for videos), so any
Gymnasium wrapper can sit between them (Gymnasium 1.x wrappers forward no other attribute): a run makes its envs
with a `make_env(scenario, record, **backend_options)` hook (harness.env_pool; `run_suite(..., make_env=...)`),
which may return the DriveEnv wrapped. Two reset options (off by default: Gymnasium's env checker wants equal info for equal seeds and actions, and a
timing differs run to run, an outcome's NaN never equals itself) add what a runner keeps for every step:
reset(seed=..., options={"outcome_so_far": True, "timings": True}). The keys:

reset() info
  route_length_m   the route's length
  sim_time_s       simulated time at the start
  outcome          ("outcome_so_far") the EpisodeOutcome so far, nothing driven yet: what a run scores if the
                   episode fails now
  tick_s           one simulator tick, in seconds
  ticks_per_step   simulator ticks per env step for a backend that can take a control per tick (step with
                   `TickControls`: harness.latency's models), else None
step() info
  events           the route events of this step (at the end, also those that finishing the route adds)
  route_completion route completion in %, after this step
  sim_time_s       simulated time after this step
  outcome          at the step that ends the episode, the final EpisodeOutcome (the scorer's input); at every
                   other step ("outcome_so_far") the episode so far, as it would be scored if it ended now
  infractions      how many infraction events (harness.metrics.INFRACTIONS) the route has so far (video overlay)
  sim_wall_s       ("timings") wall seconds the simulator spent in this step
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from prunedrive.harness.action import CheckedControl, action_space, checked_control
from prunedrive.harness.backends.base import Backend, BackendState, backend_hook
from prunedrive.harness.criteria import RouteCriteria
from prunedrive.harness.events import COLLISIONS, Event
from prunedrive.harness.metrics import INFRACTIONS
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


class TickControls(tuple):
    """An action of one env step that is one checked control (harness.action) per simulator tick, in order
    (harness.latency: controls that take effect between policy steps); only for a backend whose reset info
    has `ticks_per_step`."""


def make_backend(scenario: Scenario, render: bool = False, **options) -> Backend:
    """The scenario's backend (harness.backends: built-in or plug-in); `options` go to its constructor. The
    scenario's kind and options are checked against what the backend declares, however the scenario was loaded."""
    from prunedrive.harness.backends import backend_class, check_scenario

    return backend_class(check_scenario(scenario, f"scenario {scenario.name!r}"))(scenario, render=render, **options)


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
        self._timings = self._outcome_so_far = False

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
        duration_s = math.inf if backend_hook(self.backend, "route_timeout_s") is not None else self.scenario.duration_s
        self.criteria = RouteCriteria(route, self.backend.dt, duration_s, self.scenario.blocked_s,
                                      self.scenario.deviation_m)
        self.criteria.locate(state)
        self._step = 0
        self._collided = False
        self._done = False
        options = options or {}
        self._timings, self._outcome_so_far = bool(options.get("timings")), bool(options.get("outcome_so_far"))
        self._state = state
        info = {"route_length_m": route.length, "sim_time_s": state.sim_time_s, "tick_s": float(self.backend.dt),
                "ticks_per_step": self.ticks_per_step}
        if self._outcome_so_far:
            info["outcome"] = self.outcome(collision_ended=False)
        return self._observe(state), info

    def step(self, action):
        """`action`: a Control or (throttle, brake, steer), checked here unless checked_control made it (the
        runner checks its agents' answers itself, to name the agent); or `TickControls`."""
        if self.criteria is None or self._done:
            raise RuntimeError("call reset() before step(), and again after an episode ends")
        if isinstance(action, TickControls):
            return self.step_ticks(action)
        control = action if isinstance(action, CheckedControl) else checked_control(
            action, agent="env.step", step=self._step + 1)[0]
        return self._advance(lambda: self.backend.step(control))

    @property
    def ticks_per_step(self) -> int | None:
        """Simulator ticks per env step, for a backend that steps per tick (`step_ticks`); else None."""
        if backend_hook(self.backend, "step_ticks") is None:
            return None
        return backend_hook(self.backend, "ticks_per_step")

    def step_ticks(self, controls: list):
        """One env step with a control per simulator tick (harness.latency: controls that take effect between
        policy steps); otherwise exactly `step`. Controls are checked (harness.action) by the caller."""
        if self.criteria is None or self._done:
            raise RuntimeError("call reset() before step_ticks(), and again after an episode ends")
        if self.ticks_per_step is None:
            from prunedrive.harness.backends import backend_for_kind

            raise ValueError(f"the {backend_for_kind(self.scenario.kind)} backend does not step per simulator tick; "
                             "latency models (--latency other than none) need one that does (highway, carla)")
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
        info = {"events": events, "route_completion": completion, "sim_time_s": state.sim_time_s}
        if terminated or truncated:
            info["events"] = events + self.criteria.finish(self._step)
            info["outcome"] = self.outcome(collision_ended=step_events.ended and self._collided)
            self._done = True
        elif self._outcome_so_far:
            info["outcome"] = self.outcome(collision_ended=False)
        info["infractions"] = sum(e.kind.value in INFRACTIONS for e in self.criteria.events)
        if self._timings:
            info["sim_wall_s"] = sim_wall_s
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
