"""STAND-INS for the parts of the CARLA Leaderboard 2.0 evaluator that prunedrive meets, in both directions.

This is not the Leaderboard. It lets agents/leaderboard_agent.py and app/import_leaderboard.py be tested on a
machine without CARLA, the `leaderboard` package or scenario_runner:

- `AutonomousAgent` and `Track` (leaderboard/autoagents/autonomous_agent.py), `CarlaDataProvider`
  (scenario_runner srunner/scenariomanager/carla_data_provider.py, the calls a privileged agent makes),
  `RoadOption` (CARLA's agents/navigation/local_planner.py), installed as importable modules by
  `install(monkeypatch)` together with tests/carla_standin.py as `carla`;
- `StandinEvaluator`, which runs one route as leaderboard_evaluator.py's `_load_and_run_scenario` and
  scenario_manager.py's `_tick_scenario` do: import the agent module from its file path, call
  `get_entry_point()`, build the agent with (host, port, debug), `set_global_plan` (before `setup`, as
  the evaluator does), `setup(agent_config)`, `sensors()` (checked as `validate_sensor_configuration`
  does), then per tick the speedometer reading, `run_step(input_data, timestamp)`, `apply_control` and a
  world tick; `destroy()` at the end;
- `route_record`/`results_json`: a results file laid out as statistics_manager.py's RouteRecord,
  GlobalRecord and Results write it (the keys, their order and the global record's labels).

`REAL` records the public signatures of the real classes as read from the sources
(carla-simulator/leaderboard branch leaderboard-2.0 and master at aec8131, carla-simulator/scenario_runner
master at 94ff3b8 "0.9.16 release"); tests/test_leaderboard.py checks these stand-ins and the adapter
against it, and against a real checkout when LEADERBOARD_ROOT / SCENARIO_RUNNER_ROOT are set.
"""
from __future__ import annotations

import importlib
import math
import sys
import types
from enum import Enum, IntEnum
from pathlib import Path

import carla_standin as carla

# Public methods and their parameters, as in the real source files (staticmethods without self).
REAL = {
    ("leaderboard/autoagents/autonomous_agent.py", "AutonomousAgent"): {
        "__init__": ["self", "carla_host", "carla_port", "debug"],
        "setup": ["self", "path_to_conf_file"],
        "sensors": ["self"],
        "run_step": ["self", "input_data", "timestamp"],
        "destroy": ["self"],
        "__call__": ["self"],
        "get_ros_version": [],
        "set_global_plan": ["self", "global_plan_gps", "global_plan_world_coord"],
    },
    ("srunner/scenariomanager/carla_data_provider.py", "CarlaDataProvider"): {
        "register_actor": ["actor", "transform"],
        "set_client": ["client"],
        "get_client": [],
        "set_world": ["world"],
        "get_world": [],
        "get_map": ["world"],
        "get_hero_actor": [],
        "get_actors": [],
        "get_all_actors": [],
        "cleanup": [],
    },
}
REAL_TRACKS = ["SENSORS", "MAP", "SENSORS_QUALIFIER", "MAP_QUALIFIER"]
# leaderboard/autoagents/agent_wrapper.py SENSORS_LIMITS (the allowed sensor types)
ALLOWED_SENSORS = ("sensor.camera.rgb", "sensor.lidar.ray_cast", "sensor.other.radar", "sensor.other.gnss",
                   "sensor.other.imu", "sensor.opendrive_map", "sensor.speedometer")
# statistics_manager.py PENALTY_NAME_DICT values + 'route_timeout', in RouteRecord's order
INFRACTION_NAMES = ["collisions_layout", "collisions_pedestrian", "collisions_vehicle", "red_light",
                    "stop_infraction", "outside_route_lanes", "min_speed_infractions",
                    "yield_emergency_vehicle_infractions", "scenario_timeouts", "route_dev", "vehicle_blocked",
                    "route_timeout"]
