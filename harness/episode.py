"""One closed-loop episode: `Episode` (its per-step bookkeeping: start / act / step / close, the one episode
loop's body, shared by `run_episode` and harness.lockstep) and `run_episode` (one episode, start to end).

The episode talks to its env through `reset`, `step` and their `info` only (harness.env lists the keys), so
the env may be any Gymnasium wrapper around a DriveEnv.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import pandas as pd

from prunedrive.harness.action import checked_control
from prunedrive.harness.agent import Agent, compute_report
from prunedrive.harness.env import EpisodeOutcome, TickControls
from prunedrive.harness.latency import LATENCY_STEP_COLUMNS, LatencyClock, LatencyModel
from prunedrive.harness.limits import AgentTimeout, agent_call
from prunedrive.harness.rows import MODEL_FIELDS, STEP_COLUMNS
from prunedrive.harness.video import VideoWriter, overlay_lines
from prunedrive.scenarios.loader import Scenario

# What an episode asks of its env at reset (harness.env): the outcome so far and the simulator's wall time
# in every step's info.
RUNNER_RESET_OPTIONS = {"outcome_so_far": True, "timings": True}


@dataclass
class EpisodeTrace:
    """What an episode has produced so far; kept by the caller so a failure keeps the episode's own part."""

    columns: dict[str, list] = field(default_factory=lambda: {name: [] for name in STEP_COLUMNS})
    phase: str = "start"       # where the episode is: agent reset, env reset, act, action, env step, done
    env_reset: bool = False    # the env holds this episode's state (before: it may hold the previous one's)
    clamped_actions: int = 0   # controls outside VehicleControl's ranges, clamped
    outcome: EpisodeOutcome | None = None  # the env's last info["outcome"]: the episode so far (once env_reset)

    def steps(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns)


OnStep = Callable[[dict, Any, dict], None]  # (observation the control was chosen for, control, info)


