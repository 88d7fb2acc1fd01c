"""The one episode state machine: `Lockstep` runs up to K episodes side by side (K = 1: one after another, the
sequential path), each with its own env, key, retries, failure record and time limits; every failure,
retry and time-limit rule is here, in `Lockstep._guard` and `classify_failure`. `run_episode_with_retries`
is one episode of it.

An episode row is only ever that episode's own: a failure at any point gives this episode's partial
record (its own steps, km and events, or zeros when the failure came before the env was reset), status
`failed`, the error and the phase it failed in.
"""
from __future__ import annotations

import copy
import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
import pandas as pd

from prunedrive.harness.action import ActionError
from prunedrive.harness.agent import Agent, batch_compute_report, batched, copyable, hook
from prunedrive.harness.backends.base import SimulatorError
from prunedrive.harness.env import EpisodeOutcome
from prunedrive.harness.env_pool import EnvPool, MakeEnv, close_quietly, default_make_env
from prunedrive.harness.episode import Episode, EpisodeTrace
from prunedrive.harness.latency import LatencyModel
from prunedrive.harness.limits import EPISODE_TIMEOUT_S, STEP_TIMEOUT_S, AgentTimeout, agent_call
from prunedrive.harness.rows import episode_row
from prunedrive.scenarios.loader import Scenario

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeJob:
    agent_index: int
    scenario: Scenario
    seed: int


def classify_failure(exc: BaseException, trace: EpisodeTrace) -> tuple[str, str]:
    """(error text, failure kind) of an episode that raised `exc` (not a SimulatorError) in `trace.phase`;
    call it inside the `except` block (it formats the active traceback)."""
    error = f"{exc}\n" if isinstance(exc, (ActionError, AgentTimeout)) else traceback.format_exc()
    # A time limit is the harness's, not a result of the agent's: `--resume` runs it again.
    own = trace.phase in ("agent reset", "act", "action") and not isinstance(exc, AgentTimeout)
    return error, "agent" if own else "infrastructure"


def partial_outcome(trace: EpisodeTrace) -> EpisodeOutcome | None:
    """A failed episode's own outcome so far (the env's last info["outcome"]): only this episode's state
    (before its reset the env may still hold the previous episode), or None."""
    return trace.outcome if trace.env_reset else None


@dataclass(eq=False)
class _Running:
    """One job in a lockstep batch, as a run drives it: its attempts, env, episode and failure record."""

    job: EpisodeJob
    agent: Agent       # the instance serving it: the agent itself (act_batch) or this slot's copy
    slot: int          # 0 <= slot < K, stable while the episode runs (reset_batch / act_batch slots)
    run_id: str
    video: Path | None
    started: float = field(default_factory=time.perf_counter)
    attempt: int = 0
    env: gym.Env | None = None
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
    agents see). Each running episode has its own env, taken from a pool of free envs per scenario (EnvPool:
    created on first use, returned when the episode ends, closed after a simulator failure), its own key,
    retries, failure record and time limits: the per-step bookkeeping is Episode's, the failure rules are
    `_guard`'s and classify_failure's. A simulator failure (SimulatorError) closes the episode's env, backs
    off (`backoff_s` doubling) and starts the episode again on a fresh env, up to `retries` times, after
    which the episode is an infrastructure failure; any other exception (the agent's code, a bad action,
    `SystemExit` included; not Ctrl-C) is recorded with its traceback, its phase and the episode's own
    progress. batch=1 is the sequential path: episodes one after another, each agent asked through act()
    (act_batch and its hooks are for K > 1 only).

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
                 catch_exit: bool = False, latency: LatencyModel | None = None,
                 envs: dict[str, list[gym.Env]] | None = None):
        if batch < 1:
            raise ValueError(f"--batch must be at least 1, got {batch}")
        self.agents, self.batch, self.retries = list(agents), batch, retries
        self.catch_exit = catch_exit  # exits_raise around the agents' calls (in the run's own process)
        self.backoff_s = backoff_s
        # Every Episode's options: its time limits and latency model (None: the synchronous loop).
        self.timeouts = {"step_timeout_s": step_timeout_s, "episode_timeout_s": episode_timeout_s, "latency": latency}
        self.envs = EnvPool(make_env, record, backend_options, free=envs)  # `envs`: the caller's free envs
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
        self.envs.close()

    # -- episodes --------------------------------------------------------------------------------------
    def _together(self, agent: Agent) -> bool:
        """Whether `agent` decides its episodes' steps in one call: it has act_batch and K > 1."""
        return self.batch > 1 and batched(agent)

    def _instance(self, index: int) -> Agent | None:
        """The agent instance for a new episode of agent `index`, or None: none free now."""
        agent = self.agents[index]
        if self._together(agent):
            if index not in self.configured:
                configure = hook(agent, "configure_batch")
                if configure is not None:
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
                run.env = self.envs.take(scenario, on_create=lambda: setattr(run.trace, "phase", "env create"))
            run.episode = Episode(run.env, run.agent, scenario, run.job.seed, run.video, trace=run.trace,
                                  catch_exit=self.catch_exit, **self.timeouts)
            run.episode.start()
            reset_batch = hook(run.agent, "reset_batch")
            if self._together(run.agent) and reset_batch is not None:
                run.trace.phase = "agent reset"
                with run.episode.limit(f"{run.agent.name}.reset_batch()"):
                    reset_batch(run.slot, scenario)
                run.trace.phase = "env reset"
            return False

        self._guard(run, start)

    def _guard(self, run: _Running, phase: Callable[[], bool]) -> None:
        """Run one phase of `run`'s episode (True: it ended); an exception is that episode's alone: simulator
        failures retried on a fresh env, anything else recorded (the class docstring has the rules)."""
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
            run.outcome = partial_outcome(run.trace)
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
            self.envs.give(run.job.scenario, run.env)
            run.env = None
        if not self._together(run.agent):
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
            if self._together(runs[0].agent):
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
                if hook(agent, "reset_batch") is not None:
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


def run_episode_with_retries(envs: dict[str, list[gym.Env]], agent: Agent, scenario: Scenario, seed: int, *,
                             run_id: str, video: Path | None = None, record: bool = False, retries: int = 2,
                             make_env: MakeEnv = default_make_env, backend_options: dict | None = None,
                             backoff_s: float = 2.0, step_timeout_s: float | None = STEP_TIMEOUT_S,
                             episode_timeout_s: float | None = EPISODE_TIMEOUT_S, catch_exit: bool = False,
                             latency: LatencyModel | None = None) -> tuple[dict, pd.DataFrame]:
    """One episode, as a run drives it: a Lockstep of K = 1 over the free envs `envs` (scenario name -> envs,
    made on first use, kept for the next episode). Returns the episode row and its steps (those of a failed
    episode are kept too); never raises for a failing episode."""
    lock = Lockstep([agent], 1, record=record, retries=retries, make_env=make_env, backend_options=backend_options,
                    backoff_s=backoff_s, step_timeout_s=step_timeout_s, episode_timeout_s=episode_timeout_s,
                    catch_exit=catch_exit, latency=latency, envs=envs)
    lock.add(EpisodeJob(0, scenario, seed), run_id, video)
    while True:
        for _, row, steps in lock.advance():
            return row, steps
