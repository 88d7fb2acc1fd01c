"""The Gymnasium env on the embedded backend."""
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from prunedrive.agents.expert import ExpertAgent
from prunedrive.harness.env import DriveEnv
from prunedrive.harness.observation import EGO_FEATURES, observation_space
from prunedrive.harness.backends.highway import HighwayBackend
from prunedrive.scenarios.loader import Scenario

HIGHWAY_KINDS = list(HighwayBackend.KINDS)


def scenario(kind="highway_cruise", **kw):
    args = dict(name=kind, kind=kind, vehicles=4, duration_s=10.0, route_length_m=80.0, speed_limit_mps=15.0)
    args.update(kw)
    return Scenario(**args)


@pytest.mark.parametrize("kind", HIGHWAY_KINDS)
def test_env_checker_passes_for_every_kind(kind):
    env = DriveEnv(scenario(kind))
    check_env(env, skip_render_check=True)
    env.close()


def test_registered_with_gymnasium_by_importing_the_package():
    import prunedrive  # noqa: F401 -- registers prunedrive/Drive-v0

    env = gym.make("prunedrive/Drive-v0", scenario=scenario())
    obs, _ = env.reset(seed=3)
    assert observation_space().contains(obs)
    env.close()
    env = gym.make("prunedrive/Drive-v0", scenario="smoke/roundabout")  # a suite/scenario name works too
    assert env.unwrapped.scenario.kind == "roundabout"
    env.close()


@pytest.mark.parametrize("kind", HIGHWAY_KINDS)
def test_route_ahead_of_the_ego_in_its_frame(kind):
    env = DriveEnv(scenario(kind, pedestrians=1 if kind == "intersection" else 0))
    obs, info = env.reset(seed=5)
    route = obs["route"][obs["route_mask"].astype(bool)]
    assert len(route) >= 10
    assert route[0, 0] > -1.0 and route[-1, 0] > 10.0  # ahead: x forward
    assert abs(obs["ego"][EGO_FEATURES.index("lane_offset_m")]) < 3.0
    assert info["route_length_m"] > 40.0
    env.close()


def test_same_seed_same_episode_and_other_seed_other_traffic():
    def rollout(seed):
        env = DriveEnv(scenario(vehicles=8))
        obs, _ = env.reset(seed=seed)
        agent, trace = ExpertAgent(), []
        for _ in range(15):
            obs, _, term, trunc, _ = env.step(agent.act(obs))
            trace.append(obs["vehicles"].copy())
            if term or trunc:
                break
        env.close()
        return np.stack(trace)

    assert np.array_equal(rollout(7), rollout(7))
    first, other = rollout(7), rollout(8)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_driving_straight_into_traffic_gives_a_typed_collision():
    env = DriveEnv(scenario(vehicles=20, density=3.0, route_length_m=400.0, duration_s=40.0))
    env.reset(seed=1)
    info = {}
    for _ in range(200):
        _, _, term, trunc, info = env.step(np.array([1.0, 0.0, 0.0], np.float32))
        if term or trunc:
            break
    kinds = {e.kind.value for e in info["outcome"].events}
    assert "collision_vehicle" in kinds and info["outcome"].collision_ended


def test_step_before_reset_and_bad_actions_are_refused():
    env = DriveEnv(scenario())
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(3, np.float32))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0, 0]))
    env.close()


def test_rgb_frames_when_rendering():
    env = DriveEnv(scenario(), render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
    env.close()


def test_an_intersection_episode_does_not_change_later_traffic():
    """highway-env's intersection retunes its vehicle class's IDM constants; that must not reach other scenarios
    run later in the same process (a bench drives every kind in one worker)."""
    from highway_env.vehicle.behavior import IDMVehicle

    def rollout():
        env = DriveEnv(scenario(vehicles=8))
        obs, _ = env.reset(seed=7)
        agent, trace = ExpertAgent(), []
        for _ in range(20):
            obs, *_ = env.step(agent.act(obs))
            trace.append(obs["vehicles"].copy())
        env.close()
        return np.stack(trace)

    constants = ("DISTANCE_WANTED", "COMFORT_ACC_MAX", "COMFORT_ACC_MIN")
    before_constants = {name: getattr(IDMVehicle, name) for name in constants}
    before = rollout()
    intersection = DriveEnv(scenario("intersection", pedestrians=1))
    intersection.reset(seed=1)
    intersection.close()
    assert {name: getattr(IDMVehicle, name) for name in constants} == before_constants
    assert np.array_equal(rollout(), before)
