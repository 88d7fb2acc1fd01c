"""Drive a suite's episodes on Ray actors: `RayExecutor`, the Ray implementation of `executors.Executor`.

    run_suite(suite, RayExecutor([make_expert, make_llm], workers=4), RunDir(...))

Agents are given as picklable zero-argument factories (`prunedrive.agents.registry.AgentSpec` is one):
each actor (`EpisodeWorker`) builds its agents itself (models are loaded in the worker, never pickled),
keeps one env per scenario it has driven, and returns one episode's row and steps per call. The driver
(runner.run_suite) writes each result as it comes, so its guarantees hold unchanged: a killed driver
leaves whole episodes or none and `--resume` runs exactly the missing ones.

A worker that dies mid-episode (the process crashed, was OOM-killed, its node went away), or one that
has spent longer than `episode_timeout_s` + WORKER_GRACE_S on an episode (an agent hung where the
worker's own time limit cannot interrupt it), is killed and replaced by a fresh actor. A died episode is re-queued up to `retries` times, after which it is recorded as `failed`
(an infrastructure failure: `--resume` runs it again); a timed-out one is recorded at once as failed
with `agent timeout`. Finished episodes are never re-run.

Ray is imported only when a RayExecutor starts, never at module import. A local Ray is started with
`workers` CPUs, no dashboard and a small object store, and stopped by `close()`; with `ray_address` an
existing cluster is used (its nodes need prunedrive installed; `--record` videos are written on the node
that drove the episode). If Ray is already initialised in this process it is used as is and left running.

Lockstep batches: `batch=K` (`--batch K`) makes each actor run up to K episodes side by side
(harness.lockstep.Lockstep, EpisodeWorker.run_batch); each call returns as soon as one of them ends, so
results are still written as each episode ends. batch=1 (the default) is the one-episode-per-call path.

A server-based backend (CARLA): pass `servers=["host:port", ...]` (app.server_options builds it from the
backend's own `--NAME-servers` flag); actor slot i always talks to server i, given to its envs as the backend
options `host` and `port` (a replacement actor takes its predecessor's server), so `workers` may not exceed the
number of servers.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

import pandas as pd

from prunedrive.harness.reaper import start_reaper, stop_reaper
from prunedrive.harness.results import RunDir
from prunedrive.harness.env_pool import close_envs
from prunedrive.harness.limits import EPISODE_TIMEOUT_S, STEP_TIMEOUT_S
from prunedrive.harness.lockstep import EpisodeJob, Lockstep, run_episode_with_retries
from prunedrive.harness.rows import episode_row
from prunedrive.harness.runner import run_suite
from prunedrive.scenarios.loader import Scenario, Suite

OBJECT_STORE_BYTES = 200 * 1024**2  # results are a few hundred KB per episode; Ray's default is 30% of RAM
WORKER_GRACE_S = 60.0  # beyond the episode's own wall limit, before the driver declares its worker hung
AgentFactory = Callable[[], Any]


class EpisodeWorker:
    """The actor: agents built from factories, one env per scenario, one episode per `run` call."""

    def __init__(self, factories: list[AgentFactory], record: bool, retries: int, backend_options: dict | None,
                 backoff_s: float, timeouts: dict, batch: int = 1):
        self.agents = [factory() for factory in factories]
        self.record, self.retries, self.timeouts = record, retries, timeouts
        self.backend_options, self.backoff_s = backend_options or {}, backoff_s
        self.envs: dict = {}
        self.lockstep = Lockstep(self.agents, batch, record=record, retries=retries,
                                 backend_options=self.backend_options, backoff_s=backoff_s,
                                 **timeouts) if batch > 1 else None

    def names(self) -> list[str]:
        return [agent.name for agent in self.agents]

    def run(self, agent_index: int, scenario: Scenario, seed: int, run_path: str) -> tuple[dict, pd.DataFrame]:
        agent, run_dir = self.agents[agent_index], RunDir(run_path)
        video = run_dir.video_path(agent.name, scenario.name, seed) if self.record else None
        return run_episode_with_retries(self.envs, agent, scenario, seed, run_id=run_dir.path.name,
                                        video=video, record=self.record, retries=self.retries,
                                        backend_options=self.backend_options, backoff_s=self.backoff_s,
                                        **self.timeouts)

    def run_batch(self, jobs: list[tuple[int, Scenario, int]], run_path: str) -> list[tuple[tuple, dict, pd.DataFrame]]:
        """Lockstep (batch > 1): queue `jobs` (agent index, scenario, seed) beside the episodes already running
        here, step them all until at least one ends (or none is left), return the ended ones as
        ((agent index, scenario name, seed), row, steps). The driver calls again, with jobs for the freed slots."""
        run_dir = RunDir(run_path)
        for agent_index, scenario, seed in jobs:
            name = self.agents[agent_index].name
            self.lockstep.add(EpisodeJob(agent_index, scenario, seed), run_dir.path.name,
                              run_dir.video_path(name, scenario.name, seed) if self.record else None)
        ended = self.lockstep.advance()
        while not ended and self.lockstep.busy():
            ended = self.lockstep.advance()
        return [((job.agent_index, job.scenario.name, job.seed), row, steps) for job, row, steps in ended]

    def close(self) -> None:
        close_envs(self.envs, self.lockstep)


class RayExecutor:
    """`workers` Ray actors, at most one call in flight on each: one episode (batch=1), or, with batch=K,
    up to K episodes running side by side on each actor (harness.lockstep.Lockstep)."""

    def __init__(self, factories: list[AgentFactory], workers: int, *, ray_address: str | None = None,
                 record: bool = False, retries: int = 2, backend_options: dict | None = None,
                 servers: list[str] | None = None, backoff_s: float = 2.0,
                 step_timeout_s: float | None = STEP_TIMEOUT_S, episode_timeout_s: float | None = EPISODE_TIMEOUT_S,
                 batch: int = 1, latency=None):
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        if batch < 1:
            raise ValueError(f"--batch must be at least 1, got {batch}")
        self.batch = batch
        if retries < 0:
            raise ValueError(f"--retries must be at least 0, got {retries}")
        self.servers = [parse_server(s) for s in servers or []]
        if self.servers and workers > len(self.servers):
            raise ValueError(f"--workers {workers} needs as many simulator servers (one per worker), got "
                             f"{len(self.servers)}: {', '.join(servers)}")
        self.factories, self.workers, self.ray_address = list(factories), workers, ray_address
        self.record, self.retries, self.backend_options, self.backoff_s = record, retries, backend_options, backoff_s
        # Every episode's options: time limits and the latency model (harness.latency; None: synchronous).
        self.timeouts = {"step_timeout_s": step_timeout_s, "episode_timeout_s": episode_timeout_s, "latency": latency}
        # The worker enforces the episode's limit itself; this one catches a worker that cannot (hung in C code).
        self.episode_timeout_s = (episode_timeout_s or EPISODE_TIMEOUT_S) + WORKER_GRACE_S
        self.actors: list = []
        self.started_ray = False
        self._reaper = None
        self._names: list[str] | None = None

    # -- Ray ------------------------------------------------------------------------------------------
    def _start(self) -> None:
        import ray

        if self.actors:
            return
        if not ray.is_initialized():
            self.started_ray = True
            if self.ray_address:
                ray.init(address=self.ray_address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                # Ray's dashboard and runtime-env agents outlive a driver killed with -9: the reaper ends them.
                self._reaper = start_reaper()
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR, object_store_memory=OBJECT_STORE_BYTES)
        self._remote = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(EpisodeWorker)
        self.actors = [self._new_actor(0)]

    def _new_actor(self, slot: int):
        options = dict(self.backend_options or {})
        if self.servers:
            options.update(host=self.servers[slot][0], port=self.servers[slot][1])
        return self._remote.remote(self.factories, self.record, self.retries, options, self.backoff_s, self.timeouts,
                                   self.batch)

    def names(self) -> list[str]:
        if self._names is None:
            import ray

            self._start()
            self._names = ray.get(self.actors[0].names.remote())  # a bad factory raises here, with its error
        return self._names

    def start_all(self) -> None:
        """Start every actor now and wait until each is ready (benchmarks: keep start-up out of the timing).
        Runs start them as they need them."""
        import ray

        self.names()
        self.actors += [self._new_actor(slot) for slot in range(len(self.actors), self.workers)]
        ray.get([actor.names.remote() for actor in self.actors])

    def _dead_errors(self) -> tuple:
        import ray

        dead_errors: tuple = (ray.exceptions.RayActorError,)
        for name in ("ActorUnavailableError", "WorkerCrashedError"):
            if hasattr(ray.exceptions, name):
                dead_errors += (getattr(ray.exceptions, name),)
        return dead_errors

    def run(self, jobs: list[EpisodeJob], run_dir: RunDir):
        if self.batch > 1:
            yield from self._run_lockstep(jobs, run_dir)
            return
        import ray

        names = self.names()
        dead_errors = self._dead_errors()
        self.actors += [self._new_actor(slot) for slot in range(len(self.actors), min(self.workers, len(jobs)))]
        todo, idle = deque(jobs), deque(range(len(self.actors)))
        in_flight: dict = {}  # ref -> (slot, job, started)
        deaths: dict[tuple, int] = {}  # (agent index, scenario, seed) -> times its worker died
        while todo or in_flight:
            while todo and idle:
                slot, job = idle.popleft(), todo.popleft()
                ref = self.actors[slot].run.remote(job.agent_index, job.scenario, job.seed, str(run_dir.path))
                in_flight[ref] = (slot, job, time.monotonic())
            oldest = min(started for _, _, started in in_flight.values())
            wait_s = max(0.0, oldest + self.episode_timeout_s - time.monotonic())
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
            if not ready:  # the oldest episode ran past the limit: its worker is hung
                ref = next(r for r, (_, _, started) in in_flight.items() if started == oldest)
                slot, job, _ = in_flight.pop(ref)
                self._replace(slot, idle)
                yield job, self._failed_row(job, names, run_dir,
                                            f"agent timeout: the episode ran past {self.episode_timeout_s:g} s "
                                            "of wall time; its worker was replaced"), pd.DataFrame()
                continue
            [ref] = ready
            slot, job, _ = in_flight.pop(ref)
            try:
                row, steps = ray.get(ref)
            except dead_errors as exc:
                self._replace(slot, idle)
                episode = (job.agent_index, job.scenario.name, job.seed)
                deaths[episode] = deaths.get(episode, 0) + 1
                if deaths[episode] <= self.retries:
                    todo.appendleft(job)  # the same episode, on a fresh worker
                    continue
                yield job, self._failed_row(job, names, run_dir,
                                            f"worker died {deaths[episode]} times: {_first_line(exc)}"), pd.DataFrame()
                continue
            idle.append(slot)
            yield job, row, steps

    def _run_lockstep(self, jobs: list[EpisodeJob], run_dir: RunDir):
        """batch=K: each actor keeps up to K episodes running (EpisodeWorker.run_batch); every call returns as
        soon as one of them ends, and the next call refills the freed slots. A call can only last as long as
        its oldest running episode's wall limit, so an actor silent for episode_timeout_s + WORKER_GRACE_S is
        hung: it is replaced and every episode it held fails with `agent timeout` (infrastructure: `--resume`
        runs them again). An actor that dies takes all its episodes with it: each is re-queued (up to
        `retries` deaths, as at batch 1) and then runs alone on an actor, so that an episode that kills its
        worker cannot keep killing the episodes batched with it."""
        import ray

        names = self.names()
        dead_errors = self._dead_errors()
        self.actors += [self._new_actor(slot) for slot in range(len(self.actors), min(self.workers, len(jobs)))]
        todo = deque(jobs)
        held: list[dict] = [{} for _ in self.actors]  # per actor: episode key -> job, sent and not yet returned
        in_flight: dict = {}  # ref -> (slot, call started)
        deaths: dict[tuple, int] = {}  # (agent index, scenario, seed) -> times its worker died
        suspects: set[tuple] = set()  # episodes whose worker died: run alone from now on
        key = lambda job: (job.agent_index, job.scenario.name, job.seed)  # noqa: E731

        def dispatch(slot: int, share: int | None = None) -> None:
            if any(ref_slot == slot for ref_slot, _ in in_flight.values()):
                return
            new: list[EpisodeJob] = []
            if not any(k in suspects for k in held[slot]):
                while todo and len(held[slot]) + len(new) < (self.batch if share is None else min(self.batch, share)):
                    if key(todo[0]) in suspects:
                        if not held[slot] and not new:
                            new.append(todo.popleft())
                        break
                    new.append(todo.popleft())
            if not new and not held[slot]:
                return
            for job in new:
                held[slot][key(job)] = job
            ref = self.actors[slot].run_batch.remote([(j.agent_index, j.scenario, j.seed) for j in new],
                                                     str(run_dir.path))
            in_flight[ref] = (slot, time.monotonic())

        share, extra = divmod(len(todo), len(self.actors))  # the first round splits the jobs evenly
        for slot in range(len(self.actors)):
            dispatch(slot, share + (slot < extra))
        while in_flight:
            oldest = min(started for _, started in in_flight.values())
            wait_s = max(0.0, oldest + self.episode_timeout_s - time.monotonic())
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
            if not ready:  # the oldest call ran past the limit: its worker is hung
                ref = next(r for r, (_, started) in in_flight.items() if started == oldest)
                slot, _ = in_flight.pop(ref)
                self._replace(slot, deque())
                lost, held[slot] = list(held[slot].values()), {}
                for job in lost:
                    suspects.discard(key(job))
                    yield job, self._failed_row(job, names, run_dir,
                                                f"agent timeout: its worker ran past {self.episode_timeout_s:g} s "
                                                f"of wall time on a batch of {len(lost)}; the worker was "
                                                "replaced"), pd.DataFrame()
            else:
                [ref] = ready
                slot, _ = in_flight.pop(ref)
                try:
                    ended = ray.get(ref)
                except dead_errors as exc:
                    self._replace(slot, deque())
                    lost, held[slot] = list(held[slot].values()), {}
                    for job in reversed(lost):
                        deaths[key(job)] = deaths.get(key(job), 0) + 1
                        if deaths[key(job)] <= self.retries:
                            todo.appendleft(job)  # the same episode, alone, on a fresh worker
                            suspects.add(key(job))
                            continue
                        suspects.discard(key(job))
                        yield job, self._failed_row(job, names, run_dir,
                                                    f"worker died {deaths[key(job)]} times: {_first_line(exc)}"), \
                            pd.DataFrame()
                else:
                    for episode, row, steps in ended:
                        job = held[slot].pop(episode)
                        suspects.discard(episode)
                        yield job, row, steps
            for other in range(len(self.actors)):
                dispatch(other)

    def _replace(self, slot: int, idle: deque) -> None:
        import ray

        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor(slot)
        idle.append(slot)

    @staticmethod
    def _failed_row(job: EpisodeJob, names: list[str], run_dir: RunDir, error: str) -> dict:
        return episode_row(None, pd.DataFrame(), run_id=run_dir.path.name, agent=names[job.agent_index],
                           scenario=job.scenario, seed=job.seed, wall_s=0.0, error=error, phase="worker",
                           failure="infrastructure")

    def close(self) -> None:
        if not self.actors and not self.started_ray:
            return
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 -- a dead or hung worker has nothing left to close
                pass
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
        stop_reaper(self._reaper)
        self._reaper = None


def run_suite_distributed(suite: Suite, factories: list[AgentFactory], run_dir: RunDir, workers: int, *,
                          progress: bool = True, **options) -> pd.DataFrame:
    """`run_suite` on `workers` Ray actors (options: those of RayExecutor)."""
    return run_suite(suite, RayExecutor(factories, workers, **options), run_dir, progress=progress)


def parse_server(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"simulator server {text!r}: expected host:port")
    return host, int(port)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
