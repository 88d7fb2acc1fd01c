"""The embedded backend's faster intersection (FastRegulatedRoad) drives exactly as highway-env's own.

Each episode runs twice, in the same process: once on our env (FastRegulatedRoad, no deep copies) and once
on `ReferenceIntersectionEnv`, our env with highway-env's original `RegulatedRoad` (its
`is_conflict_possible` deep-copies plain vehicles for every pair). After reset and after every simulator
step, every road user's position, heading, speed, crash flag and yielding state must be equal bit for bit,
and so must the episode outcome.
"""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
from highway_env.envs.intersection_env import IntersectionEnv
from highway_env.road.regulation import RegulatedRoad
from highway_env.vehicle import kinematics
from highway_env.vehicle.kinematics import Vehicle

from prunedrive.agents.expert import ExpertAgent
from prunedrive.harness.action import Control
from prunedrive.harness.backends import highway
from prunedrive.harness.backends.highway import (FastRegulatedRoad, IntersectionScenarioEnv, Pedestrian,
                                                 _predict_kinematic)
from prunedrive.harness.env import DriveEnv
from prunedrive.scenarios.loader import Scenario


class ReferenceIntersectionEnv(IntersectionScenarioEnv):
    """The reference: our intersection env on highway-env's unmodified RegulatedRoad."""

    def _make_road(self) -> None:
        IntersectionEnv._make_road(self)
        assert type(self.road) is RegulatedRoad


def intersection(**kw):
    args = dict(name="intersection", kind="intersection", vehicles=6, pedestrians=2, speed_limit_mps=9.0,
                duration_s=20.0)
    args.update(kw)
    return Scenario(**args)


def expert_policy():
    agent = ExpertAgent()
    return agent.act


def full_throttle():
    """Straight through the junction without looking: crashes into crossing traffic on some seeds."""
    return lambda _obs: Control(throttle=1.0)


def snapshot(road) -> np.ndarray:
    """Every road user's raw state: x, y, heading, speed, crashed, yielding, target speed (-inf: none)."""
    return np.array([(v.position[0], v.position[1], v.heading, v.speed, float(v.crashed),
                      float(getattr(v, "is_yielding", False)), float(getattr(v, "target_speed", -np.inf)))
                     for v in road.vehicles], dtype=np.float64).reshape(-1, 7)


def rollout(env_cls, scenario, seed, policy, monkeypatch):
    """One whole episode on `env_cls`; the trace has a state after reset and after each simulator step."""
    with monkeypatch.context() as m:
        m.setitem(highway._ENVS, "intersection", env_cls)
        deep_copies = []  # vehicles deep-copied by highway-env's kinematic prediction

        def counting_deepcopy(x, memo=None):
            deep_copies.append(type(x).__name__)
            return copy.deepcopy(x, memo)

        m.setattr(kinematics, "copy", SimpleNamespace(deepcopy=counting_deepcopy))
        env = DriveEnv(scenario)
        obs, _ = env.reset(seed=seed)
        road = env.backend.env.unwrapped.road
        trace = [snapshot(road)]
        road_step = road.step

        def recorded_step(dt):
            road_step(dt)
            trace.append(snapshot(road))

        road.step = recorded_step
        act = policy()
        info = {}
        for _ in range(1000):
            obs, _, terminated, truncated, info = env.step(act(obs))
            if terminated or truncated:
                break
        road_class = type(road)
        env.close()
    return trace, info["outcome"], road_class, deep_copies


CASES = [(intersection(), seed, expert_policy) for seed in (51, 52, 53)]  # the standard suite's
DENSE = dict(vehicles=10, density=2.0)  # more conflicts to resolve, and walkers hit by traffic
CASES += [(intersection(**DENSE, pedestrians=3, duration_s=12.0), seed, expert_policy) for seed in (1, 2)]
CASES += [(intersection(**DENSE), seed, full_throttle) for seed in (3, 4)]  # seed 4: the ego crashes


@pytest.mark.parametrize("scenario,seed,policy", CASES,
                         ids=[f"{s.vehicles}v-{s.pedestrians}p-seed{seed}-{p.__name__}" for s, seed, p in CASES])
def test_fast_intersection_drives_exactly_as_highway_env(scenario, seed, policy, monkeypatch):
    fast, fast_outcome, fast_road, fast_copies = rollout(IntersectionScenarioEnv, scenario, seed, policy, monkeypatch)
    ref, ref_outcome, ref_road, ref_copies = rollout(ReferenceIntersectionEnv, scenario, seed, policy, monkeypatch)
    assert fast_road is FastRegulatedRoad and ref_road is RegulatedRoad
    assert not fast_copies  # the fast path ran: no vehicle was deep-copied
    assert ref_copies  # and the reference really predicted through highway-env's deep copies
    assert len(fast) == len(ref) > 10
    for step, (a, b) in enumerate(zip(fast, ref)):
        assert a.shape == b.shape, f"simulator step {step}: {len(a)} road users against {len(b)}"
        assert np.array_equal(a, b), f"simulator step {step}: states differ"
    assert fast_outcome == ref_outcome


def test_the_cases_exercise_yielding_and_crashes(monkeypatch):
    """Guard on the cases above: traffic yields, a crashed road user stays on the road (its prediction
    takes Vehicle.step's crashed branch), and an ego crash ends an episode."""
    yielded = crashed_user = False
    for scenario, seed, policy in (CASES[4], CASES[-1]):
        trace, outcome, *_ = rollout(IntersectionScenarioEnv, scenario, seed, policy, monkeypatch)
        yielded = yielded or any(s[:, 5].any() for s in trace)
        crashed_user = crashed_user or any(s[:, 4].any() for s in trace[:-1])
    assert yielded and crashed_user and outcome.collision_ended


