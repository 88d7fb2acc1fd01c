"""Question and answer texts of the driving LLM (Wayve "Driving with LLMs" style) and their parsers.

Answers the model is trained to give (numbers are rounded as written here):

    objects: "I observe 3 cars and 1 pedestrian nearby."           (nearby: within NEARBY_M)
    lead:    "The lead car is 23 m ahead at 12 m/s." | "There is no lead car."
    light:   "The traffic light is red. It is 35 m ahead." | "There is no traffic light."
    action:  "Here are my actions:\n- Accelerator pedal 35%\n- Brake pedal 0%\n"
             "- Going to steer 1.5% to the right.\nReason: following the lead car."
             (steer: "- Going straight." when it rounds to 0)

Steering sign: the harness's steer is + = right (CARLA); Wayve's text says left for +. Here the text
names the side explicitly, so "to the right" <-> steer > 0 and "to the left" <-> steer < 0.

The parsers accept integers or decimals, any case, "straight" / "0%", missing side words (treated
as straight only when the value is 0), and extra text around the sentences; they return None for text
that does not contain a complete answer.
"""
from __future__ import annotations

import re

import numpy as np

from prunedrive.harness.action import Control
from prunedrive.harness.route import project_points
from prunedrive.harness.observation import TRAFFIC_LIGHT_STATES

NEARBY_M = 30.0               # "nearby" for the object counts
CORRIDOR_HALF_WIDTH_M = 2.2   # a vehicle this close to the route centreline is "in the lane" (the lead-vehicle label)

QUESTIONS = {
    "objects": "How many cars and pedestrians are nearby?",
    "lead": "Is there a lead car?",
    "light": "Is there a traffic light?",
    "action": "What are your actions?",
}
PERCEPTION_KINDS = ("objects", "lead", "light")
REASONS = ("cruising", "following the lead car", "yielding", "stopping for the traffic light",
           "slowing for the curve", "the route ends")


def prompt(kind: str) -> str:
    """The text after the latent tokens; the answer follows it directly."""
    return f"Question: {QUESTIONS[kind]}\nAnswer:"


# -- answers ---------------------------------------------------------------------------------------
def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def objects_answer(n_vehicles: int, n_pedestrians: int) -> str:
    return f" I observe {_plural(n_vehicles, 'car')} and {_plural(n_pedestrians, 'pedestrian')} nearby."


def lead_answer(distance_m: float | None, speed_mps: float | None) -> str:
    if distance_m is None:
        return " There is no lead car."
    return f" The lead car is {round(distance_m)} m ahead at {round(speed_mps)} m/s."


def light_answer(state: int | None, distance_m: float | None) -> str:
    if state is None:
        return " There is no traffic light."
    return f" The traffic light is {TRAFFIC_LIGHT_STATES[int(state)]}. It is {round(distance_m)} m ahead."


def _steer_text(steer: float) -> str:
    pct = round(abs(steer) * 100.0, 1)
    if pct == 0:
        return "- Going straight."
    value = f"{pct:.1f}".rstrip("0").rstrip(".")
    return f"- Going to steer {value}% to the {'right' if steer > 0 else 'left'}."


def action_answer(control: Control, reason: str | None = None) -> str:
    text = (f" Here are my actions:\n- Accelerator pedal {round(control.throttle * 100)}%\n"
            f"- Brake pedal {round(control.brake * 100)}%\n{_steer_text(control.steer)}")
    return text + (f"\nReason: {reason}." if reason else "")


# -- labels from an observation ---------------------------------------------------------------------
def perception_labels(obs: dict[str, np.ndarray]) -> dict:
    """Ground truth for the perception answers: nearby counts, the lead car (nearest vehicle ahead in the
    route corridor, centre distance along the route), the traffic light."""
    vehicles = obs["vehicles"][obs["vehicles_mask"].astype(bool)]
    walkers = obs["pedestrians"][obs["pedestrians_mask"].astype(bool)]
    out = {
        "n_vehicles": int((np.hypot(vehicles[:, 0], vehicles[:, 1]) <= NEARBY_M).sum()),
        "n_pedestrians": int((np.hypot(walkers[:, 0], walkers[:, 1]) <= NEARBY_M).sum()),
        "lead_distance_m": None, "lead_speed_mps": None, "light_state": None, "light_distance_m": None,
    }
    route = obs["route"][obs["route_mask"].astype(bool)]
    ahead = vehicles[vehicles[:, 0] > 0.5]
    if len(route) >= 1 and len(ahead):
        path = np.vstack(([0.0, 0.0], route))
        d, s = project_points(ahead[:, :2].astype(np.float64), path)
        inside = d < CORRIDOR_HALF_WIDTH_M
        if inside.any():
            k = int(np.argmin(np.where(inside, s, np.inf)))
            out["lead_distance_m"] = float(s[k])
            out["lead_speed_mps"] = float(np.hypot(ahead[k, 2], ahead[k, 3]))
    if obs["traffic_light_mask"][0]:
        out["light_state"] = int(obs["traffic_light"][0])
        out["light_distance_m"] = float(obs["traffic_light"][1])
    return out


