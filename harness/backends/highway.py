"""The embedded backend: highway-env (a maintained PyPI simulator) driven by CARLA-style controls.

Each scenario kind uses one of highway-env's road networks; the ego is a kinematic bicycle
(`highway_env.vehicle.kinematics.Vehicle`) driven through `ContinuousAction`; background traffic is
highway-env's IDM/MOBIL vehicles. The route is a lane-level polyline through the road network.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from highway_env.envs.common.abstract import AbstractEnv
from highway_env.envs.highway_env import HighwayEnv
from highway_env.envs.intersection_env import IntersectionEnv
from highway_env.envs.merge_env import MergeGenericEnv
from highway_env.envs.roundabout_env import RoundaboutGenericEnv
from highway_env.road.regulation import RegulatedRoad
from highway_env.road.road import Road
from highway_env.vehicle.behavior import IDMVehicle
from highway_env.vehicle.kinematics import Vehicle
from highway_env.vehicle.objects import Obstacle, RoadObject

from prunedrive.harness.action import Control
from prunedrive.harness.backends.base import BackendState
from prunedrive.harness.backends.highway_fast import FastRegulatedRoad, FastRoad, reads_no_road, speed_up
from prunedrive.harness.events import Event, EventKind, StepEvents
from prunedrive.harness.observation import EgoState, WorldObjects
from prunedrive.scenarios.loader import Scenario, ScenarioError

SIMULATION_HZ = 15
MAX_ACCEL = 4.0      # m/s^2 at full throttle
MAX_DECEL = 8.0      # m/s^2 at full brake
ROLLING_DECEL = 0.2  # m/s^2 when coasting
STEER_RANGE = np.pi / 4  # steer = 1 is this front-wheel angle (rad)
_ACCEL_SCALE = MAX_DECEL  # ContinuousAction maps [-1, 1] linearly onto [-scale, scale]


class Pedestrian(Vehicle):
    """A walker crossing the road at constant speed; a small highway-env vehicle that never steers,
    so IDM traffic treats it as an obstacle on its lane and collisions are detected by the road."""

    LENGTH = 0.8
    WIDTH = 0.8
    route: list = []  # highway-env's intersection drops road users whose route is None

    @reads_no_road
    def act(self, action=None) -> None:
        self.action = {"steering": 0.0, "acceleration": 0.0}


class _NoRewards:
    """What the harness does not read from highway-env: its rewards (they assume its discrete actions; the
    harness scores routes itself), its info, and its observation (the backend reads the road's objects
    itself). highway-env builds the observation as a pandas frame every step, a large share of a step's time;
    it reads state and draws no random numbers (the "sorted" order), so skipping it changes no trajectory."""

    def _reward(self, action) -> float:
        return 0.0

    def _info(self, obs, action=None) -> dict:
        return {}

    def define_spaces(self) -> None:
        super().define_spaces()
        blank = np.zeros(self.observation_space.shape, self.observation_space.dtype)
        self.observation_type.observe = lambda: blank

    # highway-env's road, switched to our faster classes of the same behaviour as soon as it is built, before
    # the vehicles are placed (the intersection simulates 3 s of traffic there): highway_fast.py, and
    # FastRegulatedRoad for the intersection. The same objects and state, bit-identical trajectories.
    def _make_road(self) -> None:  # merge, roundabout, intersection
        super()._make_road()
        self._speed_up_road()

    def _create_road(self) -> None:  # highway
        super()._create_road()
        self._speed_up_road()

    def _speed_up_road(self) -> None:
        speed_up(self.road, {Road: FastRoad, RegulatedRoad: FastRegulatedRoad})


class HighwayScenarioEnv(_NoRewards, HighwayEnv):
    pass


class RoundaboutScenarioEnv(_NoRewards, RoundaboutGenericEnv):
    pass


class StoppedVehicleEnv(_NoRewards, HighwayEnv):
    """A straight highway with one stopped car in the ego's lane, STOPPED_AHEAD_M ahead, and no other traffic:
    the plainest test of when a driver brakes (harness.latency: a late brake hits it). The stopped car is a
    plain kinematic vehicle that never acts, so it stays where it is."""

    STOPPED_AHEAD_M = 90.0

    def _create_vehicles(self) -> None:
        lanes = self.config["lanes_count"]
        lane = self.road.network.get_lane(("0", "1", lanes // 2))
        ego = self.action_type.vehicle_class(self.road, lane.position(50.0, 0.0), lane.heading_at(50.0), speed=25.0)
        self.controlled_vehicles = [ego]
        self.road.vehicles.append(ego)
        ahead = 50.0 + self.STOPPED_AHEAD_M
        self.road.vehicles.append(Vehicle(self.road, lane.position(ahead, 0.0), lane.heading_at(ahead), speed=0.0))


class IntersectionIDMVehicle(IDMVehicle):
    """Intersection traffic's own IDM class. highway-env's IntersectionEnv tunes its traffic by assigning
    class attributes (DISTANCE_WANTED, COMFORT_ACC_MAX/MIN) on the configured vehicle class; on the shared
    IDMVehicle that changed every later highway, merge and roundabout episode in the same process, so a
    result depended on which scenarios had run before it. The tuning now lands on this subclass only."""


class IntersectionScenarioEnv(_NoRewards, IntersectionEnv):
    @classmethod
    def default_config(cls) -> dict:
        config = super().default_config()
        config["other_vehicles_type"] = f"{__name__}.{IntersectionIDMVehicle.__name__}"
        return config


class RampMergeEnv(_NoRewards, MergeGenericEnv):
    """highway-env's merge road with the ego on the on-ramp, merging into highway traffic."""

    def _make_vehicles(self) -> None:
        road, lanes = self.road, self.config["lanes_count"]
        ramp = road.network.get_lane(("j", "k", 0))
        ego = self.action_type.vehicle_class(road, ramp.position(20.0, 0.0), ramp.heading_at(20.0),
                                             speed=0.7 * ramp.speed_limit)
        road.vehicles.append(ego)
        self.vehicle = ego
        other = _other_vehicle_class(self.config)
        length = self.config["before_merge_length"] + self.config["converge_merge_length"]
        spacing = max(length * lanes / max(self.config["vehicles_count"], 1), 12.0)
        for i in range(self.config["vehicles_count"]):
            lane = road.network.get_lane(("a", "b", int(self.np_random.integers(lanes))))
            s = (i * spacing / lanes + self.np_random.uniform(0, 5)) % length
            vehicle = other(road, lane.position(s, 0.0), lane.heading_at(s),
                            speed=lane.speed_limit * self.np_random.uniform(0.8, 1.0))
            if all(np.linalg.norm(v.position - vehicle.position) > 12 for v in road.vehicles):
                vehicle.randomize_behavior()
                road.vehicles.append(vehicle)


