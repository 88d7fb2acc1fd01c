"""The embedded backend's fast simulator classes drive exactly as highway-env's own.

Each episode runs twice, in the same process: once on our env (FastRoad/FastRegulatedRoad and
FastRoadNetwork, no deep copies, no observation) and once on `highway.original_env(kind)`, our env on
highway-env's unmodified road, network and right-of-way classes, computing its observation every step.
After reset and after every simulator step, every road user's position, heading, speed, crash flag and
yielding state must be equal bit for bit, and so must the episode outcome.
"""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
from highway_env.road.regulation import RegulatedRoad
from highway_env.road.road import Road, RoadNetwork
from highway_env.vehicle import kinematics
from highway_env.vehicle.kinematics import Vehicle

from prunedrive.agents.expert import ExpertAgent
from prunedrive.harness.action import Control
from prunedrive.harness.backends import highway
from prunedrive.harness.backends.highway import IntersectionScenarioEnv, Pedestrian
from prunedrive.harness.backends.highway_fast import (FastRegulatedRoad, FastRoad, FastRoadNetwork, _LaneTable,
                                                      _predict_kinematic)
from prunedrive.harness.env import DriveEnv
from prunedrive.scenarios.loader import Scenario, load_suite


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
        m.setitem(highway._ENVS, scenario.kind, env_cls)
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
        classes = (type(road), type(road.network))
        env.close()
    return trace, info["outcome"], classes, deep_copies


CASES = [(intersection(), seed, expert_policy) for seed in (51, 52, 53)]  # the standard suite's
DENSE = dict(vehicles=10, density=2.0)  # more conflicts to resolve, and walkers hit by traffic
CASES += [(intersection(**DENSE, pedestrians=3, duration_s=12.0), seed, expert_policy) for seed in (1, 2)]
CASES += [(intersection(**DENSE), seed, full_throttle) for seed in (3, 4)]  # seed 4: the ego crashes


def assert_same_episode(fast, fast_outcome, ref, ref_outcome):
    assert len(fast) == len(ref) > 10
    for step, (a, b) in enumerate(zip(fast, ref)):
        assert a.shape == b.shape, f"simulator step {step}: {len(a)} road users against {len(b)}"
        assert np.array_equal(a, b), f"simulator step {step}: states differ"
    assert fast_outcome == ref_outcome


@pytest.mark.parametrize("scenario,seed,policy", CASES,
                         ids=[f"{s.vehicles}v-{s.pedestrians}p-seed{seed}-{p.__name__}" for s, seed, p in CASES])
def test_fast_intersection_drives_exactly_as_highway_env(scenario, seed, policy, monkeypatch):
    fast, fast_outcome, fast_classes, fast_copies = rollout(IntersectionScenarioEnv, scenario, seed, policy,
                                                            monkeypatch)
    ref, ref_outcome, ref_classes, ref_copies = rollout(highway.original_env("intersection"), scenario, seed,
                                                        policy, monkeypatch)
    assert fast_classes == (FastRegulatedRoad, FastRoadNetwork) and ref_classes == (RegulatedRoad, RoadNetwork)
    assert not fast_copies  # the fast path ran: no vehicle was deep-copied
    assert ref_copies  # and the reference really predicted through highway-env's deep copies
    assert_same_episode(fast, fast_outcome, ref, ref_outcome)


STANDARD = {s.kind: s for s in load_suite("standard").scenarios}
OTHER_KINDS = [(kind, seed, policy) for kind in ("highway_cruise", "dense_highway", "onramp_merge", "roundabout")
               for seed, policy in ((STANDARD[kind].seeds[0], expert_policy), (5, full_throttle))]


@pytest.mark.parametrize("kind,seed,policy", OTHER_KINDS, ids=[f"{k}-seed{s}-{p.__name__}" for k, s, p in OTHER_KINDS])
def test_every_kind_drives_exactly_as_highway_env(kind, seed, policy, monkeypatch):
    """The standard suite's scenario of each kind, 20 s of it: the expert, and full throttle into traffic."""
    from dataclasses import replace

    scenario = replace(STANDARD[kind], duration_s=20.0)
    fast, fast_outcome, fast_classes, _ = rollout(highway._ENVS[kind], scenario, seed, policy, monkeypatch)
    ref, ref_outcome, ref_classes, _ = rollout(highway.original_env(kind), scenario, seed, policy, monkeypatch)
    assert fast_classes == (FastRoad, FastRoadNetwork) and ref_classes == (Road, RoadNetwork)
    assert_same_episode(fast, fast_outcome, ref, ref_outcome)


def _probe_points(network, rng, random_points=1500):
    """Where the closest lane is hardest to tell: every lane's ends and middle (consecutive lanes meet there,
    so their distances tie to within rounding), with and without a heading, and random points around."""
    lanes = network.lanes_list()
    points = [(lane.position(s, 0.0), heading)
              for lane in lanes for s in (0.0, lane.length / 2, lane.length, -1e-9, lane.length + 1e-9)
              for heading in (lane.heading_at(s), None)]
    ends = np.array([lane.position(s, 0.0) for lane in lanes for s in (0.0, lane.length)])
    low, high = ends.min(axis=0) - 20, ends.max(axis=0) + 20
    points += [(rng.uniform(low, high), rng.uniform(-4, 4) if rng.random() < 0.8 else None)
               for _ in range(random_points)]
    return points


