"""End to end on a real CARLA 0.9.16 server. Runs only when CARLA_HOST is set (CARLA_PORT: default 2000):

    CARLA_HOST=127.0.0.1 pytest -m carla tests/test_carla_server.py
"""
import os
from pathlib import Path

import pytest

from prunedrive.agents.expert import ExpertAgent
from prunedrive.harness.backends.carla_route_xml import load_route
from prunedrive.harness.env import DriveEnv
from prunedrive.harness.events import EventKind
from prunedrive.scenarios.loader import Scenario

pytestmark = [
    pytest.mark.carla,
    pytest.mark.skipif(not os.environ.get("CARLA_HOST"),
                       reason="needs a CARLA 0.9.16 server: set CARLA_HOST (and CARLA_PORT, default 2000)"),
]
ROOT = Path(__file__).resolve().parents[1]
KEY_POINTS = 3  # the first key points of devtest route 0: a few hundred metres, minutes not an hour


def short_devtest_route(tmp_path) -> Path:
    route = load_route(ROOT / "scenarios" / "carla" / "routes_devtest.xml", "0")
    weathers = "".join(f'<weather route_percentage="{w.route_percentage}" '
                       + " ".join(f'{k}="{v}"' for k, v in w.params.items()) + "/>" for w in route.weathers)
    points = "".join(f'<position x="{x}" y="{y}" z="{z}"/>' for x, y, z in route.waypoints[:KEY_POINTS])
    path = tmp_path / "short.xml"
    path.write_text(f'<routes><route id="0" town="{route.town}"><weathers>{weathers}</weathers>'
                    f"<waypoints>{points}</waypoints></route></routes>")
    return path


def test_the_expert_drives_a_short_devtest_route_and_leaves_the_server_as_it_was(tmp_path):
    carla = pytest.importorskip("carla", reason="the carla client (pip install prunedrive[carla]) is not installed")
    host, port = os.environ["CARLA_HOST"], int(os.environ.get("CARLA_PORT", "2000"))
    client = carla.Client(host, port)
    client.set_timeout(600.0)
    world = client.get_world()
    if world.get_map().name.split("/")[-1] != "Town12":
        world = client.load_world("Town12")  # so that "before" and "after" are the same world
    settings_before = world.get_settings()
    actors_before = {a.id for a in world.get_actors()}

    scenario = Scenario(name="devtest-0-short", kind="carla_route", vehicles=10, pedestrians=4, duration_s=240.0,
                        options={"route_file": str(short_devtest_route(tmp_path)), "route_id": "0", "timeout_s": 120})
    env = DriveEnv(scenario, host=host, port=port)
    try:
        agent = ExpertAgent()
        observation, info = env.reset(seed=0)
        assert info["route_length_m"] > 50.0
        hero = [a for a in world.get_actors().filter("vehicle.*") if a.attributes.get("role_name") == "hero"]
        assert len(hero) == 1 and world.get_settings().synchronous_mode
        done = False
        while not done:
            observation, _, terminated, truncated, info = env.step(agent.act(observation))
            done = terminated or truncated
        outcome = info["outcome"]
        assert outcome.steps > 0 and outcome.route_completion > 0.0
        assert all(isinstance(e.kind, EventKind) for e in outcome.events)
    finally:
        env.close()

    world = client.get_world()
    leftover = [a.type_id for a in world.get_actors() if a.id not in actors_before]
    assert leftover == []
    settings = world.get_settings()
    assert (settings.synchronous_mode, settings.fixed_delta_seconds, settings.no_rendering_mode) == (
        settings_before.synchronous_mode, settings_before.fixed_delta_seconds, settings_before.no_rendering_mode)
