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
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from agents.expert import ExpertAgent
from harness.action import Control
from harness.env import DriveEnv
from harness.observation import EGO_FEATURES, OBS_SHAPES, TRAFFIC_LIGHT_STATES
from models import text
from scenarios.loader import Scenario, load_suite

TRAIN_SEED_BASE, VAL_SEED_BASE, DAGGER_SEED_BASE = 100_000, 90_000, 200_000  # evaluation suites use seeds < 10000
_SPEED, _LIMIT = EGO_FEATURES.index("speed_mps"), EGO_FEATURES.index("speed_limit_mps")
_STOP_STATES = (TRAFFIC_LIGHT_STATES.index("red"), TRAFFIC_LIGHT_STATES.index("yellow"))


def episode_seed(split: str, seed: int, index: int) -> int:
    if split == "val":
        return VAL_SEED_BASE + 1000 * seed + index
    if split == "dagger":
        return DAGGER_SEED_BASE + 1000 * seed + index
    return TRAIN_SEED_BASE + 1000 * seed + index


def expert_reason(expert: ExpertAgent, obs: dict[str, np.ndarray]) -> str:
    """Why the expert does what it does, from its own internals (IDM gap, curve speed)."""
    c = expert.config
    route = obs["route"][obs["route_mask"].astype(bool)]
    if len(route) < 2:
        return "the route ends"
    speed, limit = float(obs["ego"][_SPEED]), float(obs["ego"][_LIMIT])
    _, curvature = expert._steer(route, speed)
    target = min(limit, np.sqrt(c.max_lateral_accel / max(curvature, 1e-4)))
    gap, lead_speed = expert._nearest_obstacle(obs, route, speed)
    if np.isfinite(gap):
        desired = c.min_gap_m + speed * c.time_headway_s + speed * (speed - lead_speed) / (
            2.0 * np.sqrt(c.comfort_accel * c.comfort_decel))
        if (max(desired, 0.0) / max(gap, 0.1)) ** 2 > 0.25:  # the obstacle term costs >= 0.5 m/s^2
            if obs["traffic_light_mask"][0] and obs["traffic_light"][0] in _STOP_STATES and \
                    abs(gap - (float(obs["traffic_light"][1]) - 2.0)) < 1e-4:
                return "stopping for the traffic light"
            lead = text.perception_labels(obs)["lead_distance_m"]
            if lead is not None and abs(gap - (lead - c.vehicle_length_m)) < 1e-3:
                return "following the lead car"
            return "yielding"
    if target < limit - 0.5 and speed > target - 2.0:
        return "slowing for the curve"
    return "cruising"


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


def rollout(scenario: Scenario, seed: int, noise: float = 0.0, max_steps: int | None = None,
            env: DriveEnv | None = None, policy=None, beta: float = 0.0) -> tuple[list[dict], dict]:
    """One episode -> per-step rows (labelled by the expert) and an episode summary.

    Without `policy` the expert drives (with noise bursts). With a policy (an Agent, e.g. the LLM) that
    policy drives, except on a `beta` share of steps where the expert does: DAgger, which collects the
    states the learner itself visits, labelled with what the expert would do there."""
    from harness.scoring import score_episode

    env = env or DriveEnv(scenario)
    expert, rng, burst = ExpertAgent(), np.random.default_rng(seed), _Burst()
    obs, _ = env.reset(seed=seed)
    if policy is not None:
        policy.reset(scenario)
    rows, step, info = [], 0, {}
    while True:
        label = expert.act(obs)
        reason = expert_reason(expert, obs)
        if policy is not None:
            executed = label if rng.random() < beta else policy.act(obs)
        else:
            if burst.steps_left <= 0 and noise > 0 and rng.random() < noise:
                burst = _new_burst(rng)
            executed = burst.apply(label) if burst.steps_left > 0 else label
        p = text.perception_labels(obs)
        rows.append({
            "scenario": scenario.name, "kind": scenario.kind, "seed": seed, "step": step,
            **{f"obs_{k}": np.asarray(obs[k], np.float32).ravel() for k in OBS_SHAPES},
            "throttle": label.throttle, "brake": label.brake, "steer": label.steer,
            "exec_throttle": executed.throttle, "exec_brake": executed.brake, "exec_steer": executed.steer,
            "noisy": executed != label, "reason": reason, **p,
            **{f"q_{k}": text.prompt(k) for k in text.QUESTIONS},
            **{f"a_{k}": a for k, a in text.answers(obs, label, reason).items()},
        })
        obs, _, terminated, truncated, info = env.step(executed)
        step += 1
        if terminated or truncated or (max_steps and step >= max_steps):
            break
    outcome = info.get("outcome") or env.outcome(collision_ended=False)
    score = score_episode(outcome.route_completion, outcome.events, outcome.collision_ended)
    return rows, {"scenario": scenario.name, "kind": scenario.kind, "seed": seed, "steps": step,
                  "driving_score": score.driving_score, "status": score.status}


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

        from agents.llm import LLMAgent

        if multiprocessing.parent_process() is not None:
            torch.set_num_threads(1)  # one rollout process per core; batch-1 decoding gains nothing from threads
        _WORKER_POLICIES[model_dir] = LLMAgent(model_dir)
    return _WORKER_POLICIES[model_dir]