def answers(obs: dict[str, np.ndarray], control: Control, reason: str | None) -> dict[str, str]:
    """All four answers for one observation (kind -> text)."""
    p = perception_labels(obs)
    return {
        "objects": objects_answer(p["n_vehicles"], p["n_pedestrians"]),
        "lead": lead_answer(p["lead_distance_m"], p["lead_speed_mps"]),
        "light": light_answer(p["light_state"], p["light_distance_m"]),
        "action": action_answer(control, reason),
    }


# -- parsers ---------------------------------------------------------------------------------------
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_ACCEL = re.compile(r"accelerat\w*(?:\s+pedal)?\s*[:=]?\s*" + _NUM + r"\s*%", re.I)
_BRAKE = re.compile(r"brak\w*(?:\s+pedal)?\s*[:=]?\s*" + _NUM + r"\s*%", re.I)
_STEER = re.compile(r"steer\w*\s*[:=]?\s*(-?)\s*" + _NUM + r"\s*%(?:\s*(?:to\s+the\s+)?(left|right|straight))?", re.I)
_STRAIGHT = re.compile(r"(?:going|drive|driving|steer\w*|keep\w*)\s+straight", re.I)


def parse_action(text: str | None) -> Control | None:
    """Control from an action answer, or None when accelerator, brake or steering is missing or invalid.

    Percentages are clipped to the control ranges ([0, 1] pedals, [-1, 1] steer); steer + = right.
    A bare "steer N%" (no side) is accepted only for N = 0; "-N%" without a side means left.
    """
    if not text:
        return None
    accel, brake = _ACCEL.search(text), _BRAKE.search(text)
    if not accel or not brake:
        return None
    steer_match = _STEER.search(text)
    if steer_match:
        sign_minus, value, side = steer_match.group(1), float(steer_match.group(2)), (steer_match.group(3) or "").lower()
        if side == "right":
            steer = value
        elif side == "left":
            steer = -value
        elif value == 0 or side == "straight":
            steer = 0.0
        elif sign_minus:
            steer = -value
        else:
            return None  # a non-zero steer without a side is ambiguous
    elif _STRAIGHT.search(text):
        steer = 0.0
    else:
        return None
    values = np.array([float(accel.group(1)), float(brake.group(1)), steer]) / 100.0
    if not np.all(np.isfinite(values)):
        return None
    return Control(throttle=float(np.clip(values[0], 0, 1)), brake=float(np.clip(values[1], 0, 1)),
                   steer=float(np.clip(values[2], -1, 1)))


_COUNT_WORDS = {"no": 0, "zero": 0, "one": 1, "a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_CARS = re.compile(r"(\d+|no|zero|one|two|three|four|five|a|an)\s+(?:cars?|vehicles?)\b", re.I)
_PEDS = re.compile(r"(\d+|no|zero|one|two|three|four|five|a|an)\s+(?:pedestrians?|people|persons?|walkers?)\b", re.I)
_LEAD = re.compile(r"lead\s+(?:car|vehicle)\s+is\s+" + _NUM + r"\s*m(?:eters|etres)?\s+ahead(?:\s+at\s+" + _NUM
                   + r"\s*m/s)?", re.I)
_NO_LEAD = re.compile(r"\bno\s+lead\s+(?:car|vehicle)", re.I)
_LIGHT = re.compile(r"traffic\s+light\s+is\s+(green|yellow|amber|red)", re.I)
_LIGHT_DIST = re.compile(r"(?:it\s+is\s+)?" + _NUM + r"\s*m(?:eters|etres)?\s+ahead", re.I)
_NO_LIGHT = re.compile(r"\bno\s+traffic\s+light", re.I)


def _count(match: re.Match | None) -> int | None:
    if not match:
        return None
    word = match.group(1).lower()
    return int(word) if word.isdigit() else _COUNT_WORDS[word]


def parse_objects(text: str | None) -> tuple[int, int] | None:
    """(cars, pedestrians) from "I observe N cars and M pedestrians", None when either is missing."""
    cars, peds = _count(_CARS.search(text or "")), _count(_PEDS.search(text or ""))
    return None if cars is None or peds is None else (cars, peds)


def parse_lead(text: str | None) -> tuple[bool, float | None, float | None] | None:
    """(has_lead, distance_m, speed_mps); (False, None, None) for "no lead car"; None when unparsable."""
    match = _LEAD.search(text or "")
    if match:
        return True, float(match.group(1)), float(match.group(2)) if match.group(2) else None
    return (False, None, None) if _NO_LEAD.search(text or "") else None


def parse_light(text: str | None) -> tuple[int | None, float | None] | None:
    """(state index or None for no light, distance_m or None); None when unparsable."""
    text = text or ""
    match = _LIGHT.search(text)
    if match:
        state = match.group(1).lower().replace("amber", "yellow")
        dist = _LIGHT_DIST.search(text, match.end())
        return TRAFFIC_LIGHT_STATES.index(state), float(dist.group(1)) if dist else None
    return (None, None) if _NO_LIGHT.search(text) else None