GLOBAL_LABELS = ["Avg. driving score", "Avg. route completion", "Avg. infraction penalty",
                 "Collisions with pedestrians", "Collisions with vehicles", "Collisions with layout",
                 "Red lights infractions", "Stop sign infractions", "Off-road infractions", "Route deviations",
                 "Route timeouts", "Agent blocked", "Yield emergency vehicles infractions", "Scenario timeouts",
                 "Min speed infractions"]


# -- the classes --------------------------------------------------------------------------------------
class Track(Enum):
    SENSORS = "SENSORS"
    MAP = "MAP"
    SENSORS_QUALIFIER = "SENSORS_QUALIFIER"
    MAP_QUALIFIER = "MAP_QUALIFIER"


class AutonomousAgent:
    """The Leaderboard's agent base class (no sensor interface: the stand-in evaluator passes input_data)."""

    def __init__(self, carla_host, carla_port, debug=False):
        self.track = Track.SENSORS
        self._global_plan = None
        self._global_plan_world_coord = None
        self.wallclock_t0 = None

    def setup(self, path_to_conf_file):
        pass

    def sensors(self):
        return []

    def run_step(self, input_data, timestamp):
        return carla.VehicleControl()

    def destroy(self):
        pass

    def __call__(self):
        raise NotImplementedError("the stand-in evaluator calls run_step directly")

    @staticmethod
    def get_ros_version():
        return -1

    def set_global_plan(self, global_plan_gps, global_plan_world_coord):
        # The real one keeps every ~200 m (downsample_route); a stride is enough here.
        keep = list(range(0, len(global_plan_world_coord), 200)) + [len(global_plan_world_coord) - 1]
        self._global_plan_world_coord = [global_plan_world_coord[i] for i in keep]
        self._global_plan = [global_plan_gps[i] for i in keep]


class CarlaDataProvider:
    _client = _world = _map = None
    _pool: dict = {}

    @staticmethod
    def register_actor(actor, transform=None):
        CarlaDataProvider._pool[actor.id] = actor

    @staticmethod
    def set_client(client):
        CarlaDataProvider._client = client

    @staticmethod
    def get_client():
        return CarlaDataProvider._client

    @staticmethod
    def set_world(world):
        CarlaDataProvider._world, CarlaDataProvider._map = world, world.get_map()

    @staticmethod
    def get_world():
        return CarlaDataProvider._world

    @staticmethod
    def get_map(world=None):
        if CarlaDataProvider._map is None:
            CarlaDataProvider._map = (world or CarlaDataProvider._world).get_map()
        return CarlaDataProvider._map

    @staticmethod
    def get_hero_actor():
        for actor in CarlaDataProvider._pool.values():
            if actor.attributes["role_name"] == "hero":
                return actor
        return None

    @staticmethod
    def get_actors():
        return iter(CarlaDataProvider._pool.items())

    @staticmethod
    def get_all_actors():
        return CarlaDataProvider._world.get_actors()

    @staticmethod
    def cleanup():
        CarlaDataProvider._client = CarlaDataProvider._world = CarlaDataProvider._map = None
        CarlaDataProvider._pool = {}


class RoadOption(IntEnum):
    VOID = -1
    LEFT = 1
    RIGHT = 2
    STRAIGHT = 3
    LANEFOLLOW = 4
    CHANGELANELEFT = 5
    CHANGELANERIGHT = 6


class SensorConfigurationInvalid(Exception):
    pass


def validate_sensor_configuration(sensors, agent_track, selected_track):
    """The checks of agent_wrapper.validate_sensor_configuration that a sensor list can fail."""
    if Track(selected_track) != agent_track:
        raise SensorConfigurationInvalid(f"You are submitting to the wrong track [{Track(selected_track)}]!")
    ids = [s["id"] for s in sensors]
    if len(set(ids)) != len(ids):
        raise SensorConfigurationInvalid(f"Duplicated sensor tag in {ids}")
    for sensor in sensors:
        if sensor["type"] not in ALLOWED_SENSORS:
            raise SensorConfigurationInvalid(f"Illegal sensor '{sensor['type']}'")
        if agent_track == Track.SENSORS and sensor["type"].startswith("sensor.opendrive_map"):
            raise SensorConfigurationInvalid("Illegal sensor 'sensor.opendrive_map' used for Track SENSORS")
        if all(k in sensor for k in "xyz") and math.sqrt(sensor["x"]**2 + sensor["y"]**2 + sensor["z"]**2) > 3.0:
            raise SensorConfigurationInvalid(f"Illegal sensor extrinsics for '{sensor['id']}'")