class Episode:
    """One closed-loop episode's state and per-step bookkeeping: the single episode loop's body, shared by
    `run_episode` (one episode, start to end) and `Lockstep` (many episodes side by side, whose agent may
    decide all their steps in one call). start() resets the agent and the env; act() asks the agent alone;
    step(answer, ...) checks the control, steps the env and records the step's row; close() ends the video.
    Exceptions propagate, with `trace.phase` saying where they came from."""

    def __init__(self, env: gym.Env, agent: Agent, scenario: Scenario, seed: int, video_path: Path | None = None,
                 *, on_step: OnStep | None = None, max_steps: int | None = None, trace: EpisodeTrace | None = None,
                 step_timeout_s: float | None = None, episode_timeout_s: float | None = None,
                 catch_exit: bool = False, latency: LatencyModel | None = None):
        self.env, self.agent, self.scenario, self.seed, self.video_path = env, agent, scenario, seed, video_path
        self.latency = latency  # None: the synchronous loop; else harness.latency's semantics (a LatencyClock)
        self.clock: LatencyClock | None = None
        self.on_step, self.max_steps = on_step, max_steps
        self.trace = trace if trace is not None else EpisodeTrace()
        self.step_timeout_s, self.episode_timeout_s = step_timeout_s, episode_timeout_s
        self.catch_exit = catch_exit  # exits_raise around the agent's calls (in the run's own process)
        self.deadline = time.monotonic() + episode_timeout_s if episode_timeout_s else None
        self.observation: dict | None = None
        self.outcome: EpisodeOutcome | None = None
        self.video: VideoWriter | None = None

    def time_left(self) -> float | None:
        """Seconds the agent may still spend on one call: the step limit, within the episode's wall limit
        (AgentTimeout once that is spent); None: unlimited."""
        if self.deadline is None:
            return self.step_timeout_s
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeout(f"agent timeout: the episode ran past its wall limit of {self.episode_timeout_s:.3g} s")
        return min(self.step_timeout_s or left, left)

    def limit(self, what: str):
        return agent_call(self.time_left(), what, self.catch_exit)

    @property
    def steps_done(self) -> int:
        return len(self.trace.columns["step"])

    def start(self) -> None:
        self.trace.phase = "agent reset"
        with self.limit(f"{self.agent.name}.reset()"):
            self.agent.reset(self.scenario)
        self.trace.phase = "env reset"
        self.observation, info = self.env.reset(seed=self.seed, options=RUNNER_RESET_OPTIONS)
        self.trace.env_reset, self.trace.outcome = True, info["outcome"]
        if self.latency is not None:
            if info["ticks_per_step"] is None:
                from prunedrive.harness.backends import backend_for_kind

                raise ValueError(f"--latency {self.latency.spec}: the {backend_for_kind(self.scenario.kind)} backend "
                                 "does not step per simulator tick; latency models need one that does (highway, carla)")
            self.clock = LatencyClock(self.latency, float(info["tick_s"]), int(info["ticks_per_step"]))
            for name in LATENCY_STEP_COLUMNS:
                self.trace.columns.setdefault(name, [])
        if self.video_path:
            self.video = VideoWriter(self.video_path, fps=self.env.metadata["render_fps"])

    def act(self) -> tuple[Any, float, float, dict]:
        """Ask the agent alone for this step: (its answer, agent wall s, agent CPU s, its compute report)."""
        self.trace.phase = "act"
        wall, cpu = time.perf_counter(), time.process_time()
        with self.limit(f"{self.agent.name}.act() at step {self.steps_done + 1}"):
            answer = self.agent.act(self.observation)
        agent_wall_s, agent_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        return answer, agent_wall_s, agent_cpu_s, compute_report(self.agent)

    def free(self) -> bool:
        """Whether the agent reads this step's observation (always, without a latency model)."""
        return self.clock is None or self.clock.free()

    def next(self) -> bool:
        """This step, alone: the agent's answer when it is free, else the held control(s); True once ended."""
        return self.step(*self.act()) if self.free() else self.wait()

    def step(self, answer: Any, agent_wall_s: float, agent_cpu_s: float, report: dict, batch_size: int = 1) -> bool:
        """Apply the agent's answer for this step and record it; True once the episode has ended (`outcome`).
        Under a latency model the answer is scheduled (harness.latency) and the step drives what holds."""
        trace = self.trace
        trace.phase = "action"
        control, clamped = checked_control(answer, agent=self.agent.name, step=self.steps_done + 1)
        trace.clamped_actions += clamped
        decision = self.clock.decide(control, report, agent_wall_s) if self.clock is not None else None
        return self._advance(control, decision, agent_wall_s, agent_cpu_s, report, batch_size)

    def wait(self) -> bool:
        """A step the agent is still busy in (latency models only): the env drives the held control(s)."""
        return self._advance(None, None, np.nan, np.nan, {}, 0)

    def _advance(self, control, decision, agent_wall_s: float, agent_cpu_s: float, report: dict,
                 batch_size: int) -> bool:
        trace, columns = self.trace, self.trace.columns
        trace.phase = "env step"
        previous = self.observation
        if self.clock is None:
            self.observation, _, terminated, truncated, info = self.env.step(control)
        else:
            controls, stale_ticks = self.clock.tick_controls()
            self.observation, _, terminated, truncated, info = self.env.step(TickControls(controls))
            control = controls[-1]  # the step row records the control in effect at its end
            timing = {"decided": decision is not None, "latency_s": decision.latency_s if decision else np.nan,
                      "effect_tick": decision.effect_tick if decision else -1, "ticks": len(controls),
                      "stale_ticks": stale_ticks}
        trace.outcome = info["outcome"]
        if self.video:
            self.video.add(self.env.render(), overlay_lines(
                self.agent.name, info["sim_time_s"], float(self.observation["ego"][0]), control.throttle, control.brake,
                control.steer, info["route_completion"], info["infractions"]))
        columns["step"].append(len(columns["step"]) + 1)
        columns["sim_time_s"].append(info["sim_time_s"])
        columns["throttle"].append(control.throttle)
        columns["brake"].append(control.brake)
        columns["steer"].append(control.steer)
        columns["speed_mps"].append(float(self.observation["ego"][0]))
        columns["route_completion"].append(info["route_completion"])
        columns["agent_wall_s"].append(agent_wall_s)
        columns["agent_cpu_s"].append(agent_cpu_s)
        columns["sim_wall_s"].append(info["sim_wall_s"])
        for name in MODEL_FIELDS:
            columns[name].append(report.get(name, np.nan))
        columns["batch_size"].append(batch_size)
        if self.clock is not None:  # after the video: a row is appended to every column or to none
            for name, value in timing.items():
                columns[name].append(value)
        if self.on_step is not None:
            self.on_step(previous, control, info)
        if terminated or truncated or (self.max_steps and len(columns["step"]) >= self.max_steps):
            trace.phase = "done"
            self.outcome = info["outcome"]  # cut short by max_steps: the episode so far
            return True
        return False

    def close(self) -> None:
        if self.video:
            self.video.close()
            self.video = None


def run_episode(env: gym.Env, agent: Agent, scenario: Scenario, seed: int, video_path: Path | None = None, *,
                on_step: OnStep | None = None, max_steps: int | None = None, trace: EpisodeTrace | None = None,
                step_timeout_s: float | None = None, episode_timeout_s: float | None = None,
                catch_exit: bool = False, latency: LatencyModel | None = None) -> tuple[EpisodeOutcome, pd.DataFrame]:
    """One closed-loop episode (`latency`: harness.latency's model; None: the synchronous loop). Exceptions
    propagate; pass a `trace` to keep what was driven before one.
    `max_steps` cuts the episode short (the outcome is then the env's state at the cut). The agent's
    reset() and each act() get at most `step_timeout_s`, and never more than what is left of
    `episode_timeout_s` (AgentTimeout); with `catch_exit`, its os._exit raises AgentExit (exits_raise)."""
    episode = Episode(env, agent, scenario, seed, video_path, on_step=on_step, max_steps=max_steps, trace=trace,
                      step_timeout_s=step_timeout_s, episode_timeout_s=episode_timeout_s, catch_exit=catch_exit,
                      latency=latency)
    episode.start()
    try:
        while not episode.next():
            pass
        return episode.outcome, episode.trace.steps()
    finally:
        episode.close()
