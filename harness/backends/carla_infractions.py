"""The infractions the CARLA backend detects itself, as the Leaderboard 2.0 criteria count them (the shared
criteria in harness/criteria.py do the rest). One class per criterion, made fresh for each episode:

- `CollisionTest`: collisions, typed by the other actor's type_id (walker / vehicle / anything else =
  static), counted as the Leaderboard 2.0 CollisionTest does: a hit is ignored while the same actor was hit
  in the last COLLISION_MEMORY_S seconds, while the ego is within COLLISION_RADIUS_M of the last counted
  collision, or when the ego is (nearly) standing (the other party's fault);
- `RedLightTest`: every traffic light's stop waypoints (`TrafficLight.get_stop_waypoints`, read by
  carla_world.read_statics) are stop lines, one lane wide and across the lane. The ego runs a red light
  when, between two ticks, the point at its rear bumper crosses a stop line from the approach side to the
  junction side while it heads the lane's way (within 90 degrees) and that light is red. A light counts
  once until another one is run (the Leaderboard checks the rear too: the car is committed once its tail
  passes the line);
- `StopSignTest`: a sign "affects" the ego while its centre, its front bumper or a point 2 m ahead of it
  lies in the sign's trigger volume (enlarged 1.2x, like RunningStopTest). Leaving that area without
  having gone below STOP_SPEED_MPS inside it is an infraction;
- `RouteTimeout`: the route timeout, as the Leaderboard 2.0 sets it (scenario_runner's
  RouteTimeoutBehavior): ROUTE_TIMEOUT_MIN_S to start with, growing by the time each metre advanced along
  the route takes at ROUTE_TIMEOUT_SPEED_PCT % of the lane's speed limit; a ROUTE_TIMEOUT event once the
  simulated time is past it. The env then applies no fixed timeout: the suite's `duration_s` is not used.
(Outside route lanes, OutsideRouteLanesTest's two cases, is read with the state: carla_world.WorldReader.)
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from prunedrive.harness.events import Event, EventKind

COLLISION_MEMORY_S = 5.0      # CollisionTest.MAX_ID_TIME
COLLISION_RADIUS_M = 5.0      # CollisionTest.COLLISION_RADIUS
COLLISION_MIN_SPEED = 0.1     # CollisionTest.EPSILON: a standing ego is not at fault
STOP_SPEED_MPS = 0.1          # RunningStopTest.SPEED_THRESHOLD
LIGHT_CHECK_RADIUS_M = 25.0   # stop lines farther than this from the ego are not tested
ROUTE_TIMEOUT_MIN_S = 300.0   # RouteTimeoutBehavior.MIN_TIMEOUT (scenario_runner timer.py) ...
ROUTE_TIMEOUT_SPEED_PCT = 10  # ... plus each metre advanced at TIMEOUT_ROUTE_PERC % of the speed limit


def rear_point(transform, half_length: float) -> np.ndarray:
    """The point at the rear bumper of a vehicle at `transform` whose bounding box is 2 x `half_length` long."""
    yaw = math.radians(transform.rotation.yaw)
    return np.array([transform.location.x - half_length * math.cos(yaw),
                     transform.location.y - half_length * math.sin(yaw)])


class CollisionTest:
    """Counts the contacts the collision sensor recorded as (time, other actor id, its type_id, x, y, ego speed)."""

    def __init__(self):
        self._last_hit = (None, -math.inf, None)  # other actor id, time, ego location of the last counted hit

    def events(self, contacts: deque, step: int) -> list[Event]:
        """The counted collisions among `contacts` (consumed)."""
        events = []
        while contacts:
            time, other_id, type_id, x, y, speed = contacts.popleft()
            last_id, last_time, last_xy = self._last_hit
            if other_id == last_id and time - last_time <= COLLISION_MEMORY_S:
                continue
            if last_xy is not None and math.hypot(x - last_xy[0], y - last_xy[1]) <= COLLISION_RADIUS_M:
                continue
            if speed < COLLISION_MIN_SPEED:
                continue
            self._last_hit = (other_id, time, (x, y))
            if "walker" in type_id:
                kind = EventKind.COLLISION_PEDESTRIAN
            elif "vehicle" in type_id:
                kind = EventKind.COLLISION_VEHICLE
            else:
                kind = EventKind.COLLISION_STATIC
            events.append(Event(kind, step, detail=f"hit {type_id} (id {other_id}) at {speed:.1f} m/s"))
        return events

    def forget_far_hit(self, x: float, y: float) -> None:
        """The ego at (x, y) has left the last counted collision's radius: a new hit there counts again."""
        other_id, time, xy = self._last_hit
        if xy is not None and math.hypot(x - xy[0], y - xy[1]) > COLLISION_RADIUS_M:
            self._last_hit = (other_id, time, None)


