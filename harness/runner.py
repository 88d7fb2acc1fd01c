"""Run agents x scenarios x seeds closed-loop; write each episode as soon as it ends.

The pieces, each in its own module:
  harness.episode    Episode (one episode's per-step bookkeeping) and run_episode (the one episode loop)
  harness.rows       episode_row (the one place the scorer is called) and the step columns
  harness.limits     time limits around an agent's calls, os._exit raising inside them
  harness.lockstep   the episode state machine: K episodes side by side (K = 1: sequential), retries, failures
  harness.executors  InProcessExecutor; harness.distributed.RayExecutor on Ray actors
  run_suite (here)   plans the missing episodes of a run directory, feeds an executor, writes each result
"""
from __future__ import annotations

import pandas as pd

from prunedrive.harness.agent import Agent
from prunedrive.harness.executors import Executor, InProcessExecutor
from prunedrive.harness.lockstep import EpisodeJob
from prunedrive.harness.progress import EpisodeProgress
from prunedrive.harness.results import RunDir, episode_key
from prunedrive.scenarios.loader import Suite


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
        with EpisodeProgress(progress, total=len(todo)) as bar:
            for job, row, steps in executor.run(todo, run_dir):
                run_dir.write_episode(episode_key(names[job.agent_index], job.scenario.name, job.seed), row, steps)
                bar.describe(f"{names[job.agent_index]} {job.scenario.name} seed={job.seed}")
                bar.advance(row)
    finally:
        executor.close()
    run_dir.consolidate()
    return run_dir.episodes()
