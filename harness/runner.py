"""Run agents x scenarios x seeds closed-loop; write each episode as soon as it ends.

The pieces, each in one place:
  run_episode      the one episode loop (the runner, the dataset rollouts and the benchmarks use it)
  episode_row      the one place the scorer is called: an episode's outcome -> its results row
  run_episode_with_retries   one episode as a run drives it: env cache, simulator retries, failure record
  InProcessExecutor          drives jobs in this process; harness.distributed.RayExecutor on Ray actors
  run_suite        plans the missing episodes of a run directory, feeds an executor, writes each result

An episode row is only ever that episode's own: a failure at any point gives this episode's partial
record (its own steps, km and events, or zeros when the failure came before the env was reset), status
`failed`, the error and the phase it failed in.
"""
from __future__ import annotations

import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pandas as pd

from prunedrive.harness.action import ActionError, checked_control
from prunedrive.harness.agent import Agent, compute_report
from prunedrive.harness.backends.base import SimulatorError
from prunedrive.harness.compute import COMPUTE_FIELDS, aggregate
from prunedrive.harness.env import DriveEnv, EpisodeOutcome
from prunedrive.harness.events import COLLISIONS, EventKind
from prunedrive.harness.results import RunDir, episode_key
from prunedrive.harness.scoring import km_driven, score_episode
from prunedrive.harness.video import VideoWriter
from prunedrive.scenarios.loader import Scenario, Suite

MakeEnv = Callable[..., DriveEnv]
STEP_COLUMNS = ("step", "sim_time_s", "throttle", "brake", "steer", "speed_mps", "route_completion", *COMPUTE_FIELDS)
_MODEL_FIELDS = COMPUTE_FIELDS[3:]  # what a model-backed agent reports per step (harness.compute)
# Generous defaults: a hung agent must not hang the run, a slow 7B model on a CPU must still finish.
STEP_TIMEOUT_S = 300.0      # one reset() or act() of the agent
EPISODE_TIMEOUT_S = 3600.0  # one whole episode, wall time


class AgentTimeout(Exception):
    """The agent ran past a harness time limit: the episode fails (`agent timeout`) and the run goes on."""


@contextmanager
def time_limit(seconds: float | None, what: str):
    """Interrupt the block after `seconds` of wall time with AgentTimeout (SIGALRM: main thread only; elsewhere,
    e.g. in a thread pool, the block runs unlimited and the Ray executor's episode limit is the guard)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise AgentTimeout(f"agent timeout: {what} ran past {seconds:.3g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def default_make_env(scenario: Scenario, record: bool, **backend_options) -> DriveEnv:
    return DriveEnv(scenario, render_mode="rgb_array" if record else None, **backend_options)


@dataclass
class EpisodeTrace:
    """What an episode has produced so far; kept by the caller so a failure keeps the episode's own part."""

    columns: dict[str, list] = field(default_factory=lambda: {name: [] for name in STEP_COLUMNS})
    phase: str = "start"       # where the episode is: agent reset, env reset, act, action, env step, done
    env_reset: bool = False    # the env holds this episode's state (before: it may hold the previous one's)
    clamped_actions: int = 0   # controls outside VehicleControl's ranges, clamped

    def steps(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns)


OnStep = Callable[[dict, Any, dict], None]  # (observation the control was chosen for, control, info)


