"""The object-level observation as a plain-text scene description, for any text LLM (no vector encoder).

Versioned: SCENE_TEXT_VERSION changes whenever the wording, the order or the rounding below changes, because a
model fine-tuned or pruned on one version's prompts sees different tokens under another. The text is a pure
function of the observation: fixed decimals, fixed order, no locale, so the same observation always gives the
same bytes.

Version 1 (all in the ego frame: x forward, y to the right, metres, m/s; angles + = to the right):

    Scene (scene-text v1; ego frame: x forward, y right; metres, m/s).
    Ego: speed 12.3 m/s, speed limit 25.0 m/s, acceleration 0.4 m/s^2.
    Lane: heading error 1.2 deg right, lane offset 0.30 m right.
    Last control: throttle 35%, brake 0%, steer 0.0%.
    Route: 380.0 m remaining; ahead (x, y): 5 m (5.0, 0.0), 10 m (10.0, 0.1), 20 m (19.9, 0.6), 40 m (39.5, 2.4);
    bends 7 deg right over the next 47.5 m.
    Vehicles (2 within 100 m, nearest first, up to 6):
    - V1: at (23.4, 3.5) m, 23.7 m away; velocity (12.0, 0.0) m/s, relative (-0.3, 0.0) m/s; 4.8 x 1.9 m.
    - V2: ...
    Pedestrians: none within 50 m.
    Traffic light: red, 35.0 m ahead.          (or "Traffic light: none.")

- Route waypoints are the observation's route points at 5, 10, 20 and 40 m along the route (those that exist);
  "bends" is the direction change between the first and the last route segment ("straight" under 2 deg).
- Object velocities are the simulator's (rotated into the ego frame); "relative" subtracts the ego's own
  velocity (speed, 0).
- Only the nearest MAX_LISTED_VEHICLES vehicles and MAX_LISTED_PEDESTRIANS pedestrians are listed; the count
  says how many the observation holds.

The question (`ACTION_QUESTION`) asks for an answer in the format `models.text.action_answer` writes and
`models.text.parse_action` reads.
"""
from __future__ import annotations

import math

import numpy as np

from prunedrive.harness.observation import (EGO_FEATURES, OBS_SHAPES, PEDESTRIAN_RANGE_M, ROUTE_SPACING_M,
                                            TRAFFIC_LIGHT_STATES, VEHICLE_RANGE_M)
from prunedrive.models import text

SCENE_TEXT_VERSION = 1
MAX_LISTED_VEHICLES = 6
MAX_LISTED_PEDESTRIANS = 4
WAYPOINT_DISTANCES_M = (5.0, 10.0, 20.0, 40.0)
STRAIGHT_DEG = 2.0

ACTION_QUESTION = (
    f"Question: {text.QUESTIONS['action']} Reply exactly in this format:\n"
    "Here are my actions:\n- Accelerator pedal N%\n- Brake pedal N%\n"
    "- Going to steer N% to the left (or right), or - Going straight.\n"
    "Reason: a few words."
)
ANSWER_PREFIX = "Answer:"
SYSTEM_TEXT = "You are the driver of the ego car. Drive safely along the route and answer with pedal and steering commands."


def _f(x: float, decimals: int = 1) -> str:
    """Fixed decimals, no negative zero."""
    value = round(float(x), decimals)
    return f"{0.0 if value == 0 else value:.{decimals}f}"


def _side(value: float, decimals: int, unit: str, positive: str = "right", negative: str = "left") -> str:
    v = round(float(value), decimals)
    if v == 0:
        return f"{_f(0, decimals)} {unit}".rstrip()
    return f"{_f(abs(v), decimals)} {unit} {positive if v > 0 else negative}".replace("  ", " ")


def _ego(observation: dict, name: str) -> float:
    return float(observation["ego"][EGO_FEATURES.index(name)])


def _route_lines(observation: dict) -> str:
    mask = np.asarray(observation["route_mask"]).astype(bool)
    route = np.asarray(observation["route"], np.float64)[mask]
    remaining = _ego(observation, "route_remaining_m")
    if len(route) == 0:
        return f"Route: {_f(remaining)} m remaining; no route points ahead."
    points = []
    for d in WAYPOINT_DISTANCES_M:
        i = int(round(d / ROUTE_SPACING_M)) - 1
        if 0 <= i < len(route):
            points.append(f"{_f(d, 0)} m ({_f(route[i, 0])}, {_f(route[i, 1])})")
    if not points:
        points.append(f"{_f((len(route)) * ROUTE_SPACING_M)} m ({_f(route[-1, 0])}, {_f(route[-1, 1])})")
    path = np.vstack(([0.0, 0.0], route))
    steps = np.diff(path, axis=0)
    steps = steps[np.hypot(steps[:, 0], steps[:, 1]) > 1e-6]
    if len(steps) >= 2:
        first, last = math.atan2(steps[0, 1], steps[0, 0]), math.atan2(steps[-1, 1], steps[-1, 0])
        turn = math.degrees((last - first + math.pi) % (2 * math.pi) - math.pi)
        span = _f(len(route) * ROUTE_SPACING_M)
        bend = (f"straight for the next {span} m" if abs(turn) < STRAIGHT_DEG
                else f"bends {_f(abs(turn), 0)} deg {'right' if turn > 0 else 'left'} over the next {span} m")
    else:
        bend = "too short to tell its curvature"
    return f"Route: {_f(remaining)} m remaining; ahead (x, y): {', '.join(points)}; {bend}."