class RedLightTest:
    """Stop lines crossed at the rear bumper on red; `statics` is carla_world.read_statics of the loaded world,
    `red` the api's TrafficLightState.Red, `transform` where the ego starts."""

    def __init__(self, statics: dict, red, half_length: float, transform):
        self.statics, self.red, self.half_length = statics, red, half_length
        self._last_red = None
        self._rear = rear_point(transform, half_length)

    def check(self, transform, step: int) -> list[Event]:
        """The ego moved to `transform` since the last check (one tick)."""
        yaw = math.radians(transform.rotation.yaw)
        rear = rear_point(transform, self.half_length)
        events = self._crossed_on_red(self._rear, rear, yaw, step)
        self._rear = rear
        return events

    def _crossed_on_red(self, a: np.ndarray, b: np.ndarray, yaw: float, step: int) -> list[Event]:
        stops = self.statics["stops"]
        if not len(stops):
            return []
        near = np.flatnonzero(np.hypot(stops[:, 0] - b[0], stops[:, 1] - b[1]) < LIGHT_CHECK_RADIUS_M)
        for k in near:
            px, py, fx, fy, half_width, light_index = stops[k]
            if math.cos(yaw) * fx + math.sin(yaw) * fy <= 0.0:  # not heading the lane's way
                continue
            sa, sb = (a[0] - px) * fx + (a[1] - py) * fy, (b[0] - px) * fx + (b[1] - py) * fy
            if not sa < 0.0 <= sb:
                continue
            t = sa / (sa - sb)
            cx, cy = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
            if abs(-(cx - px) * fy + (cy - py) * fx) > half_width:
                continue
            light = self.statics["lights"][int(light_index)]
            if light.id != self._last_red and light.state == self.red:
                self._last_red = light.id
                return [Event(EventKind.RED_LIGHT, step, detail=f"ran red light {light.id} at "
                                                                f"({px:.1f}, {py:.1f})")]
        return []


class StopSignTest:
    """Stop-sign areas left without stopping; `statics` is carla_world.read_statics of the loaded world."""

    def __init__(self, statics: dict, half_length: float):
        self.statics, self.half_length = statics, half_length
        self._target, self._done = None, False  # the sign affecting the ego; whether it stopped there

    def check(self, x: float, y: float, yaw: float, speed: float, step: int) -> list[Event]:
        ahead = np.array([0.0, self.half_length, self.half_length + 2.0])
        points = np.stack((x + ahead * math.cos(yaw), y + ahead * math.sin(yaw)), axis=1)
        affecting = None
        for sign_id, cx, cy, syaw, ex, ey in self.statics["signs"]:
            if math.hypot(cx - x, cy - y) > 30.0:
                continue
            dx, dy = points[:, 0] - cx, points[:, 1] - cy
            along, across = dx * math.cos(syaw) + dy * math.sin(syaw), -dx * math.sin(syaw) + dy * math.cos(syaw)
            if ((np.abs(along) <= ex) & (np.abs(across) <= ey)).any():
                affecting = sign_id
                break
        events = []
        if affecting != self._target:
            if self._target is not None and not self._done:
                events.append(Event(EventKind.STOP_SIGN, step, detail=f"did not stop at stop sign {self._target}"))
            self._target, self._done = affecting, False
        if self._target is not None and speed < STOP_SPEED_MPS:
            self._done = True
        return events


class RouteTimeout:
    """The Leaderboard 2.0 route timeout (scenario_runner's RouteTimeoutBehavior): ROUTE_TIMEOUT_MIN_S to start
    with, plus, for each metre the ego advances along the route, the time that metre takes at
    ROUTE_TIMEOUT_SPEED_PCT % of the lane's speed limit; the route times out once the simulated time exceeds it."""

    def __init__(self):
        self.timeout_s, self._arc, self._timed_out = ROUTE_TIMEOUT_MIN_S, 0.0, False

    def check(self, arc: float, speed_limit: float, sim_time_s: float, step: int) -> list[Event]:
        """The ego is `arc` metres along the route at `sim_time_s`, on a lane limited to `speed_limit` m/s."""
        if arc > self._arc:
            speed = speed_limit * ROUTE_TIMEOUT_SPEED_PCT / 100.0
            self.timeout_s += (arc - self._arc) / max(speed, 1e-3)
            self._arc = arc
        if self._timed_out or sim_time_s <= self.timeout_s:
            return []
        self._timed_out = True
        return [Event(EventKind.ROUTE_TIMEOUT, step,
                      detail=f"route not finished in {self.timeout_s:.0f} s (Leaderboard route timeout)")]
