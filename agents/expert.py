"""The privileged rule-based expert: pure pursuit on the route, IDM car following, and yielding to
anything whose predicted path crosses the ego's. It reads only the object-level observation (ground
truth, hence "privileged"), so it drives any backend and generates the LLM's training data."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunedrive.harness.action import MAX_STEER_RAD, Control
from prunedrive.harness.observation import EGO_FEATURES, TRAFFIC_LIGHT_STATES, VEHICLE_LENGTH_M
from prunedrive.harness.route import project_points
from prunedrive.models.text import perception_labels
from prunedrive.scenarios.loader import Scenario

_SPEED = EGO_FEATURES.index("speed_mps")
_LIMIT = EGO_FEATURES.index("speed_limit_mps")
_RED, _YELLOW = TRAFFIC_LIGHT_STATES.index("red"), TRAFFIC_LIGHT_STATES.index("yellow")


@dataclass
class ExpertConfig:
    wheelbase_m: float = VEHICLE_LENGTH_M  # highway-env's bicycle: yaw rate = v * tan(delta) / wheelbase
    max_steer_rad: float = MAX_STEER_RAD   # front-wheel angle at steer = 1
    max_accel: float = 4.0            # m/s^2 at full throttle
    max_decel: float = 8.0            # m/s^2 at full brake
    comfort_accel: float = 2.0        # IDM a
    comfort_decel: float = 3.0        # IDM b
    time_headway_s: float = 1.3       # IDM T
    min_gap_m: float = 3.0            # IDM s0, bumper to bumper
    vehicle_length_m: float = VEHICLE_LENGTH_M
    max_lateral_accel: float = 2.5    # caps speed in curves
    horizon_s: float = 4.0            # how far ahead conflicts are predicted
    conflict_radius_m: float = 4.0
    # Whom the expert follows; wider than the 2.2 m of models.text.CORRIDOR_HALF_WIDTH_M, which labels the
    # lead vehicle in the training text: two different quantities, each with one home.
    corridor_half_width_m: float = 2.5


class ExpertAgent:
    name = "expert"

    def __init__(self, config: ExpertConfig | None = None):
        self.config = config or ExpertConfig()

    def reset(self, scenario: Scenario) -> None:
        pass

    def act(self, observation: dict[str, np.ndarray]) -> Control:
        c = self.config
        speed = float(observation["ego"][_SPEED])
        route = observation["route"][observation["route_mask"].astype(bool)]
        if len(route) < 2:
            return Control(brake=1.0)
        steer, curvature_ahead = self._steer(route, speed)
        target = min(float(observation["ego"][_LIMIT]), np.sqrt(c.max_lateral_accel / max(curvature_ahead, 1e-4)))
        gap, lead_speed = self._nearest_obstacle(observation, route, speed)
        accel = self._idm(speed, target, gap, lead_speed)
        if accel >= 0:
            return Control(throttle=float(np.clip(accel / c.max_accel, 0, 1)), steer=steer)
        return Control(brake=float(np.clip(-accel / c.max_decel, 0, 1)), steer=steer)

    def reason(self, obs: dict[str, np.ndarray]) -> str:
        """Why the expert does what it does in `obs`, from its own internals (IDM gap, curve speed): the
        reason the driving LLM is trained to give."""
        c = self.config
        route = obs["route"][obs["route_mask"].astype(bool)]
        if len(route) < 2:
            return "the route ends"
        speed, limit = float(obs["ego"][_SPEED]), float(obs["ego"][_LIMIT])
        _, curvature = self._steer(route, speed)
        target = min(limit, np.sqrt(c.max_lateral_accel / max(curvature, 1e-4)))
        gap, lead_speed = self._nearest_obstacle(obs, route, speed)
        # The obstacle term of the IDM costs >= 0.5 m/s^2: the obstacle is why the expert slows.
        if np.isfinite(gap) and (max(self._desired_gap(speed, lead_speed), 0.0) / max(gap, 0.1)) ** 2 > 0.25:
            if obs["traffic_light_mask"][0] and obs["traffic_light"][0] in (_RED, _YELLOW) and \
                    abs(gap - (float(obs["traffic_light"][1]) - 2.0)) < 1e-4:
                return "stopping for the traffic light"
            lead = perception_labels(obs)["lead_distance_m"]
            if lead is not None and abs(gap - (lead - c.vehicle_length_m)) < 1e-3:
                return "following the lead car"
            return "yielding"
        if target < limit - 0.5 and speed > target - 2.0:
            return "slowing for the curve"
        return "cruising"

    def _steer(self, route: np.ndarray, speed: float) -> tuple[float, float]:
        """Pure pursuit towards the route point one look-ahead distance away."""
        c = self.config
        distance = np.hypot(route[:, 0], route[:, 1])
        lookahead = np.clip(3.0 + 0.5 * speed, 6.0, 20.0)
        i = int(np.argmax(distance >= lookahead)) if (distance >= lookahead).any() else len(route) - 1
        x, y = route[i]
        curvature = 2.0 * y / max(x * x + y * y, 1e-6)
        steer = np.arctan(curvature * c.wheelbase_m) / c.max_steer_rad
        ahead = route[distance < 30.0 + speed * 2.0]
        curvature_ahead = max(abs(curvature), _max_curvature(ahead))
        return float(np.clip(steer, -1.0, 1.0)), curvature_ahead

    def _nearest_obstacle(self, observation, route: np.ndarray, speed: float) -> tuple[float, float]:
        """Bumper gap and speed of the nearest thing to stop for: a lead in the route corridor, a
        predicted crossing conflict (treated as stopped), or a red light."""
        c = self.config
        gap, lead_speed = np.inf, 0.0
        objects = [observation["vehicles"][observation["vehicles_mask"].astype(bool)][:, :4],
                   observation["pedestrians"][observation["pedestrians_mask"].astype(bool)][:, :4]]
        objects = np.concatenate(objects) if any(len(o) for o in objects) else np.zeros((0, 4))
        objects = objects[objects[:, 0] > 0.5]  # what is behind is the follower's problem
        path = np.vstack(([0.0, 0.0], route))
        arc = np.concatenate(([0.0], np.cumsum(np.hypot(*np.diff(path, axis=0).T))))
        if len(objects):
            # Lead vehicles: inside the corridor along the route now.
            d_to_path, s_along = project_points(objects[:, :2], path)
            in_corridor = d_to_path < c.corridor_half_width_m
            if in_corridor.any():
                k = np.argmin(np.where(in_corridor, s_along, np.inf))
                gap = s_along[k] - c.vehicle_length_m
                lead_speed = float(np.hypot(objects[k, 2], objects[k, 3]))
            # Crossing conflicts: constant-velocity prediction against the ego moving along its route.
            times = np.linspace(0.25, c.horizon_s, 16)
            ego_s = np.minimum(max(speed, 4.0) * times, arc[-1])
            ego_xy = np.stack((np.interp(ego_s, arc, path[:, 0]), np.interp(ego_s, arc, path[:, 1])), axis=1)
            predicted = objects[:, None, :2] + objects[:, None, 2:4] * times[None, :, None]
            close = np.hypot(*(predicted - ego_xy[None]).transpose(2, 0, 1)) < c.conflict_radius_m
            # Something standing beside the path (a car waiting at its give-way line) is not crossing it.
            moving = np.hypot(objects[:, 2], objects[:, 3]) > 0.5
            crossing = close.any(axis=1) & ~in_corridor & moving
            if crossing.any():
                first = np.where(close[crossing].any(axis=0))[0][0]
                gap = min(gap, ego_s[first] - c.vehicle_length_m - c.min_gap_m)
                lead_speed = 0.0 if gap == ego_s[first] - c.vehicle_length_m - c.min_gap_m else lead_speed
        if observation["traffic_light_mask"][0] and observation["traffic_light"][0] in (_RED, _YELLOW):
            stop = float(observation["traffic_light"][1]) - 2.0
            if 0.0 < stop < gap:
                gap, lead_speed = stop, 0.0
        return gap, lead_speed

    def _idm(self, speed: float, target: float, gap: float, lead_speed: float) -> float:
        c = self.config
        free = 1.0 - (speed / max(target, 0.1)) ** 4
        if not np.isfinite(gap):
            return c.comfort_accel * free
        gap = max(gap, 0.1)
        return c.comfort_accel * (free - (max(self._desired_gap(speed, lead_speed), 0.0) / gap) ** 2)

    def _desired_gap(self, speed: float, lead_speed: float) -> float:
        """IDM's desired bumper gap s*: s0 + v T + v (v - v_lead) / (2 sqrt(a b))."""
        c = self.config
        return c.min_gap_m + speed * c.time_headway_s + speed * (speed - lead_speed) / (
            2.0 * np.sqrt(c.comfort_accel * c.comfort_decel))


def _max_curvature(points: np.ndarray, window: int = 4) -> float:
    """Largest heading change per metre over `window` segments: averaging over ~10 m keeps the
    kinks where two lanes join from reading as sharp bends."""
    if len(points) < window + 1:
        return 0.0
    d = np.diff(points, axis=0)
    headings = np.unwrap(np.arctan2(d[:, 1], d[:, 0]))
    lengths = np.hypot(d[:, 0], d[:, 1])
    turn = np.abs(headings[window:] - headings[:-window])
    span = np.convolve(lengths, np.ones(window + 1), "valid")[: len(turn)]
    return float(np.max(turn / np.maximum(span, 1e-6))) if len(turn) else 0.0
