"""Training data from the simulator: the expert drives closed-loop, every step becomes one Parquet row.

A row holds the observation arrays (fixed-size list columns, one per observation key), the expert's
control (the label), the executed control, the perception ground truth, the reason, and the question /
answer texts of models/text.py. `<split>.json` next to `<split>.parquet` records the generating config.

DAgger-style noise: with probability `noise` per step a short perturbation burst starts (steering
offset or a random pedal) and is *executed*, while the row's label stays the expert's action for the
observation. The model thus sees states slightly off the expert's path together with the correction,
which is what keeps a behaviour-cloned policy from drifting in closed loop.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prunedrive.harness.progress import Ticker, live_bars
from prunedrive.agents.expert import ExpertAgent
from prunedrive.harness.action import Control
from prunedrive.harness.env import DriveEnv
from prunedrive.harness.episode import run_episode
from prunedrive.harness.rows import episode_row
from prunedrive.harness.observation import OBS_SHAPES
from prunedrive.models import text
from prunedrive.harness.backends import check_suite
from prunedrive.scenarios.loader import Scenario, load_suite

TRAIN_SEED_BASE, VAL_SEED_BASE, DAGGER_SEED_BASE = 100_000, 90_000, 200_000  # evaluation suites use seeds < 10000


def episode_seed(split: str, seed: int, index: int) -> int:
    if split == "val":
        return VAL_SEED_BASE + 1000 * seed + index
    if split == "dagger":
        return DAGGER_SEED_BASE + 1000 * seed + index
    return TRAIN_SEED_BASE + 1000 * seed + index


@dataclass
class _Burst:
    steps_left: int = 0
    steer: float = 0.0
    pedal: tuple[float, float] | None = None

    def apply(self, control: Control) -> Control:
        self.steps_left -= 1
        if self.pedal is not None:
            return Control(throttle=self.pedal[0], brake=self.pedal[1], steer=control.steer)
        return Control(throttle=control.throttle, brake=control.brake, steer=float(np.clip(control.steer + self.steer, -1, 1)))


def _new_burst(rng: np.random.Generator) -> _Burst:
    """Steering offset (50%), a random pedal (30%) or braking to a standstill (20%). The last one fills the
    data with "stopped, road clear -> accelerate" states, against the inertia problem of behaviour cloning
    (an imitator that has stopped tends to stay stopped, because the expert mostly stops to wait)."""
    u = rng.random()
    if u < 0.5:
        return _Burst(int(rng.integers(2, 7)), steer=float(np.clip(rng.normal(0, 0.15), -0.4, 0.4)))
    if u < 0.8:
        pedal = (float(rng.uniform(0.2, 0.7)), 0.0) if rng.random() < 0.5 else (0.0, float(rng.uniform(0.2, 0.6)))
        return _Burst(int(rng.integers(2, 7)), pedal=pedal)
    return _Burst(int(rng.integers(5, 11)), pedal=(0.0, 1.0))


class _LabelledDriver:
    """The agent of a data rollout. Every step becomes a row labelled with the expert's control and reason.
    Executed: the expert's control (through noise bursts), or with a `policy` the policy's, except on a
    `beta` share of steps where the expert's is (DAgger: the states the learner itself visits, labelled
    with what the expert would do there)."""

    name = "data"

    def __init__(self, seed: int, noise: float, policy=None, beta: float = 0.0):
        self.expert, self.rng, self.burst = ExpertAgent(), np.random.default_rng(seed), _Burst()
        self.noise, self.policy, self.beta = noise, policy, beta
        self.scenario: Scenario | None = None
        self.seed = seed
        self.rows: list[dict] = []

    def reset(self, scenario: Scenario) -> None:
        self.scenario = scenario
        if self.policy is not None:
            self.policy.reset(scenario)

    def act(self, obs: dict[str, np.ndarray]) -> Control:
        label = self.expert.act(obs)
        reason = self.expert.reason(obs)
        if self.policy is not None:
            executed = label if self.rng.random() < self.beta else self.policy.act(obs)
        else:
            if self.burst.steps_left <= 0 and self.noise > 0 and self.rng.random() < self.noise:
                self.burst = _new_burst(self.rng)
            executed = self.burst.apply(label) if self.burst.steps_left > 0 else label
        scenario = self.scenario
        self.rows.append({
            "scenario": scenario.name, "kind": scenario.kind, "seed": self.seed, "step": len(self.rows),
            **{f"obs_{k}": np.asarray(obs[k], np.float32).ravel() for k in OBS_SHAPES},
            "throttle": label.throttle, "brake": label.brake, "steer": label.steer,
            "exec_throttle": executed.throttle, "exec_brake": executed.brake, "exec_steer": executed.steer,
            "noisy": executed != label, "reason": reason, **text.perception_labels(obs),
            **{f"q_{k}": text.prompt(k) for k in text.QUESTIONS},
            **{f"a_{k}": a for k, a in text.answers(obs, label, reason).items()},
        })
        return executed


def rollout(scenario: Scenario, seed: int, noise: float = 0.0, max_steps: int | None = None,
            env: DriveEnv | None = None, policy=None, beta: float = 0.0) -> tuple[list[dict], dict]:
    """One episode -> per-step rows (labelled by the expert) and an episode summary. The expert drives
    (with noise bursts), or `policy` does with the expert on a `beta` share of steps (see _LabelledDriver)."""
    env = env or DriveEnv(scenario)
    driver = _LabelledDriver(seed, noise, policy, beta)
    outcome, steps = run_episode(env, driver, scenario, seed, max_steps=max_steps)
    row = episode_row(outcome, steps, run_id="data", agent=driver.name, scenario=scenario, seed=seed, wall_s=0.0)
    return driver.rows, {"scenario": scenario.name, "kind": scenario.kind, "seed": seed, "steps": len(driver.rows),
                         "driving_score": row["driving_score"], "status": row["status"]}


def _to_table(rows: list[dict]) -> pa.Table:
    columns = {}
    for key in rows[0]:
        if key.startswith("obs_"):
            flat = np.concatenate([r[key] for r in rows]).astype(np.float32)
            columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(flat), len(rows[0][key]))
        else:
            columns[key] = pa.array([r[key] for r in rows])
    return pa.table(columns)


_WORKER_ENVS: dict[str, DriveEnv] = {}  # per process: env construction is slow, reuse it across episodes
_WORKER_POLICIES: dict[str, object] = {}


def _policy(model_dir: str | None):
    if model_dir is None:
        return None
    if model_dir not in _WORKER_POLICIES:
        import multiprocessing

        import torch

        from prunedrive.agents.llm import LLMAgent

        if multiprocessing.parent_process() is not None:
            torch.set_num_threads(1)  # one rollout process per core; batch-1 decoding gains nothing from threads
        _WORKER_POLICIES[model_dir] = LLMAgent(model_dir)
    return _WORKER_POLICIES[model_dir]


@functools.cache
def _worker_suite(suite_path: str):
    return check_suite(load_suite(suite_path))  # once per process, not per episode


def _episode(job: tuple) -> tuple[list[dict], dict]:
    suite_path, index, split, seed, noise, max_steps, policy_dir, beta = job
    suite = _worker_suite(suite_path)
    scenario = suite.scenarios[index % len(suite.scenarios)]
    key = f"{suite_path}:{scenario.name}"
    if key not in _WORKER_ENVS:
        _WORKER_ENVS[key] = DriveEnv(scenario)
    env = _WORKER_ENVS[key]
    start = time.time()
    rows, summary = rollout(scenario, episode_seed(split, seed, index), noise, max_steps, env,
                            _policy(policy_dir), beta)
    for r in rows:
        r["episode"] = index
    return rows, {**summary, "seconds": round(time.time() - start, 2)}


def build_dataset(out_dir: str | Path, n_episodes: int, seed: int = 0, split: str = "train", noise: float = 0.06,
                  scenarios: str | Path = "train", max_steps: int | None = None, progress: bool = True,
                  workers: int | None = None, policy_dir: str | Path | None = None, beta: float = 0.0) -> Path:
    """Roll out `n_episodes` episodes cycling over the suite's scenarios and write out_dir/<split>.parquet and
    out_dir/<split>.json. The expert drives (noised; the val split never is) unless `policy_dir` names a
    model that drives instead (DAgger, see rollout). Returns the parquet path.

    workers: rollout processes (default: min(2, CPUs), 1 below 8 episodes); every episode depends only on its seed (and the
    policy), so the result is the same for any number of workers."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    import os

    from rich.progress import Progress

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = check_suite(load_suite(scenarios))
    noise = 0.0 if split == "val" else noise
    workers = workers or (min(2, os.cpu_count() or 1) if n_episodes >= 8 else 1)  # spawning costs seconds
    policy_dir = str(policy_dir) if policy_dir is not None else None
    jobs = [(str(suite.path), i, split, seed, noise, max_steps, policy_dir, beta) for i in range(n_episodes)]
    start, rows, episodes = time.time(), [], []
    with Progress(disable=not live_bars(progress), transient=True) as bar:
        task = bar.add_task(f"expert rollouts ({split})", total=n_episodes)
        driver = "model" if policy_dir else "expert"  # DAgger: the model drives, the expert labels
        ticker = Ticker(f"{driver} rollouts ({split})", n_episodes, "episodes", enabled=progress)
        if workers > 1 and n_episodes > 1:
            # spawn, not fork: the parent may hold torch/OpenMP threads that a forked child must not inherit.
            pool = ProcessPoolExecutor(min(workers, n_episodes), mp_context=multiprocessing.get_context("spawn"))
            results = pool.map(_episode, jobs)
        else:
            pool, results = None, map(_episode, jobs)
        try:
            for ep_rows, summary in results:
                rows += ep_rows
                episodes.append(summary)
                bar.update(task, advance=1, description=f"expert rollouts ({split}): {len(rows)} steps")
                ticker.update(len(episodes), f"{len(rows)} steps")
        finally:
            if pool:
                pool.shutdown()
    path = out_dir / f"{split}.parquet"
    pq.write_table(_to_table(rows), path)
    config = {"split": split, "n_episodes": n_episodes, "seed": seed, "noise": noise, "max_steps": max_steps,
              "policy": policy_dir, "beta": beta,
              "suite": str(suite.path), "scenarios": [asdict(s) for s in suite.scenarios],
              "expert": asdict(ExpertAgent().config), "rows": len(rows), "seconds": round(time.time() - start, 1),
              "workers": workers, "questions": text.QUESTIONS, "nearby_m": text.NEARBY_M, "episodes": episodes}
    (out_dir / f"{split}.json").write_text(json.dumps(config, indent=2, default=str))
    return path