def run_episode(env: DriveEnv, agent: Agent, scenario: Scenario, seed: int, video_path: Path | None = None, *,
                on_step: OnStep | None = None, max_steps: int | None = None, trace: EpisodeTrace | None = None,
                step_timeout_s: float | None = None, episode_timeout_s: float | None = None,
                ) -> tuple[EpisodeOutcome, pd.DataFrame]:
    """One closed-loop episode. Exceptions propagate; pass a `trace` to keep what was driven before one.
    `max_steps` cuts the episode short (the outcome is then the env's state at the cut). The agent's
    reset() and each act() get at most `step_timeout_s`, and never more than what is left of
    `episode_timeout_s` (AgentTimeout)."""
    trace = trace if trace is not None else EpisodeTrace()
    columns = trace.columns
    deadline = time.monotonic() + episode_timeout_s if episode_timeout_s else None

    def limit(what: str):
        if deadline is None:
            return time_limit(step_timeout_s, what)
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeout(f"agent timeout: the episode ran past its wall limit of {episode_timeout_s:.3g} s")
        return time_limit(min(step_timeout_s or left, left), what)

    trace.phase = "agent reset"
    with limit(f"{agent.name}.reset()"):
        agent.reset(scenario)
    trace.phase = "env reset"
    observation, _ = env.reset(seed=seed)
    trace.env_reset = True
    video = VideoWriter(video_path, fps=env.metadata["render_fps"]) if video_path else None
    try:
        while True:
            trace.phase = "act"
            wall, cpu = time.perf_counter(), time.process_time()
            with limit(f"{agent.name}.act() at step {len(columns['step']) + 1}"):
                answer = agent.act(observation)
            agent_wall_s, agent_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
            report = compute_report(agent)
            trace.phase = "action"
            control, clamped = checked_control(answer, agent=agent.name, step=len(columns["step"]) + 1)
            trace.clamped_actions += clamped
            trace.phase = "env step"
            previous = observation
            observation, _, terminated, truncated, info = env.step(control)
            if video:
                video.add(env.render())
            columns["step"].append(len(columns["step"]) + 1)
            columns["sim_time_s"].append(info["sim_time_s"])
            columns["throttle"].append(control.throttle)
            columns["brake"].append(control.brake)
            columns["steer"].append(control.steer)
            columns["speed_mps"].append(float(observation["ego"][0]))
            columns["route_completion"].append(info["route_completion"])
            columns["agent_wall_s"].append(agent_wall_s)
            columns["agent_cpu_s"].append(agent_cpu_s)
            columns["sim_wall_s"].append(env.last_sim_wall_s)
            for name in _MODEL_FIELDS:
                columns[name].append(report.get(name, np.nan))
            if on_step is not None:
                on_step(previous, control, info)
            if terminated or truncated:
                trace.phase = "done"
                return info["outcome"], trace.steps()
            if max_steps and len(columns["step"]) >= max_steps:
                trace.phase = "done"
                return env.outcome(collision_ended=False), trace.steps()
    finally:
        if video:
            video.close()


def no_outcome(steps: int = 0) -> EpisodeOutcome:
    """The outcome of an episode that failed before its env was reset: nothing driven."""
    return EpisodeOutcome(route_completion=0.0, route_length_m=np.nan, events=[], collision_ended=False,
                          sim_time_s=0.0, efficiency=np.nan, comfort=np.nan, steps=steps)


def episode_row(outcome: EpisodeOutcome | None, steps: pd.DataFrame, *, run_id: str, agent: str,
                scenario: Scenario, seed: int, wall_s: float, error: str | None = None,
                phase: str = "", failure: str = "", clamped_actions: int = 0) -> dict:
    """The episode's results row: Leaderboard scores, infractions, km, compute aggregates. `failure` is
    "agent" (the agent's own code failed: a result) or "infrastructure" (simulator, worker, harness time
    limit: re-run on resume); empty for an episode that ran to its end."""
    outcome = outcome or no_outcome(len(steps))
    score = score_episode(outcome.route_completion, outcome.events, outcome.collision_ended, error)
    row = {
        "run_id": run_id, "agent": agent, "scenario": scenario.name, "kind": scenario.kind, "seed": seed,
        "status": score.status, "driving_score": score.driving_score, "route_completion": score.route_completion,
        "infraction_penalty": score.infraction_penalty, "route_length_m": outcome.route_length_m,
        "km_driven": km_driven(outcome.route_length_m, score.route_completion) if np.isfinite(outcome.route_length_m) else 0.0,
        "sim_time_s": outcome.sim_time_s, "steps": outcome.steps, "wall_s": wall_s,
        "efficiency": outcome.efficiency, "comfort": outcome.comfort,
        "success": score.status == "finished" and all(
            count == 0 for kind, count in score.infractions.items() if kind != EventKind.MIN_SPEED.value),
        "collisions": sum(score.infractions[k.value] for k in COLLISIONS),
        "outside_lanes_m": outcome.outside_lanes_m,
        "events": "; ".join(f"{e.kind.value}@{e.step}" + (f"={e.value:.1f}" if e.value is not None else "")
                            for e in outcome.events),
        "error": error or "", "failed_phase": phase if error else "", "failure": failure if error else "",
        "clamped_actions": int(clamped_actions),
    }
    row.update({f"n_{kind}": count for kind, count in score.infractions.items()})
    row.update(aggregate({name: steps[name].to_numpy() if name in steps else np.array([]) for name in COMPUTE_FIELDS}))
    return row