def install(monkeypatch) -> None:
    """Make `carla`, `leaderboard.autoagents.autonomous_agent`, `srunner...carla_data_provider` and
    `agents.navigation.local_planner` importable as these stand-ins (for the test's duration)."""
    here = sys.modules[__name__]
    modules = {"carla": carla}
    for name, attributes in (
            ("leaderboard.autoagents.autonomous_agent", {"AutonomousAgent": AutonomousAgent, "Track": Track}),
            ("leaderboard.autoagents.agent_wrapper",
             {"validate_sensor_configuration": validate_sensor_configuration}),
            ("srunner.scenariomanager.carla_data_provider", {"CarlaDataProvider": CarlaDataProvider}),
            ("agents.navigation.local_planner", {"RoadOption": RoadOption})):
        parts = name.split(".")
        for i in range(1, len(parts)):
            package = ".".join(parts[:i])
            if package not in modules:
                modules[package] = types.ModuleType(package)
                modules[package].__path__ = []
        module = types.ModuleType(name)
        module.__dict__.update(attributes, __standin__=here)
        modules[name] = module
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    CarlaDataProvider.cleanup()


# -- the evaluator ------------------------------------------------------------------------------------
def dense_route(world_map, start, length_m: float, hop_m: float = 1.0) -> list:
    """(Transform, RoadOption) every `hop_m` along the lane from `start`, as interpolate_trajectory gives."""
    wp = world_map.get_waypoint(carla.Location(*start))
    route = [(wp.transform, RoadOption.LANEFOLLOW)]
    for _ in range(int(length_m / hop_m)):
        ahead = wp.next(hop_m)
        if not ahead:
            break
        wp = ahead[0]
        route.append((wp.transform, RoadOption.LANEFOLLOW))
    return route


def to_gps(route) -> list:
    """Flat-earth lat/lon of each route point (location_route_to_gps's output layout)."""
    out = []
    for transform, option in route:
        loc = transform.location
        out.append(({"lat": -loc.y / 111_319.5, "lon": loc.x / 111_319.5, "z": loc.z}, option))
    return out


class StandinEvaluator:
    """One route at a time on a carla_standin server, the way leaderboard_evaluator.py drives an agent."""

    def __init__(self, server, track: str = "SENSORS", fixed_delta: float = 0.05):
        self.server, self.track = server, track
        self.client = carla.Client(server.host, server.port)
        self.world = self.client.get_world()
        settings = self.world.get_settings()
        settings.synchronous_mode, settings.fixed_delta_seconds = True, fixed_delta
        self.world.apply_settings(settings)
        CarlaDataProvider.set_client(self.client)
        CarlaDataProvider.set_world(self.world)
        self.controls: list = []
        self.hero = None

    def spawn_hero(self, x: float, y: float, yaw: float = 0.0):
        bp = self.world.get_blueprint_library().find("vehicle.lincoln.mkz_2020")
        bp.set_attribute("role_name", "hero")
        self.hero = self.world.spawn_actor(bp, carla.Transform(carla.Location(x, y, 0.5), carla.Rotation(yaw=yaw)))
        CarlaDataProvider.register_actor(self.hero)
        return self.hero

    def run(self, agent_file: str | Path, agent_config: str | Path, route: list, ticks: int):
        """Set the agent up and drive `ticks` ticks; returns the agent (destroyed)."""
        agent_file = Path(agent_file)
        sys.path.insert(0, str(agent_file.parent))
        try:
            module = importlib.import_module(agent_file.stem)
        finally:
            sys.path.remove(str(agent_file.parent))
        agent_class = getattr(module, module.get_entry_point())
        agent = agent_class(self.server.host, self.server.port, 0)
        agent.set_global_plan(to_gps(route), route)
        agent.setup(str(agent_config))
        sensors = agent.sensors()
        validate_sensor_configuration(sensors, agent.track, self.track)
        try:
            for _ in range(ticks):
                snapshot = self.world.get_snapshot()
                input_data = {}
                for sensor in sensors:
                    if sensor["type"] == "sensor.speedometer":
                        t, v = self.hero.get_transform(), self.hero.get_velocity()
                        forward = t.get_forward_vector()
                        speed = v.x * forward.x + v.y * forward.y + v.z * forward.z
                        input_data[sensor["id"]] = (snapshot.frame, {"speed": speed})
                control = agent.run_step(input_data, snapshot.timestamp.elapsed_seconds)
                if not isinstance(control, carla.VehicleControl):
                    raise TypeError(f"run_step returned {type(control).__name__}, not carla.VehicleControl")
                control.manual_gear_shift = False  # AutonomousAgent.__call__ does this
                self.controls.append(control)
                self.hero.apply_control(control)
                self.world.tick()
        finally:
            agent.destroy()
        return agent


