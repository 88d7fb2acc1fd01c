"""Traffic events: what backends and criteria report, and what the scorer reads.

Names follow the CARLA Leaderboard's TrafficEventType, lower-cased.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class EventKind(str, Enum):
    COLLISION_PEDESTRIAN = "collision_pedestrian"
    COLLISION_VEHICLE = "collision_vehicle"
    COLLISION_STATIC = "collision_static"
    RED_LIGHT = "red_light"
    STOP_SIGN = "stop_sign"
    SCENARIO_TIMEOUT = "scenario_timeout"
    YIELD_TO_EMERGENCY_VEHICLE = "yield_to_emergency_vehicle"
    MIN_SPEED = "min_speed"                      # value: ego speed as % of traffic speed
    OUTSIDE_ROUTE_LANES = "outside_route_lanes"  # value: % of the route driven outside
    ROUTE_DEVIATION = "route_deviation"
    AGENT_BLOCKED = "agent_blocked"
    ROUTE_TIMEOUT = "route_timeout"


COLLISIONS = frozenset(
    {EventKind.COLLISION_PEDESTRIAN, EventKind.COLLISION_VEHICLE, EventKind.COLLISION_STATIC}
)


@dataclass(frozen=True)
class Event:
    kind: EventKind
    step: int
    value: float | None = None  # percentage for MIN_SPEED and OUTSIDE_ROUTE_LANES
    detail: str = ""


@dataclass
class StepEvents:
    """What one simulator step produced, beyond the observation."""

    events: list[Event] = field(default_factory=list)
    ended: bool = False  # the simulator ended the episode (e.g. highway-env stops a crashed ego)