def _objects(observation: dict, key: str) -> np.ndarray:
    rows = np.asarray(observation[key], np.float64)[np.asarray(observation[f"{key}_mask"]).astype(bool)]
    order = np.argsort(np.hypot(rows[:, 0], rows[:, 1]), kind="stable")
    return rows[order]


def _mover(label: str, row: np.ndarray, ego_speed: float) -> str:
    x, y, vx, vy = row[:4]
    return (f"- {label}: at ({_f(x)}, {_f(y)}) m, {_f(math.hypot(x, y))} m away; velocity ({_f(vx)}, {_f(vy)}) m/s, "
            f"relative ({_f(vx - ego_speed)}, {_f(vy)}) m/s")


def scene_text(observation: dict[str, np.ndarray], max_vehicles: int = MAX_LISTED_VEHICLES,
               max_pedestrians: int = MAX_LISTED_PEDESTRIANS) -> str:
    """The scene description (no question); see the module docstring for the format."""
    speed = _ego(observation, "speed_mps")
    lines = [
        f"Scene (scene-text v{SCENE_TEXT_VERSION}; ego frame: x forward, y right; metres, m/s).",
        f"Ego: speed {_f(speed)} m/s, speed limit {_f(_ego(observation, 'speed_limit_mps'))} m/s, "
        f"acceleration {_f(_ego(observation, 'accel_mps2'))} m/s^2.",
        f"Lane: heading error {_side(math.degrees(_ego(observation, 'heading_error_rad')), 1, 'deg')}, "
        f"lane offset {_side(_ego(observation, 'lane_offset_m'), 2, 'm')}.",
        f"Last control: throttle {round(100 * _ego(observation, 'throttle'))}%, "
        f"brake {round(100 * _ego(observation, 'brake'))}%, steer {_f(100 * _ego(observation, 'steer'))}%.",
        _route_lines(observation),
    ]
    vehicles = _objects(observation, "vehicles")
    if len(vehicles):
        lines.append(f"Vehicles ({len(vehicles)} within {_f(VEHICLE_RANGE_M, 0)} m, nearest first, "
                     f"up to {max_vehicles}):")
        for i, row in enumerate(vehicles[:max_vehicles]):
            lines.append(_mover(f"V{i + 1}", row, speed) + f"; {_f(row[5])} x {_f(row[6])} m.")
    else:
        lines.append(f"Vehicles: none within {_f(VEHICLE_RANGE_M, 0)} m.")
    walkers = _objects(observation, "pedestrians")
    if len(walkers):
        lines.append(f"Pedestrians ({len(walkers)} within {_f(PEDESTRIAN_RANGE_M, 0)} m, nearest first, "
                     f"up to {max_pedestrians}):")
        lines.extend(_mover(f"P{i + 1}", row, speed) + "." for i, row in enumerate(walkers[:max_pedestrians]))
    else:
        lines.append(f"Pedestrians: none within {_f(PEDESTRIAN_RANGE_M, 0)} m.")
    if np.asarray(observation["traffic_light_mask"]).reshape(-1)[0]:
        state, distance = np.asarray(observation["traffic_light"], np.float64)[:2]
        name = TRAFFIC_LIGHT_STATES[int(np.clip(round(state), 0, len(TRAFFIC_LIGHT_STATES) - 1))]
        lines.append(f"Traffic light: {name}, {_f(distance)} m ahead.")
    else:
        lines.append("Traffic light: none.")
    return "\n".join(lines)


def action_prompt(observation: dict[str, np.ndarray]) -> str:
    """Scene, question and the answer cue: the plain-text prompt (no chat template); the answer follows it."""
    return f"{scene_text(observation)}\n{ACTION_QUESTION}\n{ANSWER_PREFIX}"


def probe_observation() -> dict[str, np.ndarray]:
    """The busiest scene the format writes, for checking a model before it drives (models.hf_causal.
    check_drivable): every listed vehicle and pedestrian, a traffic light, the whole route, and negative
    multi-digit numbers everywhere, so its prompt is as long as a real one gets (give or take a digit)."""
    obs = {key: np.zeros(shape, np.float32) for key, shape in OBS_SHAPES.items()}
    ego = {"speed_mps": 33.3, "accel_mps2": -8.8, "heading_error_rad": -0.58, "lane_offset_m": -1.23, "throttle": 1.0,
           "brake": 1.0, "steer": -1.0, "speed_limit_mps": 33.3, "route_remaining_m": 9999.9}
    obs["ego"][:] = [ego[name] for name in EGO_FEATURES]
    along = ROUTE_SPACING_M * np.arange(1, len(obs["route_mask"]) + 1)
    obs["route"][:] = np.stack([along, -0.02 * along ** 2], axis=1)  # bends left: "bends N deg left over ..."
    obs["route_mask"][:] = 1
    for i in range(len(obs["vehicles_mask"])):
        obs["vehicles"][i] = [-60.1 - i, -12.3, -33.3, -4.4, 0.0, 12.3, 2.6]
    obs["vehicles_mask"][:] = 1
    for i in range(len(obs["pedestrians_mask"])):
        obs["pedestrians"][i] = [-40.1 - i, -12.3, -2.2, -1.1]
    obs["pedestrians_mask"][:] = 1
    obs["traffic_light"][:] = [TRAFFIC_LIGHT_STATES.index("yellow"), 99.9]
    obs["traffic_light_mask"][:] = 1
    return obs


def action_messages(observation: dict[str, np.ndarray]) -> list[dict[str, str]]:
    """The same prompt as chat messages (one user turn: some chat templates refuse a system role)."""
    return [{"role": "user", "content": f"{SYSTEM_TEXT}\n{scene_text(observation)}\n{ACTION_QUESTION}"}]