def _other_vehicle_class(config: dict):
    from highway_env import utils

    return utils.class_from_path(config["other_vehicles_type"])


_ENVS = {
    "highway_cruise": HighwayScenarioEnv,
    "dense_highway": HighwayScenarioEnv,
    "stopped_vehicle": StoppedVehicleEnv,
    "onramp_merge": RampMergeEnv,
    "roundabout": RoundaboutScenarioEnv,
    "intersection": IntersectionScenarioEnv,
}


def _config(scenario: Scenario) -> dict:
    policy_hz = scenario.policy_hz
    if SIMULATION_HZ % policy_hz:
        raise ValueError(f"scenario {scenario.name!r}: policy_hz must divide {SIMULATION_HZ} for the embedded "
                         f"backend; allowed: 1, 3, 5, 15")
    config = {
        "action": {"type": "ContinuousAction", "acceleration_range": (-_ACCEL_SCALE, _ACCEL_SCALE),
                   "steering_range": (-STEER_RANGE, STEER_RANGE), "speed_range": (0.0, 40.0)},
        "observation": {"type": "Kinematics", "vehicles_count": 1},
        "simulation_frequency": SIMULATION_HZ,
        "policy_frequency": int(policy_hz),
        "duration": 10 * scenario.duration_s,  # the harness times routes out, not highway-env
        "offscreen_rendering": True,
        "vehicles_count": scenario.vehicles,
        "vehicles_density": scenario.density,
        "lanes_count": scenario.lanes,
        "screen_width": 640,
        "screen_height": 320,
    }
    if scenario.kind == "roundabout":
        config["roundabout_lanes"] = min(scenario.lanes, 2)
    if scenario.kind == "intersection":
        config.update(destination=None, initial_vehicle_count=scenario.vehicles,
                      spawn_probability=min(0.1 * scenario.density * 6, 1.0))
    return config


