"""An episode's results: the per-step columns it records and its results row, the one place the scorer is
called (an episode's outcome -> Leaderboard scores, infractions, km, compute aggregates)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from prunedrive.harness.compute import COMPUTE_FIELDS, aggregate
from prunedrive.harness.env import EpisodeOutcome
from prunedrive.harness.events import COLLISIONS, EventKind
from prunedrive.harness.latency import LATENCY_STEP_COLUMNS, latency_metrics
from prunedrive.harness.scoring import km_driven, score_episode
from prunedrive.scenarios.loader import Scenario

STEP_COLUMNS = ("step", "sim_time_s", "throttle", "brake", "steer", "speed_mps", "route_completion", *COMPUTE_FIELDS,
                "batch_size")  # batch_size: how many episodes' steps the agent decided in the call (1: alone)
MODEL_FIELDS = COMPUTE_FIELDS[3:]  # what a model-backed agent reports per step (harness.compute)


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
