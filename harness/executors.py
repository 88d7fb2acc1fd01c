"""Who drives a run's episode jobs: the `Executor` protocol and `InProcessExecutor` (this process);
harness.distributed.RayExecutor drives them on Ray actors."""
from __future__ import annotations

from collections import deque
from typing import Iterator, Protocol

import pandas as pd

from prunedrive.harness.agent import Agent
from prunedrive.harness.env_pool import MakeEnv, default_make_env
from prunedrive.harness.latency import LatencyModel
from prunedrive.harness.limits import EPISODE_TIMEOUT_S, STEP_TIMEOUT_S
from prunedrive.harness.lockstep import EpisodeJob, Lockstep
from prunedrive.harness.results import RunDir


class Executor(Protocol):
    """Drives episode jobs and yields each result as it ends; in-process or on Ray actors."""

    def names(self) -> list[str]:
        """The agents' names, by index (they name the episodes)."""

    def run(self, jobs: list[EpisodeJob], run_dir: RunDir) -> Iterator[tuple[EpisodeJob, dict, pd.DataFrame]]:
        """(job, row, steps) per job, in any order, each exactly once."""

    def close(self) -> None:
        """Release envs, workers and servers."""


class InProcessExecutor:
    """Episodes in this process, through one `Lockstep` of K = `batch` episodes side by side (K = 1, the
    default: one after another), a free episode slot refilled from the queue as soon as an episode ends; one
    env per scenario and running episode, made on first use by `make_env` (the hook for Gymnasium wrappers).
    The agents run in this process, so their os._exit raises (exits_raise) and fails their episode, as their
    sys.exit does."""

    def __init__(self, agents: list[Agent], *, record: bool = False, retries: int = 2,
                 make_env: MakeEnv = default_make_env, backend_options: dict | None = None, backoff_s: float = 2.0,
                 step_timeout_s: float | None = STEP_TIMEOUT_S, episode_timeout_s: float | None = EPISODE_TIMEOUT_S,
                 batch: int = 1, latency: LatencyModel | None = None):
        if batch < 1:
            raise ValueError(f"--batch must be at least 1, got {batch}")
        self.agents, self.record, self.batch = agents, record, batch
        self.options = {"record": record, "retries": retries, "make_env": make_env, "backend_options": backend_options,
                        "backoff_s": backoff_s, "step_timeout_s": step_timeout_s,
                        "episode_timeout_s": episode_timeout_s, "latency": latency}
        self.lockstep: Lockstep | None = None  # made on first use, again after close()

    def names(self) -> list[str]:
        return [agent.name for agent in self.agents]

    def run(self, jobs, run_dir):
        if self.lockstep is None:
            self.lockstep = Lockstep(self.agents, self.batch, catch_exit=True, **self.options)
        lock, todo = self.lockstep, deque(jobs)
        while todo or lock.busy():
            while todo and lock.room() > 0:
                job = todo.popleft()
                name = self.agents[job.agent_index].name
                lock.add(job, run_dir.path.name,
                         run_dir.video_path(name, job.scenario.name, job.seed) if self.record else None)
            yield from lock.advance()

    def close(self) -> None:
        if self.lockstep is not None:
            self.lockstep.close()
        self.lockstep = None
