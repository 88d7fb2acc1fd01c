"""The object-level observation every backend produces (Wayve "Driving with LLMs" style).

All positions and velocities are in the **ego frame**: x forward, y to the right (CARLA's
left-handed convention, shared by highway-env), metres and metres per second. Angles are radians,
positive turning right (clockwise seen from above). Controls follow CARLA's VehicleControl.

Keys of the observation dict:

- ``ego`` (EGO_FEATURES,): see ``EGO_FEATURES``.
- ``route`` (ROUTE_POINTS, 2): the next route points, ``ROUTE_SPACING_M`` apart, ego frame;
  ``route_mask`` (ROUTE_POINTS,) is 1 where a point exists (the route may end sooner).
- ``vehicles`` (MAX_VEHICLES, len(VEHICLE_FEATURES)), nearest first within ``VEHICLE_RANGE_M``;
  ``vehicles_mask`` marks filled slots.
- ``pedestrians`` (MAX_PEDESTRIANS, len(PEDESTRIAN_FEATURES)) within ``PEDESTRIAN_RANGE_M``;
  ``pedestrians_mask``.
- ``traffic_light`` (len(TRAFFIC_LIGHT_FEATURES),): the light that affects the ego, ahead on its
  route; ``traffic_light_mask`` (1,) is 1 when there is one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gymnasium import spaces

ROUTE_POINTS = 20
ROUTE_SPACING_M = 2.5
MAX_VEHICLES = 16
MAX_PEDESTRIANS = 8
VEHICLE_RANGE_M = 100.0
PEDESTRIAN_RANGE_M = 50.0

EGO_FEATURES = (
    "speed_mps",          # forward speed
    "accel_mps2",         # longitudinal acceleration
    "heading_error_rad",  # ego yaw minus route direction at the nearest route point
    "lane_offset_m",      # signed lateral offset from the route centreline, + right
    "throttle",           # last applied control, [0, 1]
    "brake",              # last applied control, [0, 1]
    "steer",              # last applied control, [-1, 1], + right
    "speed_limit_mps",    # speed limit of the current lane
    "route_remaining_m",  # route length still to drive
)
VEHICLE_FEATURES = ("x_m", "y_m", "vx_mps", "vy_mps", "yaw_rad", "length_m", "width_m")
PEDESTRIAN_FEATURES = ("x_m", "y_m", "vx_mps", "vy_mps")
TRAFFIC_LIGHT_FEATURES = ("state", "distance_m")  # state: one of TRAFFIC_LIGHT_STATES' indices
TRAFFIC_LIGHT_STATES = ("green", "yellow", "red")

# highway-env's vehicle: 5 m long, and its kinematic bicycle uses the length as the wheelbase.
VEHICLE_LENGTH_M = 5.0

_BIG = np.float32(1e4)


# The observation's keys and array shapes, in the order above; masks end in "_mask".
OBS_SHAPES = {
    "ego": (len(EGO_FEATURES),),
    "route": (ROUTE_POINTS, 2), "route_mask": (ROUTE_POINTS,),
    "vehicles": (MAX_VEHICLES, len(VEHICLE_FEATURES)), "vehicles_mask": (MAX_VEHICLES,),
    "pedestrians": (MAX_PEDESTRIANS, len(PEDESTRIAN_FEATURES)), "pedestrians_mask": (MAX_PEDESTRIANS,),
    "traffic_light": (len(TRAFFIC_LIGHT_FEATURES),), "traffic_light_mask": (1,),
}


def observation_space() -> spaces.Dict:
    return spaces.Dict({key: spaces.MultiBinary(shape[0]) if key.endswith("_mask")
                        else spaces.Box(-_BIG, _BIG, shape=shape, dtype=np.float32)
                        for key, shape in OBS_SHAPES.items()})


@dataclass
class EgoState:
    """World-frame ego pose and motion, as a backend reads it from its simulator."""

    x: float
    y: float
    yaw: float
    speed: float
    accel: float = 0.0
    speed_limit: float = 13.9
    throttle: float = 0.0
    brake: float = 0.0
    steer: float = 0.0


@dataclass
class WorldObjects:
    """World-frame objects around the ego. Each array has one row per object.

    vehicles: (n, 7) x, y, vx, vy, yaw, length, width. pedestrians: (m, 4) x, y, vx, vy.
    traffic_light: (state index, distance along the route in m) or None.
    """

    vehicles: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))
    pedestrians: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    traffic_light: tuple[int, float] | None = None


def _to_ego(points: np.ndarray, ego: EgoState) -> np.ndarray:
    """Rotate and translate world (x, y) rows into the ego frame."""
    c, s = np.cos(ego.yaw), np.sin(ego.yaw)
    d = points - (ego.x, ego.y)
    return np.stack((d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c), axis=1)


def _rotate_to_ego(vectors: np.ndarray, ego: EgoState) -> np.ndarray:
    c, s = np.cos(ego.yaw), np.sin(ego.yaw)
    return np.stack((vectors[:, 0] * c + vectors[:, 1] * s, -vectors[:, 0] * s + vectors[:, 1] * c), axis=1)


def _nearest_slots(rows: np.ndarray, max_slots: int, max_range: float) -> np.ndarray:
    distance = np.hypot(rows[:, 0], rows[:, 1])
    keep = np.flatnonzero(distance <= max_range)
    return rows[keep[np.argsort(distance[keep], kind="stable")][:max_slots]]


def _slots(rows: np.ndarray, max_slots: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((max_slots, width), np.float32)
    mask = np.zeros(max_slots, np.int8)
    out[: len(rows)] = rows
    mask[: len(rows)] = 1
    return out, mask


def build_observation(
    ego: EgoState,
    route_ahead: np.ndarray,
    heading_error: float,
    lane_offset: float,
    route_remaining: float,
    objects: WorldObjects,
) -> dict[str, np.ndarray]:
    """Assemble the observation dict from world-frame state.

    route_ahead: (k, 2) world-frame route points from the ego's projection onward,
    ROUTE_SPACING_M apart (k <= ROUTE_POINTS).
    """
    ego_vec = np.array(
        [ego.speed, ego.accel, heading_error, lane_offset, ego.throttle, ego.brake, ego.steer,
         ego.speed_limit, route_remaining],
        np.float32,
    )
    route, route_mask = _slots(_to_ego(route_ahead[:ROUTE_POINTS], ego), ROUTE_POINTS, 2)

    vehicles = np.asarray(objects.vehicles, np.float64).reshape(-1, 7)
    if len(vehicles):
        vehicles = np.concatenate(
            (_to_ego(vehicles[:, :2], ego), _rotate_to_ego(vehicles[:, 2:4], ego),
             wrap_angle(vehicles[:, 4:5] - ego.yaw), vehicles[:, 5:7]),
            axis=1,
        )
        vehicles = _nearest_slots(vehicles, MAX_VEHICLES, VEHICLE_RANGE_M)
    vehicles, vehicles_mask = _slots(vehicles, MAX_VEHICLES, len(VEHICLE_FEATURES))

    pedestrians = np.asarray(objects.pedestrians, np.float64).reshape(-1, 4)
    if len(pedestrians):
        pedestrians = np.concatenate(
            (_to_ego(pedestrians[:, :2], ego), _rotate_to_ego(pedestrians[:, 2:4], ego)), axis=1
        )
        pedestrians = _nearest_slots(pedestrians, MAX_PEDESTRIANS, PEDESTRIAN_RANGE_M)
    pedestrians, pedestrians_mask = _slots(pedestrians, MAX_PEDESTRIANS, len(PEDESTRIAN_FEATURES))

    light = np.zeros(len(TRAFFIC_LIGHT_FEATURES), np.float32)
    light_mask = np.zeros(1, np.int8)
    if objects.traffic_light is not None:
        light[:] = objects.traffic_light
        light_mask[0] = 1

    return {
        "ego": np.clip(ego_vec, -_BIG, _BIG),
        "route": route,
        "route_mask": route_mask,
        "vehicles": vehicles,
        "vehicles_mask": vehicles_mask,
        "pedestrians": pedestrians,
        "pedestrians_mask": pedestrians_mask,
        "traffic_light": light,
        "traffic_light_mask": light_mask,
    }


def wrap_angle(a):
    """An angle (or array of them) in [-pi, pi)."""
    return (a + np.pi) % (2 * np.pi) - np.pi

