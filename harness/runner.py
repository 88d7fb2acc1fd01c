"""Run agents x scenarios x seeds closed-loop; write each episode as soon as it ends."""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from agents.base import Agent, compute_report
from harness.backends.base import SimulatorError
from harness.compute import COMPUTE_FIELDS, aggregate
from harness.env import DriveEnv, EpisodeOutcome
from harness.events import EventKind
from harness.results import RunDir, episode_key
from harness.scoring import km_driven, score_episode
from harness.video import VideoWriter
from scenarios.loader import Scenario, Suite

MakeEnv = Callable[[Scenario, bool], DriveEnv]


def default_make_env(scenario: Scenario, record: bool, **backend_options) -> DriveEnv:
    return DriveEnv(scenario, render_mode="rgb_array" if record else None, **backend_options)


def run_episode(env: DriveEnv, agent: Agent, scenario: Scenario, seed: int,
                video_path: Path | None = None) -> tuple[EpisodeOutcome, pd.DataFrame]:
    """One closed-loop episode. Exceptions propagate; the caller records them."""
    agent.reset(scenario)
    observation, _ = env.reset(seed=seed)
    columns: dict[str, list] = {name: [] for name in ("step", "sim_time_s", "throttle", "brake", "steer",
                                                      "speed_mps", "route_completion", *COMPUTE_FIELDS)}
    model_fields = COMPUTE_FIELDS[3:]
    video = VideoWriter(video_path, fps=env.metadata["render_fps"]) if video_path else None
    try:
        while True:
            wall, cpu = time.perf_counter(), time.process_time()
            control = agent.act(observation)
            agent_wall_s, agent_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
            report = compute_report(agent)
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
            for name in model_fields:
                columns[name].append(report.get(name, np.nan))
            if terminated or truncated:
                return info["outcome"], pd.DataFrame(columns)
    finally:
        if video:
            video.close()


def episode_row(outcome: EpisodeOutcome | None, steps: pd.DataFrame, *, run_id: str, agent: str,
                scenario: Scenario, seed: int, wall_s: float, error: str | None = None) -> dict:
    if outcome is None:  # failed before the env could report anything
        outcome = EpisodeOutcome(route_completion=0.0, route_length_m=np.nan, events=[], collision_ended=False,
                                 sim_time_s=0.0, efficiency=np.nan, comfort=np.nan, steps=len(steps))
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
        "collisions": sum(score.infractions[k.value] for k in
                          (EventKind.COLLISION_PEDESTRIAN, EventKind.COLLISION_VEHICLE, EventKind.COLLISION_STATIC)),
        "outside_lanes_m": outcome.outside_lanes_m,
        "events": "; ".join(f"{e.kind.value}@{e.step}" + (f"={e.value:.1f}" if e.value is not None else "")
                            for e in outcome.events),
        "error": error or "",
    }
    row.update({f"n_{kind}": count for kind, count in score.infractions.items()})
    row.update(aggregate({name: steps[name].to_numpy() if name in steps else np.array([]) for name in COMPUTE_FIELDS}))
    return row


def run_episode_with_retries(envs: dict, agent, scenario: Scenario, seed: int, *, run_id: str,
                             video: Path | None = None, record: bool = False, retries: int = 2,
                             make_env: Callable[..., Any] = default_make_env, backend_options: dict | None = None,
                             backoff_s: float = 2.0) -> tuple[dict, pd.DataFrame]:
    """One episode, as `run_suite` runs it: the env for `scenario` from `envs` (created on first use),
    a simulator failure closes the env, backs off and retries (up to `retries` times), any other
    exception is recorded with its traceback and the progress so far. Returns the episode row and its
    steps; never raises for a failing episode."""
    started = time.perf_counter()
    outcome, steps, error = None, pd.DataFrame(), None
    for attempt in range(retries + 1):
        try:
            if scenario.name not in envs:
                envs[scenario.name] = make_env(scenario, record, **(backend_options or {}))
            outcome, steps = run_episode(envs[scenario.name], agent, scenario, seed, video)
            error = None
            break
        except SimulatorError as exc:
            # Leaderboard's "Simulation crashed": reconnect with back-off, retry the episode.
            error = f"simulator: {exc}"
            _close(envs.pop(scenario.name, None))
            if attempt < retries:
                time.sleep(backoff_s * 2**attempt)
        except Exception:  # noqa: BLE001 -- one failing episode must not stop the run
            error = traceback.format_exc()
            outcome = _partial_outcome(envs.get(scenario.name))
            break
    row = episode_row(outcome, steps, run_id=run_id, agent=agent.name, scenario=scenario, seed=seed,
                      wall_s=time.perf_counter() - started, error=error)
    return row, steps


def run_suite(suite: Suite, agents: list[Agent], run_dir: RunDir, *, record: bool = False, retries: int = 2,
              progress: bool = True, make_env: Callable[..., DriveEnv] = default_make_env,
              backend_options: dict | None = None, backoff_s: float = 2.0) -> pd.DataFrame:
    """Run every (agent, scenario, seed) episode not yet in `run_dir`; return all episodes."""
    run_id = run_dir.path.name
    done = run_dir.finished()
    todo = [(a, s, seed) for a in agents for s, seed in suite.episodes()
            if episode_key(a.name, s.name, seed) not in done]
    with _progress(progress, total=len(todo)) as bar:
        envs: dict[str, DriveEnv] = {}
        try:
            for agent, scenario, seed in todo:
                key = episode_key(agent.name, scenario.name, seed)
                bar.describe(f"{agent.name} {scenario.name} seed={seed}")
                video = run_dir.path / "videos" / f"{key}.mp4" if record else None
                row, steps = run_episode_with_retries(envs, agent, scenario, seed, run_id=run_id, video=video,
                                                      record=record, retries=retries, make_env=make_env,
                                                      backend_options=backend_options, backoff_s=backoff_s)
                run_dir.write_episode(key, row, steps)
                bar.advance(row)
        finally:
            for env in envs.values():
                _close(env)
    run_dir.consolidate()
    return run_dir.episodes()


def _partial_outcome(env: DriveEnv | None) -> EpisodeOutcome | None:
    """What the env knew when an episode failed: the Leaderboard scores a crashed route so far."""
    if env is None or env.criteria is None or not hasattr(env, "_state"):
        return None
    return env.outcome(collision_ended=False)


def _close(env: DriveEnv | None) -> None:
    if env is None:
        return
    try:
        env.close()
    except Exception:  # noqa: BLE001 -- a dead simulator may fail to close; nothing to keep
        pass


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