# -- the results file ---------------------------------------------------------------------------------
def route_record(route: int, rep: int, index: int, status: str, score_route: float, score_penalty: float,
                 infractions: dict | None = None, route_length: float = 1000.0, duration_game: float = 100.0,
                 duration_system: float = 150.0) -> dict:
    """One entry of `_checkpoint.records`, keys as RouteRecord.to_json() gives them (vars of the object)."""
    lists = {name: [] for name in INFRACTION_NAMES}
    lists.update(infractions or {})
    return {"index": index, "route_id": f"RouteScenario_{route}_rep{rep}", "status": status,
            "num_infractions": sum(len(v) for v in lists.values()), "infractions": lists,
            "scores": {"score_route": round(score_route, 6), "score_penalty": round(score_penalty, 6),
                       "score_composed": round(max(score_route * score_penalty, 0.0), 6)},
            "meta": {"route_length": route_length, "duration_game": duration_game,
                     "duration_system": duration_system}}


def results_json(records: list[dict], entry_status: str = "Finished", sensors=("carla_speedometer",)) -> dict:
    """A whole results file (Results.to_json() after compute_global_statistics)."""
    n = max(len(records), 1)
    means = {key: round(sum(r["scores"][key] for r in records) / n, 6)
             for key in ("score_composed", "score_route", "score_penalty")}
    km = max(sum(r["meta"]["route_length"] / 1000 * r["scores"]["score_route"] / 100 for r in records), 0.001)
    per_km = {name: round(sum(len(r["infractions"][name]) for r in records) / km, 3) for name in INFRACTION_NAMES}
    global_record = {"index": -1, "route_id": -1,
                     "status": "Failed" if any("Failed" in r["status"] for r in records) else "Completed",
                     "infractions": per_km, "scores_mean": means,
                     "scores_std_dev": {key: 0.0 for key in means},
                     "meta": {"total_length": sum(r["meta"]["route_length"] for r in records),
                              "duration_game": sum(r["meta"]["duration_game"] for r in records),
                              "duration_system": sum(r["meta"]["duration_system"] for r in records),
                              "exceptions": [[r["route_id"], r["index"], r["status"]] for r in records
                                             if "Failed" in r["status"]]}}
    values = [str(means["score_composed"]), str(means["score_route"]), str(means["score_penalty"])] + [
        str(per_km[name]) for name in ("collisions_pedestrian", "collisions_vehicle", "collisions_layout",
                                       "red_light", "stop_infraction", "outside_route_lanes", "route_dev",
                                       "route_timeout", "vehicle_blocked", "yield_emergency_vehicle_infractions",
                                       "scenario_timeouts", "min_speed_infractions")]
    return {"_checkpoint": {"global_record": global_record, "progress": [len(records), len(records)],
                            "records": records},
            "entry_status": entry_status, "eligible": entry_status == "Finished", "sensors": list(sensors),
            "values": values, "labels": list(GLOBAL_LABELS)}