def _quiet_offscreen_sdl() -> None:
    """highway-env draws with pygame (SDL). Offscreen it needs no display or sound, and SDL complains on
    stderr ("XDG_RUNTIME_DIR is invalid") when that variable is unset: give it a private one."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    if not os.environ.get("XDG_RUNTIME_DIR"):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="prunedrive-xdg-")


def original_env(kind: str) -> type:
    """Our env of `kind` run the way highway-env runs it: its own road, network and right-of-way classes
    and its observation every step. What the fast path is checked and timed against (tests/test_fast_sim.py,
    benchmarks/sim_step.py): the trajectories must be the same bit for bit."""
    fast = _ENVS[kind]

    def _speed_up_road(self) -> None:
        pass  # highway-env's own classes stay

    return type(f"Original{fast.__name__}", (fast,), {"_speed_up_road": _speed_up_road,
                                                       "define_spaces": AbstractEnv.define_spaces})


class HighwayBackend:
    """Backend protocol on highway-env."""

    # What it declares (base.Backend): its kinds (in this order in messages), no options, no server.
    KINDS = ("highway_cruise", "dense_highway", "stopped_vehicle", "onramp_merge", "roundabout", "intersection")
    OPTIONS: tuple[str, ...] = ()
    SERVER = None

    def __init__(self, scenario: Scenario, render: bool = False):
        # A suite is checked before it runs (harness.backends.check_suite); this catches a Scenario built in code.
        unknown = sorted(map(str, set(scenario.options) - set(self.OPTIONS)))
        if unknown:
            raise ScenarioError(f"scenario {scenario.name!r}: unknown option(s) {', '.join(unknown)} for the highway "
                                "backend; it takes no options")
        if render:
            _quiet_offscreen_sdl()
        self.scenario = scenario
        self.env = _ENVS[scenario.kind](config=_config(scenario), render_mode="rgb_array" if render else None)
        self.dt = 1.0 / scenario.policy_hz
        self._route = np.zeros((0, 2))
        self._rng = np.random.default_rng(0)

    # -- lifecycle -------------------------------------------------------------------------------
    def reset(self, seed: int) -> BackendState:
        self.env.reset(seed=seed)
        self._rng = np.random.default_rng(seed)
        road = self.env.unwrapped.road
        for lane in road.network.lanes_list():
            lane.speed_limit = self.scenario.speed_limit_mps
        ego = self.ego
        for vehicle in road.vehicles:
            if vehicle is not ego and hasattr(vehicle, "target_speed"):
                vehicle.target_speed = self.scenario.speed_limit_mps * self._rng.uniform(0.75, 1.0)
        ego.speed = min(ego.speed, self.scenario.speed_limit_mps)
        self._route = self._plan_route()
        if self.scenario.pedestrians:
            self._spawn_pedestrians()
        self._time = 0.0
        self._control = Control()
        self._last_speed = ego.speed
        self._crashed_before = {id(o) for o in self._road_users() if o.crashed}
        return self._state(accel=0.0)

    def route_polyline(self) -> np.ndarray:
        return self._route

    def step(self, control: Control) -> tuple[BackendState, StepEvents]:
        self.env.step(self._action(control, self.dt))
        return self._stepped(control)

    def step_ticks(self, controls: list[Control]) -> tuple[BackendState, StepEvents]:
        """One policy step with a control per simulation tick (harness.latency: a late control takes effect
        between policy steps). The same frames highway-env's `_simulate` runs, the ego's action set at the first
        tick and again at each tick where the control changes; equal controls throughout are exactly `step`."""
        if len(controls) != self.ticks_per_step:
            raise ValueError(f"step_ticks needs {self.ticks_per_step} controls (one per tick), got {len(controls)}")
        if all(control == controls[0] for control in controls):
            return self.step(controls[0])
        env = self.env.unwrapped
        tick_s = 1.0 / SIMULATION_HZ
        env.time += 1 / env.config["policy_frequency"]
        for i, control in enumerate(controls):
            if i == 0 or control != controls[i - 1]:
                env.action_type.act(self._action(control, (len(controls) - i) * tick_s))
            env.road.act()
            env.road.step(tick_s)
            env.steps += 1
        return self._stepped(controls[-1])

    @property
    def ticks_per_step(self) -> int:
        return SIMULATION_HZ // int(self.scenario.policy_hz)

    def _action(self, control: Control, held_s: float) -> np.ndarray:
        """highway-env's ContinuousAction for `control`, held for `held_s` seconds."""
        ego = self.ego
        accel = MAX_ACCEL * control.throttle - MAX_DECEL * control.brake
        if ego.speed > 0.1:
            accel -= ROLLING_DECEL
        accel = max(accel, -ego.speed / held_s)  # brakes stop the car; they never reverse it
        return np.array([accel / _ACCEL_SCALE, control.steer], np.float32)

    def _stepped(self, control: Control) -> tuple[BackendState, StepEvents]:
        ego = self.ego
        self._time += self.dt
        self._control = control
        speed = ego.speed
        state = self._state(accel=(speed - self._last_speed) / self.dt)
        self._last_speed = speed
        events = self._collision_events()
        return state, StepEvents(events=events, ended=ego.crashed)

    def render(self) -> np.ndarray | None:
        return self.env.render() if self.env.render_mode == "rgb_array" else None

    def close(self) -> None:
        self.env.close()

    # -- state -----------------------------------------------------------------------------------
    @property
    def ego(self) -> Vehicle:
        return self.env.unwrapped.vehicle

    def _road_users(self) -> list[RoadObject]:
        road = self.env.unwrapped.road
        return [*road.vehicles, *road.objects]

    def _state(self, accel: float) -> BackendState:
        ego = self.ego
        road = self.env.unwrapped.road
        others = [v for v in road.vehicles if v is not ego]
        vehicles = np.array([(*v.position, *v.velocity, v.heading, v.LENGTH, v.WIDTH)
                             for v in others if not isinstance(v, Pedestrian)]).reshape(-1, 7)
        walkers = np.array([(*p.position, *p.velocity) for p in others if isinstance(p, Pedestrian)]).reshape(-1, 4)
        lane = ego.lane
        ego_state = EgoState(x=float(ego.position[0]), y=float(ego.position[1]), yaw=float(ego.heading),
                             speed=float(ego.speed), accel=float(accel), speed_limit=float(lane.speed_limit),
                             throttle=self._control.throttle, brake=self._control.brake, steer=self._control.steer)
        return BackendState(ego=ego_state, objects=WorldObjects(vehicles=vehicles, pedestrians=walkers),
                            outside_route_lanes=self._outside_lanes(), sim_time_s=self._time)

    def _outside_lanes(self) -> bool:
        """Off every lane, or on a lane of the opposite direction (OutsideRouteLanesTest's two cases)."""
        ego = self.ego
        lane = ego.lane
        s, _ = lane.local_coordinates(ego.position)
        wrong_way = abs((lane.heading_at(s) - ego.heading + np.pi) % (2 * np.pi) - np.pi) > np.pi / 2
        return (not lane.on_lane(ego.position)) or wrong_way

    def _collision_events(self) -> list[Event]:
        """Ego collisions, typed by what was hit: highway-env flags both parties as crashed."""
        ego = self.ego
        newly = [o for o in self._road_users() if o.crashed and id(o) not in self._crashed_before and o is not ego]
        self._crashed_before |= {id(o) for o in newly}
        if not ego.crashed or id(ego) in self._crashed_before:
            return []
        self._crashed_before.add(id(ego))
        candidates = newly or [o for o in self._road_users() if o is not ego]
        other = min(candidates, key=lambda o: np.linalg.norm(o.position - ego.position))
        if isinstance(other, Pedestrian):
            kind = EventKind.COLLISION_PEDESTRIAN
        elif isinstance(other, (Obstacle,)) or not isinstance(other, Vehicle):
            kind = EventKind.COLLISION_STATIC
        else:
            kind = EventKind.COLLISION_VEHICLE
        step = int(round(self._time / self.dt))
        return [Event(kind, step, detail=f"hit {type(other).__name__} at {other.speed:.1f} m/s")]

    # -- routes ----------------------------------------------------------------------------------
    def _plan_route(self) -> np.ndarray:
        ego = self.ego
        network = self.env.unwrapped.road.network
        kind = self.scenario.kind
        if kind in ("highway_cruise", "dense_highway", "stopped_vehicle"):
            lane = ego.lane
            s0 = lane.local_coordinates(ego.position)[0]
            return np.array([lane.position(s, 0.0) for s in np.arange(s0, s0 + self.scenario.route_length_m, 5.0)])
        if kind == "onramp_merge":
            return self._merge_route()
        destination = {"roundabout": ["exr", "nxr", "wxr"], "intersection": ["o1", "o2", "o3"]}[kind]
        goal = destination[int(self._rng.integers(len(destination)))]
        start = ego.lane_index
        path = network.shortest_path(start[1], goal)
        lanes = [network.get_lane(start)]
        for a, b in zip(path[:-1], path[1:]):
            # Of a road's parallel lanes, continue on the one that starts where the last one ends.
            end = lanes[-1].position(lanes[-1].length, 0.0)
            lanes.append(min(network.graph[a][b], key=lambda l: np.linalg.norm(l.position(0.0, 0.0) - end)))
        s0 = lanes[0].local_coordinates(ego.position)[0]
        points = [lanes[0].position(s, 0.0) for s in np.arange(s0, lanes[0].length, 2.0)]
        for lane in lanes[1:]:
            points += [lane.position(s, 0.0) for s in np.arange(0.0, lane.length, 2.0)]
        if kind == "intersection":  # the exit road is long: finish 40 m past the junction
            points = points[: len(points) - int(max(lanes[-1].length - 40.0, 0.0) / 2.0)]
        return np.array(points)

    def _merge_route(self) -> np.ndarray:
        network = self.env.unwrapped.road.network
        lanes = self.scenario.lanes
        ramp, converge = network.get_lane(("j", "k", 0)), network.get_lane(("k", "b", 0))
        merge, target = network.graph["b"]["c"][lanes], network.get_lane(("b", "c", lanes - 1))
        after = network.get_lane(("c", "d", lanes - 1))
        s0 = ramp.local_coordinates(self.ego.position)[0]
        points = [ramp.position(s, 0.0) for s in np.arange(s0, ramp.length, 2.0)]
        points += [converge.position(s, 0.0) for s in np.arange(0.0, converge.length, 2.0)]
        for s in np.arange(0.0, merge.length, 2.0):  # blend from the merge lane into the highway lane
            w = np.clip((s / merge.length - 0.2) / 0.5, 0.0, 1.0)
            points.append((1 - w) * merge.position(s, 0.0) + w * target.position(s, 0.0))
        points += [after.position(s, 0.0) for s in np.arange(0.0, after.length - 90.0, 2.0)]
        return np.array(points)

    def _spawn_pedestrians(self) -> None:
        """Walkers crossing the route's road ahead of the ego, timed to meet it."""
        road = self.env.unwrapped.road
        route = self._route
        arc = np.concatenate(([0.0], np.cumsum(np.hypot(*np.diff(route, axis=0).T))))
        for _ in range(self.scenario.pedestrians):
            s = self._rng.uniform(0.25, 0.7) * arc[-1]
            i = int(np.searchsorted(arc, s))
            i = min(max(i, 1), len(route) - 1)
            direction = route[i] - route[i - 1]
            heading = np.arctan2(direction[1], direction[0])
            side = self._rng.choice([-1.0, 1.0])
            normal = np.array([-np.sin(heading), np.cos(heading)]) * side
            start = route[i] + normal * self._rng.uniform(6.0, 10.0)
            walker = Pedestrian(road, start, heading=float(np.arctan2(-normal[1], -normal[0])),
                                speed=float(self._rng.uniform(1.0, 1.6)))
            walker.check_collisions = True
            road.vehicles.append(walker)
