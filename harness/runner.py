"""Run agents x scenarios x seeds closed-loop; write each episode as soon as it ends.

The pieces, each in one place:
  Episode          one episode's per-step bookkeeping (start / act / step / close): the one episode loop's body
  run_episode      the one episode loop over an Episode (the runner, the dataset rollouts and the benchmarks use it)
  episode_row      the one place the scorer is called: an episode's outcome -> its results row
  run_episode_with_retries   one episode as a run drives it: env cache, simulator retries, failure record
  Lockstep         K episodes side by side, stepped together over their Episodes; the agent decides all
                   their steps in one call when it implements act_batch (harness.agent: the protocol)
  InProcessExecutor          drives jobs in this process (batch=K: in lockstep); harness.distributed.RayExecutor
                             on Ray actors
  run_suite        plans the missing episodes of a run directory, feeds an executor, writes each result

An episode row is only ever that episode's own: a failure at any point gives this episode's partial
record (its own steps, km and events, or zeros when the failure came before the env was reset), status
`failed`, the error and the phase it failed in.
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pandas as pd

from prunedrive.harness.action import ActionError, checked_control
from prunedrive.harness.agent import Agent, batch_compute_report, batched, compute_report, copyable
from prunedrive.harness.backends.base import SimulatorError
from prunedrive.harness.compute import COMPUTE_FIELDS, aggregate
from prunedrive.harness.env import DriveEnv, EpisodeOutcome
from prunedrive.harness.events import COLLISIONS, EventKind
from prunedrive.harness.latency import LATENCY_STEP_COLUMNS, LatencyClock, LatencyModel, latency_metrics
from prunedrive.harness.metrics import INFRACTIONS
from prunedrive.harness.results import RunDir, episode_key
from prunedrive.harness.scoring import km_driven, score_episode
from prunedrive.harness.video import VideoWriter, overlay_lines
from prunedrive.scenarios.loader import Scenario, Suite

_log = logging.getLogger(__name__)
MakeEnv = Callable[..., DriveEnv]
STEP_COLUMNS = ("step", "sim_time_s", "throttle", "brake", "steer", "speed_mps", "route_completion", *COMPUTE_FIELDS,
                "batch_size")  # batch_size: how many episodes' steps the agent decided in the call (1: alone)
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


class AgentExit(SystemExit):
    """os._exit() called by an agent inside a guarded call (`exits_raise`): raised instead, so that, like its
    sys.exit(), it fails its own episode, not the run."""


@contextmanager
def exits_raise(what: str):
    """Within the block, os._exit(code) called from this thread of this process raises AgentExit instead of
    ending the process on the spot (no results written, the exit status the agent's, a run's planned
    episodes silently unscored). Another thread's call, or a forked child's, still exits. os._exit is
    restored after the block. Only for agents in the run's own process: a Ray worker leaves it off, so that
    a worker that dies is seen (and its episode re-run) as a dead worker. Code that kept its own reference
    to os._exit (`from os import _exit`) is not caught."""
    real_exit, pid, thread = os._exit, os.getpid(), threading.get_ident()

    def guarded_exit(code: int) -> None:
        if os.getpid() != pid or threading.get_ident() != thread:
            real_exit(code)
        raise AgentExit(f"{what} called os._exit({code})")

    os._exit = guarded_exit
    try:
        yield
    finally:
        os._exit = real_exit


@contextmanager
def agent_call(seconds: float | None, what: str, catch_exit: bool):
    """The guards around one call into an agent: its time limit, and (`catch_exit`) os._exit raising."""
    with time_limit(seconds, what), (exits_raise(what) if catch_exit else nullcontext()):
        yield


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


class Episode:
    """One closed-loop episode's state and per-step bookkeeping: the single episode loop's body, shared by
    `run_episode` (one episode, start to end) and `Lockstep` (many episodes side by side, whose agent may
    decide all their steps in one call). start() resets the agent and the env; act() asks the agent alone;
    step(answer, ...) checks the control, steps the env and records the step's row; close() ends the video.
    Exceptions propagate, with `trace.phase` saying where they came from."""

    def __init__(self, env: DriveEnv, agent: Agent, scenario: Scenario, seed: int, video_path: Path | None = None,
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
        self.observation, _ = self.env.reset(seed=self.seed)
        self.trace.env_reset = True
        if self.latency is not None:
            if self.env.ticks_per_step is None:
                raise ValueError(f"--latency {self.latency.spec}: the {self.scenario.backend} backend does not step "
                                 "per simulator tick; latency models need one that does (highway, carla)")
            self.clock = LatencyClock(self.latency, float(self.env.backend.dt), int(self.env.ticks_per_step))
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
            self.observation, _, terminated, truncated, info = self.env.step_ticks(controls)
            control = controls[-1]  # the step row records the control in effect at its end
            timing = {"decided": decision is not None, "latency_s": decision.latency_s if decision else np.nan,
                      "effect_tick": decision.effect_tick if decision else -1, "ticks": len(controls),
                      "stale_ticks": stale_ticks}
        if self.video:
            criteria = self.env.criteria
            self.video.add(self.env.render(), overlay_lines(
                self.agent.name, info["sim_time_s"], float(self.observation["ego"][0]), control.throttle, control.brake,
                control.steer, info["route_completion"], sum(e.kind.value in INFRACTIONS for e in criteria.events)))
        columns["step"].append(len(columns["step"]) + 1)
        columns["sim_time_s"].append(info["sim_time_s"])
        columns["throttle"].append(control.throttle)
        columns["brake"].append(control.brake)
        columns["steer"].append(control.steer)
        columns["speed_mps"].append(float(self.observation["ego"][0]))
        columns["route_completion"].append(info["route_completion"])
        columns["agent_wall_s"].append(agent_wall_s)
        columns["agent_cpu_s"].append(agent_cpu_s)
        columns["sim_wall_s"].append(self.env.last_sim_wall_s)
        for name in _MODEL_FIELDS:
            columns[name].append(report.get(name, np.nan))
        columns["batch_size"].append(batch_size)
        if self.clock is not None:  # after the video: a row is appended to every column or to none
            for name, value in timing.items():
                columns[name].append(value)
        if self.on_step is not None:
            self.on_step(previous, control, info)
        if terminated or truncated:
            trace.phase = "done"
            self.outcome = info["outcome"]
            return True
        if self.max_steps and len(columns["step"]) >= self.max_steps:
            trace.phase = "done"
            self.outcome = self.env.outcome(collision_ended=False)
            return True
        return False

    def close(self) -> None:
        if self.video:
            self.video.close()
            self.video = None


def run_episode(env: DriveEnv, agent: Agent, scenario: Scenario, seed: int, video_path: Path | None = None, *,
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
    if "decided" in steps:  # a latency model drove it (harness.latency)
        row.update(latency_metrics({name: steps[name].to_numpy() for name in LATENCY_STEP_COLUMNS},
                                   1.0 / scenario.policy_hz, outcome.sim_time_s))
    return row


def run_episode_with_retries(envs: dict, agent, scenario: Scenario, seed: int, *, run_id: str,
                             video: Path | None = None, record: bool = False, retries: int = 2,
                             make_env: MakeEnv = default_make_env, backend_options: dict | None = None,
                             backoff_s: float = 2.0, step_timeout_s: float | None = STEP_TIMEOUT_S,
                             episode_timeout_s: float | None = EPISODE_TIMEOUT_S,
                             catch_exit: bool = False, latency: LatencyModel | None = None) -> tuple[dict, pd.DataFrame]:
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
                                     step_timeout_s=step_timeout_s, episode_timeout_s=episode_timeout_s,
                                     catch_exit=catch_exit, latency=latency)
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
            error, failure = classify_failure(exc, trace)
            outcome = partial_outcome(envs.get(scenario.name), trace)
            break
    steps = trace.steps()
    row = episode_row(outcome, steps, run_id=run_id, agent=agent.name, scenario=scenario, seed=seed,
                      wall_s=time.perf_counter() - started, error=error, phase=trace.phase, failure=failure,
                      clamped_actions=trace.clamped_actions)
    return row, steps


def classify_failure(exc: BaseException, trace: EpisodeTrace) -> tuple[str, str]:
    """(error text, failure kind) of an episode that raised `exc` (not a SimulatorError) in `trace.phase`;
    call it inside the `except` block (it formats the active traceback)."""
    error = f"{exc}\n" if isinstance(exc, (ActionError, AgentTimeout)) else traceback.format_exc()
    # A time limit is the harness's, not a result of the agent's: `--resume` runs it again.
    own = trace.phase in ("agent reset", "act", "action") and not isinstance(exc, AgentTimeout)
    return error, "agent" if own else "infrastructure"


def partial_outcome(env: DriveEnv | None, trace: EpisodeTrace) -> EpisodeOutcome | None:
    """A failed episode's own outcome so far: only this episode's state (before its reset the env may still
    hold the previous episode), or None."""
    return env.outcome(collision_ended=False) if trace.env_reset and env is not None else None


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


@dataclass(eq=False)
class _Running:
    """One job in a lockstep batch, as a run drives it: the lockstep counterpart of run_episode_with_retries."""

    job: EpisodeJob
    agent: Agent       # the instance serving it: the agent itself (act_batch) or this slot's copy
    slot: int          # 0 <= slot < K, stable while the episode runs (reset_batch / act_batch slots)
    run_id: str
    video: Path | None
    started: float = field(default_factory=time.perf_counter)
    attempt: int = 0
    env: DriveEnv | None = None
    episode: Episode | None = None
    trace: EpisodeTrace = field(default_factory=EpisodeTrace)
    outcome: EpisodeOutcome | None = None
    error: str | None = None
    failure: str = ""
    limit_s: float | None = None
    ended: bool = False


def _raise(exc: BaseException):
    raise exc


class Lockstep:
    """Up to `batch` episodes side by side in this process, stepped together (harness.agent explains what
    agents see). Each running episode has its own env, taken from a pool of free envs per scenario (created
    on first use, returned when the episode ends, closed after a simulator failure), its own key, retries,
    failure record and time limits, exactly as run_episode_with_retries gives one episode: the per-step
    bookkeeping is Episode's, the failure rules are classify_failure's.

    Per lockstep step, the running episodes are grouped by agent instance: an agent with act_batch is asked
    once for all of its episodes (its wall and CPU time apportioned to them by the rows' FLOPs when the agent
    reports them per row, else equally; its FLOPs as it reports them per row; `batch_size` = the rows of
    the call); any other agent is asked episode by episode. An episode's wall time (`wall_s`) and episode
    time limit count the whole time it was running, its neighbours' steps included.

        lock = Lockstep(agents, 8)
        lock.add(job, run_id)            # queued; started by the next advance() when a slot is free
        for job, row, steps in lock.advance(): ...   # one step of every running episode; those that ended
    """

    def __init__(self, agents: list[Agent], batch: int, *, record: bool = False, retries: int = 2,
                 make_env: MakeEnv = default_make_env, backend_options: dict | None = None, backoff_s: float = 2.0,
                 step_timeout_s: float | None = STEP_TIMEOUT_S, episode_timeout_s: float | None = EPISODE_TIMEOUT_S,
                 catch_exit: bool = False, latency: LatencyModel | None = None):
        if batch < 1:
            raise ValueError(f"--batch must be at least 1, got {batch}")
        self.agents, self.batch, self.record, self.retries = list(agents), batch, record, retries
        self.catch_exit = catch_exit  # exits_raise around the agents' calls (in the run's own process)
        self.make_env, self.backend_options, self.backoff_s = make_env, backend_options or {}, backoff_s
        # Every Episode's options: its time limits and latency model (None: the synchronous loop).
        self.timeouts = {"step_timeout_s": step_timeout_s, "episode_timeout_s": episode_timeout_s, "latency": latency}
        self.free_envs: dict[str, list[DriveEnv]] = {}
        self.pending: deque[tuple[EpisodeJob, str, Path | None]] = deque()
        self.running: list[_Running] = []
        self.ended: list[tuple[EpisodeJob, dict, pd.DataFrame]] = []
        self.free_slots = list(range(batch))
        self.spares: dict[int, list[Agent]] = {i: [agent] for i, agent in enumerate(self.agents)}
        self.instances = {i: 1 for i in range(len(self.agents))}
        self.configured: set[int] = set()
        self.fallbacks = 0  # act_batch calls that raised and were answered episode by episode

    # -- queue -----------------------------------------------------------------------------------------
    def add(self, job: EpisodeJob, run_id: str, video: Path | None = None) -> None:
        self.pending.append((job, run_id, video))

    def room(self) -> int:
        """How many more jobs to add now to keep `batch` episodes running."""
        return self.batch - len(self.running) - len(self.pending)

    def busy(self) -> bool:
        return bool(self.running or self.pending or self.ended)

    def advance(self) -> list[tuple[EpisodeJob, dict, pd.DataFrame]]:
        """Start queued jobs into free slots, step every running episode once; (job, row, steps) of each
        episode that ended (never raises for a failing episode)."""
        self._start_pending()
        if self.running:
            self._step_all()
        ended, self.ended = self.ended, []
        return ended

    def close(self) -> None:
        for run in self.running:
            if run.episode is not None:
                run.episode.close()
            close_quietly(run.env)
        for envs in self.free_envs.values():
            for env in envs:
                close_quietly(env)
        self.free_envs.clear()

    # -- episodes --------------------------------------------------------------------------------------
    def _instance(self, index: int) -> Agent | None:
        """The agent instance for a new episode of agent `index`, or None: none free now."""
        agent = self.agents[index]
        if batched(agent):
            if index not in self.configured:
                configure = getattr(agent, "configure_batch", None)
                if callable(configure):
                    configure(self.batch)
                self.configured.add(index)
            return agent
        if self.spares[index]:
            return self.spares[index].pop()
        if self.instances[index] < self.batch and copyable(agent):
            try:
                clone = copy.deepcopy(agent)
            except Exception:  # noqa: BLE001 -- not copyable: its episodes run one at a time
                self.instances[index] = self.batch
                return None
            self.instances[index] += 1
            return clone
        return None

    def _start_pending(self) -> None:
        while self.pending and self.free_slots:
            job, run_id, video = self.pending[0]
            agent = self._instance(job.agent_index)
            if agent is None:
                return  # its agent's instances are all busy; the queue waits (in order) for one to end
            self.pending.popleft()
            run = _Running(job, agent, self.free_slots.pop(0), run_id, video)
            self.running.append(run)
            self._begin(run)

    def _begin(self, run: _Running) -> None:
        """A new attempt at `run`'s episode: an env, the agent's and the env's reset."""
        run.trace, run.episode = EpisodeTrace(), None

        def start() -> bool:
            scenario = run.job.scenario
            if run.env is None:
                if self.free_envs.get(scenario.name):
                    run.env = self.free_envs[scenario.name].pop()
                else:
                    run.trace.phase = "env create"
                    run.env = self.make_env(scenario, self.record, **self.backend_options)
            run.episode = Episode(run.env, run.agent, scenario, run.job.seed, run.video, trace=run.trace,
                                  catch_exit=self.catch_exit, **self.timeouts)
            run.episode.start()
            reset_batch = getattr(run.agent, "reset_batch", None)
            if batched(run.agent) and callable(reset_batch):
                run.trace.phase = "agent reset"
                with run.episode.limit(f"{run.agent.name}.reset_batch()"):
                    reset_batch(run.slot, scenario)
                run.trace.phase = "env reset"
            return False

        self._guard(run, start)

    def _guard(self, run: _Running, phase: Callable[[], bool]) -> None:
        """Run one phase of `run`'s episode (True: it ended); an exception is that episode's alone, with the
        rules of run_episode_with_retries: simulator failures retried on a fresh env, anything else recorded."""
        try:
            done = phase()
        except SimulatorError as exc:
            # Leaderboard's "Simulation crashed": reconnect with back-off, retry the episode.
            run.error, run.failure = f"simulator: {exc}", "infrastructure"
            if run.episode is not None:
                run.episode.close()
            close_quietly(run.env)
            run.env = None
            if run.attempt < self.retries:
                time.sleep(self.backoff_s * 2**run.attempt)
                run.attempt += 1
                self._begin(run)
            else:
                run.outcome = None
                self._end(run)
            return
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 -- one failing episode (even its sys.exit) must not stop the run
            run.error, run.failure = classify_failure(exc, run.trace)
            run.outcome = partial_outcome(run.env, run.trace)
            self._end(run)
            return
        if done:
            run.outcome, run.error = run.episode.outcome, None
            self._end(run)

    def _end(self, run: _Running) -> None:
        run.ended = True
        if run.episode is not None:
            run.episode.close()
        if run.env is not None:
            self.free_envs.setdefault(run.job.scenario.name, []).append(run.env)
            run.env = None
        if not batched(run.agent):
            self.spares[run.job.agent_index].append(run.agent)
        self.free_slots = sorted([*self.free_slots, run.slot])
        self.running.remove(run)
        steps = run.trace.steps()
        row = episode_row(run.outcome, steps, run_id=run.run_id, agent=run.agent.name, scenario=run.job.scenario,
                          seed=run.job.seed, wall_s=time.perf_counter() - run.started, error=run.error,
                          phase=run.trace.phase, failure=run.failure, clamped_actions=run.trace.clamped_actions)
        self.ended.append((run.job, row, steps))

    # -- one lockstep step -----------------------------------------------------------------------------
    def _step_all(self) -> None:
        groups: dict[int, list[_Running]] = {}
        for run in sorted(self.running, key=lambda r: r.slot):
            groups.setdefault(id(run.agent), []).append(run)
        for runs in groups.values():
            if batched(runs[0].agent):
                # Under a latency model an episode whose agent is still thinking drives its held control; the
                # others' steps are decided together (each keeps the latency of its own row's compute).
                for run in runs:
                    if not run.episode.free():
                        self._guard(run, run.episode.wait)
                deciding = [run for run in runs if not run.ended and run.episode.free()]
                if deciding:
                    self._step_batch(runs[0].agent, deciding)
            else:
                for run in runs:
                    self._step_alone(run)

    def _step_alone(self, run: _Running) -> None:
        self._guard(run, run.episode.next)

    def _step_batch(self, agent: Agent, runs: list[_Running]) -> None:
        def check(run: _Running) -> bool:
            run.trace.phase = "act"
            run.limit_s = run.episode.time_left()  # AgentTimeout for an episode past its own wall limit
            return False

        for run in runs:
            self._guard(run, lambda run=run: check(run))
        ready = [run for run in runs if not run.ended]
        if not ready:
            return
        limits = [run.limit_s for run in ready if run.limit_s]
        observations = [run.episode.observation for run in ready]
        what = f"{agent.name}.act_batch() of {len(ready)} episodes"
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            with agent_call(min(limits) if limits else None, what, self.catch_exit):
                if callable(getattr(agent, "reset_batch", None)):
                    answers = agent.act_batch(observations, slots=[run.slot for run in ready])
                else:
                    answers = agent.act_batch(observations)
            answers = list(answers)
            if len(answers) != len(ready):
                raise ValueError(f"{what} returned {len(answers)} controls")
        except AgentTimeout as exc:
            for run in ready:
                self._guard(run, lambda exc=exc: _raise(exc))
            return
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 -- ask each episode's act() instead: a failure stays its own
            self.fallbacks += 1
            _log.warning("%s raised %s: this step is asked episode by episode", what, _first_line(exc))
            for run in ready:
                self._step_alone(run)
            return
        wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        reports = batch_compute_report(agent, len(ready))
        for run, answer, report, share in zip(ready, answers, reports, _shares(reports)):
            self._guard(run, lambda run=run, answer=answer, report=report, share=share: run.episode.step(
                answer, wall_s * share, cpu_s * share, report, batch_size=len(ready)))


