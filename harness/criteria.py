"""Leaderboard 2.0 route criteria computed from geometry, the same for every backend.

Collisions, red lights and stop signs come from the backend (it alone knows what was hit); the
criteria here need only the ego's pose and speed along the route: RouteCompletionTest,
OutsideRouteLanesTest, InRouteTest (route deviation), ActorBlockedTest, MinimumSpeedRouteTest
(4 checkpoints), the route timeout, and the Bench2Drive efficiency and comfort figures.
"""
from __future__ import annotations

import numpy as np

from prunedrive.harness.backends.base import BackendState
from prunedrive.harness.events import Event, EventKind
from prunedrive.harness.observation import wrap_angle
from prunedrive.harness.route import RoutePolyline

MIN_SPEED_CHECKPOINTS = 4
ROUTE_MATCH_M = 10.0              # RouteCompletionTest: route points count as reached within this
BLOCKED_SPEED_MPS = 0.1           # ActorBlockedTest min_speed
MIN_SPEED_RADIUS_M = 50.0         # traffic whose speed the ego is compared with
# nuPlan comfort bounds used by Bench2Drive's comfort (smoothness) metric.
MAX_LON_ACCEL, MIN_LON_ACCEL = 2.40, -4.05
MAX_ABS_YAW_RATE = 0.95
MAX_ABS_LON_JERK = 4.13


class RouteCriteria:
    """Follows one episode; `update` once per env step, `finish` once at the end."""

    def __init__(self, route: RoutePolyline, dt: float, duration_s: float, blocked_s: float, deviation_m: float):
        self.route = route
        self.dt = dt
        self.duration_s = duration_s
        self.blocked_s = blocked_s
        self.deviation_m = deviation_m
        self.segment = 0
        self.progress_m = 0.0
        self.lateral_m = 0.0
        self.heading_error = 0.0
        self.outside_m = 0.0
        self.stopped_s = 0.0
        self.events: list[Event] = []
        self.stopped = False  # the route was ended by deviation or a blocked agent
        self.timed_out = False
        self._checkpoint = 0
        self._ego_speeds: list[float] = []
        self._traffic_speeds: list[float] = []
        self.speed_percentages: list[float] = []
        self._comfortable_steps = 0
        self._steps = 0
        self._last_accel: float | None = None
        self._last_yaw: float | None = None

    @property
    def route_completion(self) -> float:
        return 100.0 * min(self.progress_m / max(self.route.length, 1e-9), 1.0)

    @property
    def remaining_m(self) -> float:
        return max(self.route.length - self.progress_m, 0.0)

    def locate(self, state: BackendState) -> None:
        """Project the ego on the route; called at reset and by `update`."""
        ego = state.ego
        self.segment, arc, self.lateral_m = self.route.project(np.array((ego.x, ego.y)), self.segment)
        self.heading_error = float(wrap_angle(ego.yaw - self.route.headings[min(self.segment,
                                                                               len(self.route.headings) - 1)]))
        self._arc = arc

    def update(self, state: BackendState, step: int, backend_events: list[Event] = ()) -> list[Event]:
        """Record the backend's events of this step and add the criteria's own; returns both."""
        previous = self.progress_m
        self.locate(state)
        new: list[Event] = list(backend_events)
        if abs(self.lateral_m) > self.deviation_m:
            new.append(Event(EventKind.ROUTE_DEVIATION, step, detail=f"{abs(self.lateral_m):.1f} m off the route"))
        elif abs(self.lateral_m) <= ROUTE_MATCH_M:
            self.progress_m = max(self.progress_m, self._arc)
        if state.outside_route_lanes:
            self.outside_m += self.progress_m - previous

        speed = state.ego.speed
        self.stopped_s = self.stopped_s + self.dt if speed < BLOCKED_SPEED_MPS else 0.0
        if self.stopped_s >= self.blocked_s:
            new.append(Event(EventKind.AGENT_BLOCKED, step, detail=f"stopped for {self.stopped_s:.0f} s"))
        if state.sim_time_s >= self.duration_s and self.route_completion < 100.0 and not self.timed_out:
            new.append(Event(EventKind.ROUTE_TIMEOUT, step, detail=f"route not finished in {self.duration_s:.0f} s"))

        new += self._min_speed(state, step)
        self._comfort(state)
        self.events += new
        self.stopped = self.stopped or any(
            e.kind in (EventKind.ROUTE_DEVIATION, EventKind.AGENT_BLOCKED) for e in new
        )
        self.timed_out = self.timed_out or any(e.kind == EventKind.ROUTE_TIMEOUT for e in new)
        return new

    def finish(self, step: int) -> list[Event]:
        """Events that are only known at the end: the open min-speed checkpoint and off-lane share."""
        new = self._close_checkpoint(step)
        if self.outside_m > 0.0:
            share = 100.0 * self.outside_m / max(self.route.length, 1e-9)
            new.append(Event(EventKind.OUTSIDE_ROUTE_LANES, step, value=share,
                             detail=f"{self.outside_m:.1f} m of {self.route.length:.1f} m outside the route lanes"))
        self.events += new
        return new

    @property
    def efficiency(self) -> float:
        """Bench2Drive efficiency: mean ego speed as a % of nearby traffic's, over checkpoints."""
        return float(np.mean(self.speed_percentages)) if self.speed_percentages else float("nan")

    @property
    def comfort(self) -> float:
        """Bench2Drive-style comfort: % of steps within nuPlan's comfort bounds."""
        return 100.0 * self._comfortable_steps / self._steps if self._steps else float("nan")

    def _min_speed(self, state: BackendState, step: int) -> list[Event]:
        vehicles = state.objects.vehicles
        if len(vehicles):
            near = np.hypot(vehicles[:, 0] - state.ego.x, vehicles[:, 1] - state.ego.y) < MIN_SPEED_RADIUS_M
            if near.any():
                self._ego_speeds.append(state.ego.speed)
                self._traffic_speeds.append(float(np.hypot(vehicles[near, 2], vehicles[near, 3]).mean()))
        checkpoint = int(self.route_completion / (100.0 / MIN_SPEED_CHECKPOINTS))
        if checkpoint > self._checkpoint:
            self._checkpoint = checkpoint
            return self._close_checkpoint(step)
        return []

    def _close_checkpoint(self, step: int) -> list[Event]:
        ego, traffic = self._ego_speeds, self._traffic_speeds
        self._ego_speeds, self._traffic_speeds = [], []
        if not ego or np.mean(traffic) < BLOCKED_SPEED_MPS:
            return []
        percentage = 100.0 * float(np.mean(ego)) / float(np.mean(traffic))
        self.speed_percentages.append(percentage)
        if percentage < 100.0:
            return [Event(EventKind.MIN_SPEED, step, value=percentage,
                          detail=f"ego at {percentage:.0f}% of traffic speed")]
        return []

    def _comfort(self, state: BackendState) -> None:
        accel, yaw = state.ego.accel, state.ego.yaw
        ok = MIN_LON_ACCEL <= accel <= MAX_LON_ACCEL
        if self._last_accel is not None:
            ok = ok and abs(accel - self._last_accel) / self.dt <= MAX_ABS_LON_JERK
            yaw_rate = wrap_angle(yaw - self._last_yaw) / self.dt
            ok = ok and abs(yaw_rate) <= MAX_ABS_YAW_RATE
        self._last_accel, self._last_yaw = accel, yaw
        self._steps += 1
        self._comfortable_steps += int(ok)
