import numpy as np
import pytest

from prunedrive.harness.action import Control
from prunedrive.harness.observation import MAX_PEDESTRIANS, MAX_VEHICLES, ROUTE_POINTS, ROUTE_SPACING_M
from prunedrive.models import text


@pytest.mark.parametrize("control", [Control(0.35, 0.0, 0.015), Control(0.0, 0.8, -0.3), Control(1.0, 0.0, 0.0),
                                     Control(0.0, 1.0, 1.0), Control(0.12, 0.0, -0.0004)])
def test_action_round_trip(control):
    answer = text.action_answer(control, "cruising")
    parsed = text.parse_action(answer)
    assert parsed is not None
    assert parsed.throttle == pytest.approx(round(control.throttle * 100) / 100)
    assert parsed.brake == pytest.approx(round(control.brake * 100) / 100)
    assert parsed.steer == pytest.approx(round(control.steer * 1000) / 1000, abs=1e-9)


def test_steer_sign_is_right_positive():
    assert "to the right" in text.action_answer(Control(steer=0.2))
    assert "to the left" in text.action_answer(Control(steer=-0.2))
    assert "Going straight." in text.action_answer(Control(steer=0.0))


@pytest.mark.parametrize("answer, expected", [
    ("Here are my actions:\n- Accelerator pedal 35%\n- Brake pedal 0%\n- Going to steer 3% to the left.", (0.35, 0, -0.03)),
    ("- Accelerator pedal 35.5%\n- Brake pedal 2.25%\n- Going to steer 1.5% to the right.", (0.355, 0.0225, 0.015)),
    ("accelerator pedal 10 %, brake pedal 0 %, going STRAIGHT", (0.1, 0, 0)),
    ("ACCELERATOR PEDAL 10%\nBRAKE PEDAL 5%\nGOING TO STEER 0% TO THE LEFT", (0.1, 0.05, 0)),
    ("Accelerator pedal 0%\nBrake pedal 100%\nGoing to steer 0%.", (0, 1, 0)),
    ("Accelerator pedal 0%\nBrake pedal 100%\nsteer 0% straight", (0, 1, 0)),
    ("Sure! Accelerator: 20% Brake: 0% Steering 12% right. Reason: following the lead car.", (0.2, 0, 0.12)),
    ("Accelerator pedal 150%\nBrake pedal 0%\nGoing to steer 300% to the left", (1.0, 0, -1.0)),
    ("Accelerator pedal .5%\nBrake pedal 0%\nGoing to steer -4%", (0.005, 0, -0.04)),
])
def test_parse_action_forms(answer, expected):
    c = text.parse_action(answer)
    assert c is not None
    assert (c.throttle, c.brake, c.steer) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [None, "", "   ", "I don't know", "Accelerator pedal 35%", "Brake pedal 0%",
                                 "Accelerator pedal 35%\nBrake pedal 0%",                       # no steering
                                 "Accelerator pedal 35%\nBrake pedal 0%\nGoing to steer 3%",    # no side
                                 "Accelerator pedal x%\nBrake pedal 0%\nGoing straight",
                                 "Here are my actions:\n- Accelerator pedal 3", "\x00\ufffd garbage 1 2 3 %%%"])
def test_parse_action_rejects_bad_text(bad):
    assert text.parse_action(bad) is None


def test_perception_round_trips():
    assert text.parse_objects(text.objects_answer(3, 1)) == (3, 1)
    assert text.parse_objects(text.objects_answer(1, 0)) == (1, 0)
    assert text.objects_answer(1, 2) == " I observe 1 car and 2 pedestrians nearby."
    assert text.parse_objects("I am observing no cars and one pedestrian") == (0, 1)
    assert text.parse_lead(text.lead_answer(23.4, 11.6)) == (True, 23.0, 12.0)
    assert text.parse_lead(text.lead_answer(None, None)) == (False, None, None)
    assert text.parse_lead("the LEAD VEHICLE is 7.5 m ahead") == (True, 7.5, None)
    assert text.parse_light(text.light_answer(2, 34.6)) == (2, 35.0)
    assert text.parse_light("The traffic light is Green. It is 12m ahead.") == (0, 12.0)
    assert text.parse_light("the traffic light is amber") == (1, None)
    assert text.parse_light(text.light_answer(None, None)) == (None, None)


@pytest.mark.parametrize("bad", [None, "", "I observe many cars", "I observe 3 cars", "The lead car is far",
                                 "The traffic light is blue", "blah"])
def test_perception_parsers_reject_bad_text(bad):
    assert text.parse_objects(bad) is None
    assert text.parse_lead(bad) is None
    assert text.parse_light(bad) is None


def _observation(vehicles=(), walkers=(), light=None):
    obs = {"ego": np.zeros(9, np.float32), "route": np.zeros((ROUTE_POINTS, 2), np.float32),
           "route_mask": np.ones(ROUTE_POINTS, np.int8), "vehicles": np.zeros((MAX_VEHICLES, 7), np.float32),
           "vehicles_mask": np.zeros(MAX_VEHICLES, np.int8), "pedestrians": np.zeros((MAX_PEDESTRIANS, 4), np.float32),
           "pedestrians_mask": np.zeros(MAX_PEDESTRIANS, np.int8), "traffic_light": np.zeros(2, np.float32),
           "traffic_light_mask": np.zeros(1, np.int8)}
    obs["route"][:, 0] = ROUTE_SPACING_M * np.arange(1, ROUTE_POINTS + 1)
    for i, v in enumerate(vehicles):
        obs["vehicles"][i, :4], obs["vehicles_mask"][i] = v, 1
    for i, w in enumerate(walkers):
        obs["pedestrians"][i], obs["pedestrians_mask"][i] = w, 1
    if light:
        obs["traffic_light"][:], obs["traffic_light_mask"][0] = light, 1
    return obs


def test_perception_labels():
    obs = _observation(vehicles=[(20, 0.5, 10, 0), (10, 3.7, 20, 0), (-5, 0, 20, 0), (45, 0, 5, 0)],
                       walkers=[(12, -8, 0, 1.2)], light=(2, 33.0))
    p = text.perception_labels(obs)
    assert (p["n_vehicles"], p["n_pedestrians"]) == (3, 1)  # the one 45 m away is not nearby
    assert p["lead_distance_m"] == pytest.approx(20.0, abs=0.01) and p["lead_speed_mps"] == pytest.approx(10)
    assert (p["light_state"], p["light_distance_m"]) == (2, 33.0)
    answers = text.answers(obs, Control(0, 0.5, 0), "stopping for the traffic light")
    assert "red" in answers["light"] and "20 m ahead" in answers["lead"]
    assert text.perception_labels(_observation())["lead_distance_m"] is None