def run_episode_with_retries(envs: dict, agent, scenario: Scenario, seed: int, *, run_id: str,
                             video: Path | None = None, record: bool = False, retries: int = 2,
                             make_env: MakeEnv = default_make_env, backend_options: dict | None = None,
                             backoff_s: float = 2.0, step_timeout_s: float | None = STEP_TIMEOUT_S,
                             episode_timeout_s: float | None = EPISODE_TIMEOUT_S) -> tuple[dict, pd.DataFrame]:
    """One episode, as a run drives it: the env for `scenario` from `envs` (created on first use); a
    simulator failure closes the env, backs off and retries (up to `retries` times), after which the
    episode is an infrastructure failure; any other exception (the agent's code, a bad action,
    `SystemExit` included; not Ctrl-C) is recorded with its traceback, its phase and the episode's own
    progress. Returns the episode row and its steps (those of a failed episode are kept too); never
    raises for a failing episode."""
    started = time.perf_counter()
    outcome, trace, error, failure = None, EpisodeTrace(), None, ""
    for attempt in range(retries + 1):
        trace = EpisodeTrace()
        try:
            if scenario.name not in envs:
                trace.phase = "env create"
                envs[scenario.name] = make_env(scenario, record, **(backend_options or {}))
            outcome, _ = run_episode(envs[scenario.name], agent, scenario, seed, video, trace=trace,
                                     step_timeout_s=step_timeout_s, episode_timeout_s=episode_timeout_s)
            error = None
            break
        except SimulatorError as exc:
            # Leaderboard's "Simulation crashed": reconnect with back-off, retry the episode.
            error, failure = f"simulator: {exc}", "infrastructure"
            close_quietly(envs.pop(scenario.name, None))
            if attempt < retries:
                time.sleep(backoff_s * 2**attempt)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 -- one failing episode (even its sys.exit) must not stop the run
            error = f"{exc}\n" if isinstance(exc, (ActionError, AgentTimeout)) else traceback.format_exc()
            # A time limit is the harness's, not a result of the agent's: `--resume` runs it again.
            own = trace.phase in ("agent reset", "act", "action") and not isinstance(exc, AgentTimeout)
            failure = "agent" if own else "infrastructure"
            env = envs.get(scenario.name)
            # Only this episode's own state: before its reset the env may still hold the previous episode.
            outcome = env.outcome(collision_ended=False) if trace.env_reset and env is not None else None
            break
    steps = trace.steps()
    row = episode_row(outcome, steps, run_id=run_id, agent=agent.name, scenario=scenario, seed=seed,
                      wall_s=time.perf_counter() - started, error=error, phase=trace.phase, failure=failure,
                      clamped_actions=trace.clamped_actions)
    return row, steps


def close_quietly(env: DriveEnv | None) -> None:
    if env is None:
        return
    try:
        env.close()
    except Exception:  # noqa: BLE001 -- a dead simulator may fail to close; nothing to keep
        pass