def _shares(reports: list[dict]) -> list[float]:
    """Each row's share of a batched call's time: its share of the call's FLOPs when every row reports
    them, else equal shares."""
    flops = np.array([report.get("dense_flops", np.nan) for report in reports], np.float64)
    if len(flops) and np.all(np.isfinite(flops)) and np.all(flops > 0):
        return list(flops / flops.sum())
    return [1.0 / len(reports)] * len(reports)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class InProcessExecutor:
    """Episodes in this process. batch=1 (the default): one env per scenario (created on first use), episodes
    one after another (run_episode_with_retries). batch=K: K episodes side by side in lockstep (`Lockstep`),
    a free episode slot refilled from the queue as soon as an episode ends. The agents run in this process, so
    their os._exit raises (exits_raise) and fails their episode, as their sys.exit does."""

    def __init__(self, agents: list[Agent], *, record: bool = False, retries: int = 2,
                 make_env: MakeEnv = default_make_env, backend_options: dict | None = None, backoff_s: float = 2.0,
                 step_timeout_s: float | None = STEP_TIMEOUT_S, episode_timeout_s: float | None = EPISODE_TIMEOUT_S,
                 batch: int = 1, latency: LatencyModel | None = None):
        if batch < 1:
            raise ValueError(f"--batch must be at least 1, got {batch}")
        self.agents, self.record, self.retries, self.batch = agents, record, retries, batch
        self.make_env, self.backend_options, self.backoff_s = make_env, backend_options, backoff_s
        # Every episode's options: its time limits and latency model (None: the synchronous loop).
        self.timeouts = {"step_timeout_s": step_timeout_s, "episode_timeout_s": episode_timeout_s, "latency": latency}
        self.envs: dict[str, DriveEnv] = {}
        self.lockstep: Lockstep | None = None

    def names(self) -> list[str]:
        return [agent.name for agent in self.agents]

    def run(self, jobs, run_dir):
        if self.batch > 1:
            yield from self._run_lockstep(jobs, run_dir)
            return
        for job in jobs:
            agent = self.agents[job.agent_index]
            row, steps = run_episode_with_retries(
                self.envs, agent, job.scenario, job.seed, run_id=run_dir.path.name,
                video=run_dir.video_path(agent.name, job.scenario.name, job.seed) if self.record else None,
                record=self.record, retries=self.retries, make_env=self.make_env,
                backend_options=self.backend_options, backoff_s=self.backoff_s, catch_exit=True, **self.timeouts)
            yield job, row, steps

    def _run_lockstep(self, jobs, run_dir):
        if self.lockstep is None:
            self.lockstep = Lockstep(self.agents, self.batch, record=self.record, retries=self.retries,
                                     make_env=self.make_env, backend_options=self.backend_options,
                                     backoff_s=self.backoff_s, catch_exit=True, **self.timeouts)
        lock, todo = self.lockstep, deque(jobs)
        while todo or lock.busy():
            while todo and lock.room() > 0:
                job = todo.popleft()
                name = self.agents[job.agent_index].name
                lock.add(job, run_dir.path.name,
                         run_dir.video_path(name, job.scenario.name, job.seed) if self.record else None)
            yield from lock.advance()

    def close(self) -> None:
        close_envs(self.envs, self.lockstep)
        self.lockstep = None


def close_envs(envs: dict, lockstep=None) -> None:
    """Close a worker's cached envs (and its lockstep's pool), whatever state their simulators are in."""
    for env in envs.values():
        close_quietly(env)
    envs.clear()
    if lockstep is not None:
        lockstep.close()


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
    """Progress a person can follow: a rich bar (with ETA and the running mean driving score) in a terminal;
    plain lines every PLAIN_EVERY_S seconds (and at the end) when the output goes to a log."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, enabled: bool, total: int):
        from prunedrive.harness.progress import Ticker

        self.enabled, self.total, self.scores = enabled, total, []
        self.ticker = Ticker("episodes", total, "scored", every_s=self.PLAIN_EVERY_S)
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console

            if Console().is_terminal:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[score]}"))
                self.bar.start()
                self.task = self.bar.add_task("episodes", total=self.total, score="")
        return self

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, row: dict) -> None:
        self.scores.append(row["driving_score"])
        if self.bar is not None:
            self.bar.update(self.task, advance=1, score=f"mean DS {np.mean(self.scores):.1f}")
        elif self.enabled:
            self.ticker.update(len(self.scores), f"mean DS {np.mean(self.scores):.1f}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
