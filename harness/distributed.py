"""Run a suite's episodes on Ray actors: one env per actor, results written by the driver as each ends.

    run_suite_distributed(suite, [AgentSpec("expert"), AgentSpec("llm", "models/x")], RunDir(...), workers=4)

Each actor (`EpisodeWorker`) builds the agents from their specs itself (models are loaded in the
worker, never pickled), keeps one env per scenario it has driven (created lazily, like `run_suite`),
and returns `(key, row, steps)` for one episode per call. The driver keeps at most one episode in
flight per actor, takes results as they come (`ray.wait`) and writes each with
`RunDir.write_episode`, so the guarantees of `run_suite` hold unchanged: a killed driver leaves whole
episodes or none and `--resume` runs exactly the missing ones; a worker that dies mid-episode
(`RayActorError`: the process crashed, was OOM-killed, its node went away) is replaced by a fresh
actor and its episode re-queued, up to `retries` times, after which the episode is recorded as
`failed` with the reason, as any failing episode is. Finished episodes are never re-run.

Simulator failures inside a worker are handled there exactly as in-process (`run_episode_with_retries`:
reconnect with back-off, retry, then `failed: simulator ...`).

Ray is imported only inside `run_suite_distributed` (and the worker), never at module import: the
in-process path does not need it installed. A local Ray is started for the run with `workers` CPUs,
no dashboard and a small object store, and stopped at the end; with `ray_address` an existing cluster
is used (its nodes need prunedrive installed, and `--record` videos are written on the node that drove
the episode: use a shared filesystem for the run directory). If Ray is already initialised in this
process (tests, notebooks) it is used as is and left running.

CARLA: pass `carla_servers=["host:port", ...]`; actor slot i always talks to server i (a replacement
actor takes its predecessor's server), so `workers` may not exceed the number of servers.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from harness.results import RunDir, episode_key
from harness.runner import _close, _progress, episode_row, run_episode_with_retries
from scenarios.loader import Scenario, Suite

OBJECT_STORE_BYTES = 200 * 1024**2  # results are a few hundred KB per episode; Ray's default is 30% of RAM


@dataclass(frozen=True)
class AgentSpec:
    """How a worker builds an agent: a registry name (+ model directory, + optional label), or a
    picklable zero-argument `factory` for agents outside the registry (plugins, tests)."""

    name: str
    model: str | None = None
    label: str | None = None
    factory: Callable[[], Any] | None = field(default=None, compare=False)

    def build(self):
        if self.factory is not None:
            return self.factory()
        from agents.registry import make_agent

        return make_agent(self.name, self.model, label=self.label)

    def check(self) -> None:
        """Cheap driver-side validation, so a bad option is a message, not a worker traceback."""
        if self.factory is not None:
            return
        from agents.registry import AGENTS

        if self.name not in AGENTS:
            raise ValueError(f"unknown agent {self.name!r}; allowed: {', '.join(AGENTS)}")
        if self.name == "llm":
            if self.model is None:
                raise ValueError("agent 'llm' needs --model DIR (a directory written by `prunedrive train` or `prune`)")
            if not Path(self.model).is_dir():
                raise FileNotFoundError(f"--model {self.model}: no such model directory")


def as_spec(spec: AgentSpec | str | tuple) -> AgentSpec:
    if isinstance(spec, AgentSpec):
        return spec
    if isinstance(spec, str):
        return AgentSpec(spec)
    return AgentSpec(*spec)


class EpisodeWorker:
    """The actor: agents built from specs, one env per scenario, one episode per `run` call."""

    def __init__(self, specs: list[AgentSpec], run_path: str, record: bool, retries: int,
                 backend_options: dict | None, backoff_s: float):
        self.agents = [spec.build() for spec in specs]
        self.run_path, self.record, self.retries = Path(run_path), record, retries
        self.backend_options, self.backoff_s = backend_options or {}, backoff_s
        self.envs: dict = {}

    def names(self) -> list[str]:
        return [agent.name for agent in self.agents]

    def run(self, agent_index: int, scenario: Scenario, seed: int) -> tuple[str, dict, pd.DataFrame]:
        agent = self.agents[agent_index]
        key = episode_key(agent.name, scenario.name, seed)
        video = self.run_path / "videos" / f"{key}.mp4" if self.record else None
        row, steps = run_episode_with_retries(self.envs, agent, scenario, seed, run_id=self.run_path.name,
                                              video=video, record=self.record, retries=self.retries,
                                              backend_options=self.backend_options, backoff_s=self.backoff_s)
        return key, row, steps

    def close(self) -> None:
        for env in self.envs.values():
            _close(env)
        self.envs.clear()


def run_suite_distributed(suite: Suite, agent_specs: list[AgentSpec | str | tuple], run_dir: RunDir, workers: int,
                          ray_address: str | None = None, record: bool = False, retries: int = 2,
                          progress: bool = True, backend_options: dict | None = None,
                          carla_servers: list[str] | None = None, backoff_s: float = 2.0) -> pd.DataFrame:
    """`run_suite` on `workers` Ray actors. `retries` bounds both simulator retries inside a worker and
    re-queues of an episode whose worker died. Returns all episodes of `run_dir`."""
    specs = [as_spec(s) for s in agent_specs]
    for spec in specs:
        spec.check()
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    servers = [_parse_server(s) for s in carla_servers or []]
    if servers and workers > len(servers):
        raise ValueError(f"--workers {workers} needs as many CARLA servers, got {len(servers)}: "
                         f"{', '.join(carla_servers)}")

    import ray
    from ray.exceptions import RayActorError

    dead_errors: tuple = (RayActorError,)
    for name in ("ActorUnavailableError", "WorkerCrashedError"):
        if hasattr(ray.exceptions, name):
            dead_errors += (getattr(ray.exceptions, name),)

    started_ray = not ray.is_initialized()
    if started_ray:
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     object_store_memory=OBJECT_STORE_BYTES)
    remote_worker = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(EpisodeWorker)

    def new_actor(slot: int):
        options = dict(backend_options or {})
        if servers:
            options.update(host=servers[slot][0], port=servers[slot][1])
        return remote_worker.remote(specs, str(run_dir.path), record, retries, options, backoff_s)

    run_id = run_dir.path.name
    actors: list = []
    try:
        actors.append(new_actor(0))
        names = ray.get(actors[0].names.remote())  # a bad spec raises here, with the worker's error
        done = run_dir.finished()
        todo = deque((i, s, seed) for i in range(len(specs)) for s, seed in suite.episodes()
                     if episode_key(names[i], s.name, seed) not in done)
        actors += [new_actor(slot) for slot in range(1, min(workers, len(todo)))]
        idle = deque(range(len(actors)))
        in_flight: dict = {}
        deaths: dict[tuple, int] = {}
        with _progress(progress, total=len(todo)) as bar:
            bar.describe(f"{len(actors)} workers")
            while todo or in_flight:
                while todo and idle:
                    slot, item = idle.popleft(), todo.popleft()
                    in_flight[actors[slot].run.remote(*item)] = (slot, item)
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                slot, item = in_flight.pop(ref)
                agent_index, scenario, seed = item
                attempt_key = (agent_index, scenario.name, seed)
                try:
                    key, row, steps = ray.get(ref)
                except dead_errors as exc:
                    ray.kill(actors[slot], no_restart=True)
                    actors[slot] = new_actor(slot)
                    idle.append(slot)
                    deaths[attempt_key] = deaths.get(attempt_key, 0) + 1
                    if deaths[attempt_key] <= retries:
                        todo.appendleft(item)  # the same episode, on a fresh worker
                        continue
                    # Like any failing episode: recorded as failed, with the reason, and the run goes on.
                    key, steps = episode_key(names[agent_index], scenario.name, seed), pd.DataFrame()
                    row = episode_row(None, steps, run_id=run_id, agent=names[agent_index], scenario=scenario,
                                      seed=seed, wall_s=0.0,
                                      error=f"worker died {deaths[attempt_key]} times: {_first_line(exc)}")
                else:
                    idle.append(slot)
                run_dir.write_episode(key, row, steps)
                bar.describe(f"{names[agent_index]} {scenario.name} seed={seed}")
                bar.advance(row)
    finally:
        for actor in actors:
            try:
                ray.get(actor.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 -- a dead worker has nothing left to close
                pass
            ray.kill(actor, no_restart=True)
        if started_ray:
            ray.shutdown()
    run_dir.consolidate()
    return run_dir.episodes()


def _parse_server(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"CARLA server {text!r}: expected host:port")
    return host, int(port)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def specs_from_args(args) -> list[AgentSpec]:
    """The agent specs of `prunedrive run` options (--agent, repeated; --model)."""
    return [AgentSpec(name, str(args.model) if args.model else None) for name in (args.agent or ["expert"])]
