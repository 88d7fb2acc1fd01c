"""CARLA Leaderboard 2.0 scoring (leaderboard/utils/statistics_manager.py), shared by all backends.

The scorer reads events and route completion only; it never touches a simulator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from prunedrive.harness.events import COLLISIONS, Event, EventKind

# Events that multiply the penalty by a fixed coefficient (PENALTY_VALUE_DICT).
PENALTY_COEFFICIENT = {
    EventKind.COLLISION_PEDESTRIAN: 0.50,
    EventKind.COLLISION_VEHICLE: 0.60,
    EventKind.COLLISION_STATIC: 0.65,
    EventKind.RED_LIGHT: 0.70,
    EventKind.STOP_SIGN: 0.80,
    EventKind.SCENARIO_TIMEOUT: 0.70,
    EventKind.YIELD_TO_EMERGENCY_VEHICLE: 0.70,
}

# Events whose penalty scales with a percentage (PENALTY_PERC_DICT): (coefficient, direction).
# "increases": the larger the percentage, the larger the penalty: penalty *= 1 - (1 - c) * p/100.
#   With c = 0 the share of the route driven outside the route lanes is taken off, the
#   Leaderboard's "all route traversed through outside lanes is ignored".
# "decreases": 100% is ideal: penalty *= 1 - (1 - c) * (1 - p/100).
PENALTY_PERCENTAGE = {
    EventKind.OUTSIDE_ROUTE_LANES: (0.0, "increases"),
    EventKind.MIN_SPEED: (0.70, "decreases"),
}

# Events that end the route, and the episode status they give.
STOPPING_EVENTS = {
    EventKind.ROUTE_DEVIATION: "route_deviation",
    EventKind.AGENT_BLOCKED: "agent_blocked",
    EventKind.ROUTE_TIMEOUT: "timeout",
}

STATUSES = ("finished", "collision_ended", "route_deviation", "agent_blocked", "timeout", "failed")


@dataclass
class EpisodeScore:
    route_completion: float  # percent, 0-100
    infraction_penalty: float  # 0-1
    driving_score: float  # percent, route_completion * infraction_penalty
    status: str
    infractions: dict[str, int] = field(default_factory=dict)


def infraction_penalty(events: list[Event]) -> float:
    penalty = 1.0
    for event in events:
        if event.kind in PENALTY_COEFFICIENT:
            penalty *= PENALTY_COEFFICIENT[event.kind]
        elif event.kind in PENALTY_PERCENTAGE:
            coefficient, direction = PENALTY_PERCENTAGE[event.kind]
            share = min(max(float(event.value), 0.0), 100.0) / 100.0
            if direction == "increases":
                penalty *= 1.0 - (1.0 - coefficient) * share
            else:
                penalty *= 1.0 - (1.0 - coefficient) * (1.0 - share)
    return penalty


def episode_status(route_completion: float, events: list[Event], collision_ended: bool,
                   error: str | None = None) -> str:
    if error is not None:
        return "failed"
    if route_completion >= 100.0:
        return "finished"
    for event in events:
        if event.kind in STOPPING_EVENTS:
            return STOPPING_EVENTS[event.kind]
    if collision_ended or any(e.kind in COLLISIONS for e in events):
        return "collision_ended"
    return "timeout"


def score_episode(route_completion: float, events: list[Event], collision_ended: bool = False,
                  error: str | None = None) -> EpisodeScore:
    route_completion = min(max(route_completion, 0.0), 100.0)
    penalty = infraction_penalty(events)
    counts = {kind.value: 0 for kind in EventKind}
    for event in events:
        counts[event.kind.value] += 1
    return EpisodeScore(
        route_completion=route_completion,
        infraction_penalty=penalty,
        driving_score=max(route_completion * penalty, 0.0),
        status=episode_status(route_completion, events, collision_ended, error),
        infractions=counts,
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation, as the Leaderboard's global record (NaN std for one)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def km_driven(route_length_m: float, route_completion: float) -> float:
    """Kilometres of route driven, as the Leaderboard counts them for infractions per km."""
    return route_length_m / 1000.0 * route_completion / 100.0