@pytest.mark.parametrize("kind", list(highway._ENVS))
def test_closest_lane_is_highway_envs_at_lane_ends_and_anywhere(kind):
    # A kind the standard suite does not drive (stopped_vehicle) is checked at its defaults.
    env = highway._ENVS[kind](config=highway._config(STANDARD.get(kind) or Scenario(kind, kind)))
    env.reset(seed=0)
    network = env.unwrapped.road.network
    assert type(network) is FastRoadNetwork
    table, rng = _LaneTable.of_network(network), np.random.default_rng(0)
    plain_argmin_wrong = 0
    for position, heading in _probe_points(network, rng):
        expected = RoadNetwork.get_closest_lane_index(network, position, heading)
        assert network.get_closest_lane_index(position, heading) == expected, (position, heading)
        approximate = table.distances(np.asarray(position, dtype=np.float64)[None, :],
                                      None if heading is None else np.array([heading], dtype=np.float64))[:, 0]
        plain_argmin_wrong += table.indexes[int(np.argmin(approximate))] != expected
    with_heading = [(p, h) for p, h in _probe_points(network, rng) if h is not None]
    batched = network.closest_lane_indexes(np.array([p for p, _ in with_heading], dtype=np.float64),
                                           np.array([h for _, h in with_heading], dtype=np.float64))
    assert batched == [RoadNetwork.get_closest_lane_index(network, p, h) for p, h in with_heading]
    env.close()
    if kind in ("roundabout", "intersection"):
        # Guard: the vectorised distances alone (no exact re-check of the near ties) would answer wrongly
        # here, so the test above can fail.
        assert plain_argmin_wrong > 0


def test_collision_filter_keeps_every_pair_the_original_may_flag():
    """FastRoad._may_collide against RoadObject._is_colliding's own pre-check, on crowded roads."""
    env = highway._ENVS["dense_highway"](config=highway._config(replace_vehicles(STANDARD["dense_highway"], 40)))
    checked = near = 0
    for seed in range(3):
        env.reset(seed=seed)
        road = env.unwrapped.road
        for _ in range(5):
            vehicles, others = road.vehicles, road.vehicles + road.objects
            may = FastRoad._may_collide(vehicles, others, 1 / 15)
            for i, v in enumerate(vehicles):
                for j, other in enumerate(others):
                    if other is v:
                        continue
                    apart = np.linalg.norm(other.position - v.position) > (v.diagonal + other.diagonal) / 2 + v.speed / 15
                    assert may[i, j] or apart  # a pair dropped is a pair the original drops too
                    checked += 1
                    near += not apart
            env.step(np.array([0.5, 0.0], np.float32))
    assert near > 0 and checked > near
    env.close()


@pytest.mark.parametrize("kind", ["dense_highway", "onramp_merge", "roundabout", "intersection"])
def test_neighbours_are_highway_envs_on_every_lane_with_ties(kind):
    """FastRoad.neighbour_vehicles against Road.neighbour_vehicles for every vehicle on its own lane and on
    every lane of the network, on crowded roads where two extra vehicles share one position (a tie in s, so
    which of them is "front" depends on the loop order) and one sits exactly on a lane's edge."""
    env = highway._ENVS[kind](config=highway._config(replace_vehicles(STANDARD[kind], 30)))
    checked = found = ties = 0
    for seed in range(2):
        env.reset(seed=seed)
        road = env.unwrapped.road
        lane = road.network.get_lane(road.vehicles[1].lane_index)
        twins = [Vehicle(road, lane.position(lane.length / 3, 0.0), lane.heading_at(lane.length / 3), 5.0)
                 for _ in range(2)]
        edge = Vehicle(road, lane.position(lane.length / 4, lane.width_at(0) / 2 + 1), 0.0, 5.0)
        for extra in twins + [edge]:
            extra.route = []  # the intersection drops road users without a route
        road.vehicles += twins + [edge]
        for _ in range(3):
            for vehicle in road.vehicles:
                for lane_index in [vehicle.lane_index] + road.network.all_side_lanes(vehicle.lane_index):
                    fast = road.neighbour_vehicles(vehicle, lane_index)
                    original = Road.neighbour_vehicles(road, vehicle, lane_index)
                    assert fast[0] is original[0] and fast[1] is original[1], (vehicle, lane_index)
                    checked += 1
                    found += (original[0] is not None) + (original[1] is not None)
                    ties += original[0] is twins[1]
            env.step(np.array([0.3, 0.0], np.float32))
    assert checked > 100 and found > checked / 2 and ties > 0
    env.close()


def replace_vehicles(scenario, vehicles):
    from dataclasses import replace

    return replace(scenario, vehicles=vehicles)


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