@functools.cache
def _worker_suite(suite_path: str):
    return load_suite(suite_path)  # once per process, not per episode


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
    suite = load_suite(scenarios)
    noise = 0.0 if split == "val" else noise
    workers = workers or (min(2, os.cpu_count() or 1) if n_episodes >= 8 else 1)  # spawning costs seconds
    policy_dir = str(policy_dir) if policy_dir is not None else None
    jobs = [(str(suite.path), i, split, seed, noise, max_steps, policy_dir, beta) for i in range(n_episodes)]
    start, rows, episodes = time.time(), [], []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"expert rollouts ({split})", total=n_episodes)
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


@dataclass
class Split:
    """A loaded split: observations as arrays (N, ...) keyed like the env's observation, plus the table."""
    obs: dict[str, np.ndarray]
    frame: pd.DataFrame

    def __len__(self) -> int:
        return len(self.frame)

    def observation(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.obs.items()}


def load_split(path: str | Path, split: str = "val") -> Split:
    """Load `<dir>/<split>.parquet` or a parquet file path."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset split at {path}; build one with models.dataset.build_dataset")
    table = pq.read_table(path)
    obs = {k: table.column(f"obs_{k}").combine_chunks().flatten().to_numpy().reshape(len(table), *shape)
           for k, shape in OBS_SHAPES.items()}
    frame = table.drop_columns([f"obs_{k}" for k in OBS_SHAPES]).to_pandas()
    return Split(obs, frame)


def synthetic_split(n: int = 24, seed: int = 0) -> Split:
    """Random but well-formed observations with expert-style answers and labels, no simulator needed
    (for unit tests and quick pruning-calibration checks; not driving data)."""
    rng = np.random.default_rng(seed)
    obs = {k: rng.normal(0, 5, (n, *s)).astype(np.float32) for k, s in OBS_SHAPES.items()}
    for k in ("route_mask", "vehicles_mask", "pedestrians_mask", "traffic_light_mask"):
        obs[k] = (rng.random((n, *OBS_SHAPES[k])) < 0.6).astype(np.float32)
    obs["route_mask"][:] = 1
    obs["route"][:, :, 0] = np.abs(obs["route"][:, :, 0]).cumsum(1)
    obs["traffic_light"][:, 0] = rng.integers(0, 3, n)
    rows = []
    for i in range(n):
        o = {k: v[i] for k, v in obs.items()}
        c = Control(float(rng.random()), 0.0, float(rng.uniform(-0.3, 0.3)))
        rows.append({**text.perception_labels(o), "throttle": c.throttle, "brake": c.brake, "steer": c.steer,
                     **{f"a_{k}": a for k, a in text.answers(o, c, "cruising").items()}})
    return Split(obs, pd.DataFrame(rows))


def lm_calibration_samples(model, split: Split, n_samples: int = 128, seed: int = 0,
                           kinds: tuple[str, ...] = tuple(text.QUESTIONS)) -> list[dict]:
    """Driving-domain calibration for pruning: per sampled row, the LM forward kwargs of the full teacher-forced
    sequence [latents] + prompt + answer (batch 1, unpadded, detached), questions cycling over `kinds`.
    Feed the list to models.pruning.driving_calibration / prune(..., calibration=...)."""
    import torch

    from models.driving_llm import collate

    rows = np.random.default_rng(seed).permutation(len(split))[:n_samples]
    samples = []
    with torch.no_grad():
        for j, r in enumerate(rows):
            kind = kinds[j % len(kinds)]
            ids = model.prompt_ids(text.prompt(kind)) + model.tokenizer.encode(split.frame[f"a_{kind}"].iloc[r])
            inputs = model.lm_inputs(collate([split.observation(int(r))]), torch.tensor([ids]))
            samples.append({k: v.detach() for k, v in inputs.items()})
    return samples