@dataclass(frozen=True)
class EpisodeJob:
    agent_index: int
    scenario: Scenario
    seed: int


class Executor(Protocol):
    """Drives episode jobs and yields each result as it ends; in-process or on Ray actors."""

    def names(self) -> list[str]:
        """The agents' names, by index (they name the episodes)."""

    def run(self, jobs: list[EpisodeJob], run_dir: RunDir) -> Iterator[tuple[EpisodeJob, dict, pd.DataFrame]]:
        """(job, row, steps) per job, in any order, each exactly once."""

    def close(self) -> None:
        """Release envs, workers and servers."""


class InProcessExecutor:
    """One env per scenario (created on first use), episodes one after another in this process."""

    def __init__(self, agents: list[Agent], *, record: bool = False, retries: int = 2,
                 make_env: MakeEnv = default_make_env, backend_options: dict | None = None, backoff_s: float = 2.0,
                 step_timeout_s: float | None = STEP_TIMEOUT_S, episode_timeout_s: float | None = EPISODE_TIMEOUT_S):
        self.agents, self.record, self.retries = agents, record, retries
        self.make_env, self.backend_options, self.backoff_s = make_env, backend_options, backoff_s
        self.timeouts = {"step_timeout_s": step_timeout_s, "episode_timeout_s": episode_timeout_s}
        self.envs: dict[str, DriveEnv] = {}

    def names(self) -> list[str]:
        return [agent.name for agent in self.agents]

    def run(self, jobs, run_dir):
        for job in jobs:
            agent = self.agents[job.agent_index]
            row, steps = run_episode_with_retries(
                self.envs, agent, job.scenario, job.seed, run_id=run_dir.path.name,
                video=run_dir.video_path(agent.name, job.scenario.name, job.seed) if self.record else None,
                record=self.record, retries=self.retries, make_env=self.make_env,
                backend_options=self.backend_options, backoff_s=self.backoff_s, **self.timeouts)
            yield job, row, steps

    def close(self) -> None:
        for env in self.envs.values():
            close_quietly(env)
        self.envs.clear()


def run_suite(suite: Suite, agents: list[Agent] | Executor, run_dir: RunDir, *, progress: bool = True,
              retry_failed: bool = False, **executor_options) -> pd.DataFrame:
    """Run every (agent, scenario, seed) episode not yet done in `run_dir` (RunDir.finished: infrastructure
    failures are run again, agent failures too with `retry_failed`); return all episodes. `agents` is a
    list of agents (driven in this process, with `executor_options` of InProcessExecutor) or an executor."""
    executor = InProcessExecutor(agents, **executor_options) if isinstance(agents, list) else agents
    try:
        names = executor.names()
        done = run_dir.finished(retry_failed)
        todo = [EpisodeJob(i, s, seed) for i in range(len(names)) for s, seed in suite.episodes()
                if episode_key(names[i], s.name, seed) not in done]
        with _progress(progress, total=len(todo)) as bar:
            for job, row, steps in executor.run(todo, run_dir):
                run_dir.write_episode(episode_key(names[job.agent_index], job.scenario.name, job.seed), row, steps)
                bar.describe(f"{names[job.agent_index]} {job.scenario.name} seed={job.seed}")
                bar.advance(row)
    finally:
        executor.close()
    run_dir.consolidate()
    return run_dir.episodes()


class _progress:
    """A rich progress bar with the running mean driving score, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.scores = enabled, total, []

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[score]}"))
            self.bar.start()
            self.task = self.bar.add_task("episodes", total=self.total, score="")
        return self

    def describe(self, text: str) -> None:
        if self.enabled:
            self.bar.update(self.task, description=text)

    def advance(self, row: dict) -> None:
        self.scores.append(row["driving_score"])
        if self.enabled:
            self.bar.update(self.task, advance=1, score=f"mean DS {np.mean(self.scores):.1f}")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