def _vehicle_states(road):
    """Plain kinematic vehicles in the states whose prediction takes each branch of Vehicle.step."""
    lane = road.network.get_lane(("o0", "ir0", 0))
    states = []
    for steering in (0.0, 0.3, -0.7, np.float64(0.12345)):
        for speed in (0.0, 7.3, np.float64(12.25), 45.0, -41.0):  # above MAX_SPEED, below MIN_SPEED clip
            v = Vehicle(road, lane.position(30.0, 0.4), lane.heading_at(30.0) + 0.05, speed)
            v.action = {"steering": steering, "acceleration": 2.5}
            states.append(v)
    crashed = Vehicle(road, lane.position(40.0, 0.0), lane.heading_at(40.0), 6.0)
    crashed.crashed = True
    crashed.action = {"steering": 0.2, "acceleration": 1.0}
    hit = Vehicle(road, lane.position(50.0, 0.0), 0.3, 8.0)
    hit.action = {"steering": 0.1, "acceleration": 0.0}
    hit.impact = np.array([0.25, -0.125])
    zero = Vehicle(road, lane.position(60.0, 0.0), 1.0, 5.0, predition_type="zero_steering")
    zero.action = {"steering": 0.4, "acceleration": 0.0}
    walker = Pedestrian(road, lane.position(20.0, 3.0), heading=2.0, speed=1.3)
    walker.action = {"steering": 0.5, "acceleration": 1.0}
    return states + [crashed, hit, zero, walker]


def test_kinematic_prediction_is_bit_for_bit_the_deep_copy_one():
    env = IntersectionScenarioEnv(config=highway._config(intersection()))
    env.reset(seed=0)
    road = env.unwrapped.road
    times = np.arange(0.25, 3, 0.25)
    for v in _vehicle_states(road):
        before = (v.position.copy(), v.heading, v.speed, dict(v.action), v.crashed,
                  None if v.impact is None else v.impact.copy())
        fast_positions, fast_headings = _predict_kinematic(v, times)
        positions, headings = Vehicle.predict_trajectory_constant_speed(v, times)
        assert np.array_equal(np.array(fast_positions), np.array(positions))
        assert np.array_equal(np.array(fast_headings), np.array(headings))
        after = (v.position, v.heading, v.speed, v.action, v.crashed, v.impact)
        assert np.array_equal(before[0], after[0]) and before[1:4] == after[1:4] and before[4] == after[4]
        assert (before[5] is None and after[5] is None) or np.array_equal(before[5], after[5])
        assert v.road is road  # the prediction left the vehicle as it was
    env.close()


def test_conflict_test_agrees_with_highway_envs_on_every_pair():
    """FastRegulatedRoad.is_conflict_possible against RegulatedRoad's, pair by pair, on crowded roads."""
    env = IntersectionScenarioEnv(config=highway._config(intersection(vehicles=14, density=3.0)))
    checked = conflicts = 0
    for seed in range(4):
        env.reset(seed=seed)
        road = env.unwrapped.road
        users = road.vehicles + _vehicle_states(road)[-4:]
        for _ in range(3):
            road._round = FastRegulatedRoad._predict_round(users)
            for i, v1 in enumerate(users):
                for v2 in users[i + 1:]:
                    fast = road.is_conflict_possible(v1, v2)
                    reference = RegulatedRoad.is_conflict_possible(v1, v2)
                    assert bool(fast) == bool(reference)
                    checked += 1
                    conflicts += bool(reference)
            road._round = None
            env.step(np.array([0.2, 0.0], np.float32))
    assert conflicts > 0 and checked > conflicts
    env.close()


def _with_observation(env_cls):
    """A reference class: `env_cls` computing highway-env's own observation every step, as highway-env does."""
    from highway_env.envs.common.abstract import AbstractEnv

    return type(f"Observed{env_cls.__name__}", (env_cls,), {"define_spaces": AbstractEnv.define_spaces})


KIND_SCENARIOS = [Scenario(name=k, kind=k, vehicles=8, pedestrians=2 if k == "intersection" else 0, duration_s=15.0)
                  for k in ("highway_cruise", "dense_highway", "onramp_merge", "roundabout", "intersection")]


@pytest.mark.parametrize("scenario", KIND_SCENARIOS, ids=[s.kind for s in KIND_SCENARIOS])
def test_skipping_highway_envs_observation_changes_no_trajectory(scenario, monkeypatch):
    traces, outcomes = [], []
    for make in (lambda cls: cls, _with_observation):
        with monkeypatch.context() as m:
            m.setitem(highway._ENVS, scenario.kind, make(highway._ENVS[scenario.kind]))
            env = DriveEnv(scenario)
            obs, _ = env.reset(seed=7)
            road = env.backend.env.unwrapped.road
            trace, act = [snapshot(road)], expert_policy()
            for _ in range(1000):
                obs, _, terminated, truncated, info = env.step(act(obs))
                trace.append(snapshot(road))
                if terminated or truncated:
                    break
            env.close()
        traces.append(trace)
        outcomes.append(info["outcome"])
    skipped, observed = traces
    assert len(skipped) == len(observed) > 10
    assert all(np.array_equal(a, b) for a, b in zip(skipped, observed))
    assert outcomes[0] == outcomes[1]
