"""The CARLA backend: one Leaderboard 2.0 route on a CARLA 0.9.16 server, in synchronous mode.

Lifecycle. The client connects on the first `reset` (a server that does not answer raises
SimulatorError naming host:port). It records the world settings it found, switches the world to
synchronous mode with a fixed delta (and the Traffic Manager with it), and restores those settings
on `close`. Each `reset(seed)` destroys the previous episode's actors in one batch, loads the route's
town if another is loaded, sets the weather, spawns the ego (role_name "hero") at the route start,
its collision and lane-invasion sensors (and a chase camera when rendering), background vehicles
under Traffic Manager autopilot on spawn points near the route and walkers on the sidewalks beside
it, then ticks once. `step` applies a VehicleControl and ticks `ticks_per_step` times.

What the backend reports beyond the pose (the shared criteria in harness/criteria.py do the rest):

- collisions, typed by the other actor's type_id (walker / vehicle / anything else = static), and
  counted as the Leaderboard 2.0 CollisionTest does: a hit is ignored while the same actor was hit in
  the last COLLISION_MEMORY_S seconds, while the ego is within COLLISION_RADIUS_M of the last counted
  collision, or when the ego is (nearly) standing (the other party's fault);
- red lights: every traffic light's stop waypoints (`TrafficLight.get_stop_waypoints`) become stop
  lines, one lane wide and across the lane. The ego runs a red light when, between two ticks, the
  point at its rear bumper crosses a stop line from the approach side to the junction side while it
  heads the lane's way (within 90 degrees) and that light is red. A light counts once until another
  one is run (the Leaderboard checks the rear too: the car is committed once its tail passes the line);
- stop signs: a sign "affects" the ego while its centre, its front bumper or a point 2 m ahead of it
  lies in the sign's trigger volume (enlarged 1.2x, like RunningStopTest). Leaving that area without
  having gone below STOP_SPEED_MPS inside it is an infraction;
- outside route lanes (OutsideRouteLanesTest's two cases): the ego stands on no driving or parking
  lane, or, outside junctions, on a driving lane whose direction is opposite to the route's;
- the route timeout, as the Leaderboard 2.0 sets it (scenario_runner's RouteTimeoutBehavior):
  ROUTE_TIMEOUT_MIN_S to start with, growing by the time each metre advanced along the route takes at
  ROUTE_TIMEOUT_SPEED_PCT % of the lane's speed limit; a ROUTE_TIMEOUT event once the simulated time is
  past it (`route_timeout_s`). The env then applies no fixed timeout: the suite's `duration_s` is not used.

What is read off the world each step (ego, vehicles, walkers, the light ahead, outside the route's
lanes) is `WorldReader`, which agents/leaderboard_agent.py shares inside the official evaluator.

Not done: the route file's <scenarios> (the Leaderboard's scenario_runner scenarios such as
ParkedObstacle or YieldToEmergencyVehicle) are parsed but never spawned, so scenario timeouts and
yield-to-emergency-vehicle infractions never occur here; background traffic is the Traffic Manager's,
not the Leaderboard's BackgroundBehavior.

Times out and crashes: every RuntimeError from the client (a time-out, a lost connection, a failed
spawn) becomes SimulatorError; the runner then closes the env and retries on a new one. `reset`
after a failure reconnects on a fresh client first (`reconnect`).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from prunedrive.harness.action import Control
from prunedrive.harness.backends.base import BackendState, SimulatorError
from prunedrive.harness.backends.carla_routes import densify, load_route
from prunedrive.harness.events import Event, EventKind, StepEvents
from prunedrive.harness.observation import PEDESTRIAN_RANGE_M, VEHICLE_RANGE_M, EgoState, WorldObjects
from prunedrive.harness.route import RoutePolyline
from prunedrive.harness.route import project_points
from prunedrive.scenarios.loader import Scenario

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]

# The keys are scenarios.loader.BACKEND_OPTIONS["carla"] (a suite's options are checked against those when it
# loads; tests/test_import_limits.py checks the two agree).
DEFAULT_OPTIONS: dict[str, Any] = {
    "route_file": None,            # Leaderboard route XML: absolute, or relative to the repo (or cwd)
    "route_id": None,              # the <route id=...> to drive
    "host": "127.0.0.1",
    "port": 2000,
    "tm_port": 8000,
    "timeout_s": 60.0,             # client time-out for every call
    "load_timeout_s": 300.0,       # ... while loading a town (Town12/13 take minutes)
    "fixed_delta_s": 0.05,         # 20 Hz physics, as the Leaderboard
    "background_vehicles": None,   # default: scenario.vehicles
    "background_walkers": None,    # default: scenario.pedestrians
    "ego_blueprint": "vehicle.lincoln.mkz_2020",
    "camera_size": [640, 360],
    "no_rendering": None,          # default: on unless rendering (the camera needs the renderer)
}
PROBE_TIMEOUT_S = 10.0        # the one version call before a run
COLLISION_MEMORY_S = 5.0      # CollisionTest.MAX_ID_TIME
COLLISION_RADIUS_M = 5.0      # CollisionTest.COLLISION_RADIUS
COLLISION_MIN_SPEED = 0.1     # CollisionTest.EPSILON: a standing ego is not at fault
STOP_SPEED_MPS = 0.1          # RunningStopTest.SPEED_THRESHOLD
STOP_BOX_SCALE = 1.2          # RunningStopTest's trigger volume multiplier
LIGHT_CHECK_RADIUS_M = 25.0   # stop lines farther than this from the ego are not tested
TRAFFIC_LIGHT_RANGE_M = 50.0  # the observation reports a light this far ahead along the route
ROUTE_LIGHT_MATCH_M = 2.5     # a stop waypoint this close to the route belongs to it
BACKGROUND_RADIUS_M = 60.0    # background vehicles spawn this close to the route ...
EGO_CLEARANCE_M = 15.0        # ... and this far from the ego
ROUTE_TIMEOUT_MIN_S = 300.0   # RouteTimeoutBehavior.MIN_TIMEOUT (scenario_runner timer.py) ...
ROUTE_TIMEOUT_SPEED_PCT = 10  # ... plus each metre advanced at TIMEOUT_ROUTE_PERC % of the speed limit


def import_carla():
    try:
        import carla  # noqa: PLC0415 -- optional dependency, imported only when a CARLA suite runs
    except ImportError:
        raise ImportError("the CARLA backend needs the CARLA client: pip install prunedrive[carla] "
                          "(carla==0.9.16, Python 3.11 wheel) and a CARLA 0.9.16 server") from None
    return carla


def resolve_route_file(value: str | Path) -> Path:
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [REPO_ROOT / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(f"route file {str(value)!r} not found (looked at {', '.join(map(str, candidates))})")


class CarlaBackend:
    """Backend protocol on a CARLA server. See the module docstring.

    Options come from `scenario.options` (keys of DEFAULT_OPTIONS); keyword arguments (the CLI's
    --carla-host/--carla-port) override them. `api` is the `carla` module (tests pass a stand-in);
    `client_factory(host, port)` makes the client (default `api.Client`).
    """

    def __init__(self, scenario: Scenario, render: bool = False, host: str | None = None, port: int | None = None,
                 tm_port: int | None = None, timeout_s: float | None = None, client_factory=None, api=None,
                 **overrides):
        given = {k: v for k, v in dict(host=host, port=port, tm_port=tm_port, timeout_s=timeout_s).items()
                 if v is not None}
        options = {**scenario.options, **given, **overrides}
        unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
        if unknown:
            raise ValueError(f"scenario {scenario.name!r}: unknown CARLA option(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(DEFAULT_OPTIONS)}")
        self.options = {**DEFAULT_OPTIONS, **options}
        o = self.options
        for required in ("route_file", "route_id"):
            if o[required] is None:
                raise ValueError(f"scenario {scenario.name!r}: option {required!r} is required for kind carla_route")
        self.scenario, self.render_enabled = scenario, render
        self.route = load_route(resolve_route_file(o["route_file"]), o["route_id"])
        self.host, self.port, self.tm_port = str(o["host"]), int(o["port"]), int(o["tm_port"])
        self.timeout_s, self.fixed_delta = float(o["timeout_s"]), float(o["fixed_delta_s"])
        if not 0.0 < self.fixed_delta <= 0.1:
            raise ValueError(f"scenario {scenario.name!r}: fixed_delta_s must be in (0, 0.1], got {self.fixed_delta}")
        ticks = round(1.0 / (scenario.policy_hz * self.fixed_delta))
        if ticks < 1 or abs(ticks * self.fixed_delta * scenario.policy_hz - 1.0) > 1e-6:
            raise ValueError(f"scenario {scenario.name!r}: policy_hz {scenario.policy_hz:g} is not a whole number "
                             f"of {self.fixed_delta:g} s ticks")
        self.ticks_per_step = int(ticks)
        self.dt = self.ticks_per_step * self.fixed_delta
        default = {"background_vehicles": scenario.vehicles, "background_walkers": scenario.pedestrians}
        self.background_vehicles, self.background_walkers = (
            int(default[k] if o[k] is None else o[k]) for k in ("background_vehicles", "background_walkers"))
        self.no_rendering = (not render) if o["no_rendering"] is None else bool(o["no_rendering"])
        self.carla = api or import_carla()
        self._client_factory = client_factory or self.carla.Client
        self._client = self._world = self._tm = self._map = None
        self._original_settings = None
        self._dead = False  # the last call timed out: reconnect before the next episode
        self._town_cache: dict[str, dict] = {}  # town -> densified route (pure geometry, survives reconnects)
        self._polyline: np.ndarray | None = None
        self._statics: dict | None = None        # traffic lights and stop signs of the loaded world
        self._ego = None
        self._sensors: list = []
        self._controllers: list = []
        self._episode_ids: list[int] = []
        self._frame = None
        self._collisions: deque = deque()

    # -- connection ------------------------------------------------------------------------------
    @classmethod
    def probe(cls, scenario: Scenario, timeout_s: float = PROBE_TIMEOUT_S, client_factory=None, api=None,
              host: str | None = None, port: int | None = None, **_) -> None:
        """Ask the server for its version once, with a short time-out, before a run drives anything: a
        server that is not there fails the run in seconds, naming host:port, instead of costing every
        route its retries of `timeout_s` each."""
        options = {**DEFAULT_OPTIONS, **scenario.options, **{k: v for k, v in (("host", host), ("port", port))
                                                               if v is not None}}
        carla = api or import_carla()
        address = f"{options['host']}:{options['port']}"
        try:
            client = (client_factory or carla.Client)(str(options["host"]), int(options["port"]))
            client.set_timeout(timeout_s)
            version = client.get_server_version()
        except RuntimeError as exc:
            raise SimulatorError(f"no CARLA server answered at {address} within {timeout_s:g} s ({exc}); "
                                 "start one (./CarlaUE4.sh -RenderOffScreen -carla-rpc-port=PORT) or pass "
                                 "--carla-host/--carla-port") from None
        logging.getLogger(__name__).info("CARLA server %s at %s", version, address)

    def _connect(self) -> None:
        client = self._client_factory(self.host, self.port)
        client.set_timeout(self.timeout_s)
        world = client.get_world()  # the first call that needs the server
        if self._original_settings is None:
            self._original_settings = world.get_settings()
        self._client, self._world, self._tm = client, world, client.get_trafficmanager(self.tm_port)
        self._map = self._statics = None
        self._dead = False

    def reconnect(self) -> None:
        """Drop the current client and connect a fresh one; the last episode's actors are destroyed by id.
        `reset` does this by itself after a time-out."""
        self._call(self._reconnect)

    def _reconnect(self) -> None:
        self._client = self._world = self._tm = self._map = self._statics = None
        self._ego, self._sensors, self._controllers = None, [], []
        self._connect()
        self._destroy_episode()

    def _call(self, fn, *args):
        """Run `fn`; any client error becomes SimulatorError (and the next reset reconnects)."""
        try:
            return fn(*args)
        except SimulatorError:
            raise
        except RuntimeError as exc:
            text = str(exc)
            self._dead = "time-out" in text or "timeout" in text.lower()
            if self._dead:
                message = (f"CARLA server at {self.host}:{self.port} did not answer ({text}); is the simulator "
                           f"running there? (set --carla-host/--carla-port or the suite's host/port options)")
            else:
                message = f"CARLA server at {self.host}:{self.port}: {text}"
            raise SimulatorError(message) from exc

    # -- Backend protocol ------------------------------------------------------------------------
    def reset(self, seed: int) -> BackendState:
        return self._call(self._reset, int(seed))

    def step(self, control: Control) -> tuple[BackendState, StepEvents]:
        if self._ego is None:
            raise RuntimeError("call reset() before step()")
        return self._call(self._step, control)

    def step_ticks(self, controls: list[Control]) -> tuple[BackendState, StepEvents]:
        """One policy step with a control per 20 Hz tick (harness.latency); equal controls are exactly `step`."""
        if self._ego is None:
            raise RuntimeError("call reset() before step_ticks()")
        if len(controls) != self.ticks_per_step:
            raise ValueError(f"step_ticks needs {self.ticks_per_step} controls (one per tick), got {len(controls)}")
        return self._call(self._step, controls[0], controls)

    def route_polyline(self) -> np.ndarray:
        if self._polyline is None:
            raise RuntimeError("call reset() before route_polyline()")
        return self._polyline.copy()

    def render(self) -> np.ndarray | None:
        return None if self._frame is None else self._frame.copy()

    def close(self) -> None:
        """Destroy the episode's actors and restore the world settings; never raises."""
        if self._client is None:
            return
        try:
            if self._dead:  # the server may be gone: a short attempt to clean up, then give up
                self._client.set_timeout(min(self.timeout_s, 5.0))
            self._destroy_episode()
            self._tm.set_synchronous_mode(False)
            if self._original_settings is not None:
                self._world.apply_settings(self._original_settings)
        except RuntimeError as exc:
            log.warning("closing the CARLA backend (%s:%s) failed: %s", self.host, self.port, exc)
        finally:
            self._client = self._world = self._tm = self._map = self._statics = None
            self._ego, self._sensors, self._controllers = None, [], []

    # -- episode ---------------------------------------------------------------------------------
    def _reset(self, seed: int) -> BackendState:
        if self._client is None or self._dead:
            self._reconnect()
        self._destroy_episode()
        self._prepare_world()
        carla, world = self.carla, self._world
        self._rng = np.random.default_rng(seed)
        self._tm.set_random_device_seed(seed)
        world.set_pedestrians_seed(seed)
        self._weather_percent = -1
        self._update_weather(0.0)
        self._spawn_ego()
        self._spawn_background()
        world.tick(self.timeout_s)
        self._steps, self._control = 0, Control()
        self._reader = WorldReader(carla, world, self._map, self._path, self._statics, self._ego,
                                   self.scenario.speed_limit_mps)
        self._timeout_s, self._timeout_arc, self._timed_out = ROUTE_TIMEOUT_MIN_S, 0.0, False
        self._collisions.clear()  # contacts while spawning are nobody's infraction
        self._last_hit = (None, -math.inf, None)  # other actor id, time, ego location of the last counted hit
        self._last_red, self._stop_target, self._stop_done = None, None, False
        self._rear = self._rear_point(self._ego.get_transform())
        return self._read_state()

    def _prepare_world(self) -> None:
        carla, client = self.carla, self._client
        if self._map is None:
            self._map = self._world.get_map()
        if self._map.name.split("/")[-1] != self.route.town:
            client.set_timeout(float(self.options["load_timeout_s"]))
            self._world = client.load_world(self.route.town, False)  # keep synchronous mode across the load
            client.set_timeout(self.timeout_s)
            self._map, self._statics = self._world.get_map(), None
        settings = self._world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = self.fixed_delta
        settings.no_rendering_mode = self.no_rendering
        self._world.apply_settings(settings)
        self._tm.set_synchronous_mode(True)
        if self.route.town not in self._town_cache:
            polyline = np.array([(x, y) for x, y, _ in densify(self._map, self.route.waypoints, api=carla)])
            self._town_cache[self.route.town] = {"polyline": polyline, "path": RoutePolyline(polyline)}
        self._polyline = self._town_cache[self.route.town]["polyline"]
        self._path = self._town_cache[self.route.town]["path"]
        if self._statics is None:
            self._statics = read_statics(self._world, self._path)

    def _spawn_ego(self) -> None:
        carla, world = self.carla, self._world
        x, y, z = self.route.waypoints[0]
        start = self._map.get_waypoint(carla.Location(x=x, y=y, z=z)).transform
        where = carla.Transform(carla.Location(x=start.location.x, y=start.location.y, z=start.location.z + 0.5),
                                carla.Rotation(pitch=0.0, yaw=start.rotation.yaw, roll=0.0))
        library = world.get_blueprint_library()
        bp = library.find(self.options["ego_blueprint"])
        bp.set_attribute("role_name", "hero")
        self._ego = world.spawn_actor(bp, where)
        self._episode_ids.append(self._ego.id)
        extent = self._ego.bounding_box.extent
        self._half_length = float(extent.x)
        self._attach("sensor.other.collision", carla.Transform(), self._on_collision)
        self._frame = None
        if self.render_enabled:
            width, height = (int(v) for v in self.options["camera_size"])
            chase = carla.Transform(carla.Location(x=-6.0, y=0.0, z=3.0),
                                    carla.Rotation(pitch=-15.0, yaw=0.0, roll=0.0))
            self._attach("sensor.camera.rgb", chase, self._on_image,
                         image_size_x=str(width), image_size_y=str(height), fov="90")

    def _attach(self, blueprint_id: str, where, callback, **attributes) -> None:
        bp = self._world.get_blueprint_library().find(blueprint_id)
        for key, value in attributes.items():
            bp.set_attribute(key, value)
        sensor = self._world.spawn_actor(bp, where, attach_to=self._ego)
        self._episode_ids.append(sensor.id)
        self._sensors.append(sensor)
        sensor.listen(callback)

    def _spawn_background(self) -> None:
        route = self._path.points[::4]  # a point every 10 m is enough to find what is near the route
        if self.background_vehicles > 0:
            self._spawn_vehicles(route)
        if self.background_walkers > 0:
            self._spawn_walkers(route)

    def _spawn_vehicles(self, route: np.ndarray) -> None:
        """Four-wheeled vehicles under Traffic Manager autopilot, on spawn points near the route: a big
        town's spawn points are mostly kilometres away, where traffic would never meet the ego."""
        rng, command = self._rng, self.carla.command
        cars = [bp for bp in self._world.get_blueprint_library().filter("vehicle.*")
                if not bp.has_attribute("number_of_wheels") or bp.get_attribute("number_of_wheels").as_int() == 4]
        points = list(self._map.get_spawn_points())
        if not cars or not points:
            return
        xy = np.array([(p.location.x, p.location.y) for p in points])
        near = np.flatnonzero((_min_distance(xy, route) < BACKGROUND_RADIUS_M)
                              & (np.hypot(*(xy - route[0]).T) > EGO_CLEARANCE_M))
        batch = []
        for k in rng.permutation(near)[: self.background_vehicles]:
            bp = cars[int(rng.integers(len(cars)))]
            if bp.has_attribute("role_name"):
                bp.set_attribute("role_name", "autopilot")
            autopilot = command.SetAutopilot(command.FutureActor, True, self.tm_port)
            batch.append(command.SpawnActor(bp, points[k]).then(autopilot))
        if batch:
            self._episode_ids += [r.actor_id for r in self._client.apply_batch_sync(batch, False) if not r.has_error()]

    def _spawn_walkers(self, route: np.ndarray) -> None:
        """Walkers on the sidewalks beside the route, each walking to a sidewalk point beside another
        part of it under an AI controller."""
        carla, rng, command, world = self.carla, self._rng, self.carla.command, self._world
        library = world.get_blueprint_library()
        kinds = list(library.filter("walker.pedestrian.*"))
        batch, goals = [], []
        for _ in range(self.background_walkers):
            here, there = (self._sidewalk_near(route[int(rng.integers(len(route)))]) for _ in range(2))
            if here is None or there is None or not kinds:
                continue
            bp = kinds[int(rng.integers(len(kinds)))]
            if bp.has_attribute("is_invincible"):
                bp.set_attribute("is_invincible", "false")
            batch.append(command.SpawnActor(bp, carla.Transform(here, carla.Rotation(pitch=0.0, yaw=0.0, roll=0.0))))
            goals.append(there)
        spawned = [(r.actor_id, goal) for r, goal in zip(self._client.apply_batch_sync(batch, False) if batch else [],
                                                           goals) if not r.has_error()]
        if not spawned:
            return
        self._episode_ids += [walker for walker, _ in spawned]
        controller_bp = library.find("controller.ai.walker")
        responses = self._client.apply_batch_sync(
            [command.SpawnActor(controller_bp, carla.Transform(), walker) for walker, _ in spawned], False)
        self._episode_ids += [r.actor_id for r in responses if not r.has_error()]
        world.tick(self.timeout_s)  # controllers must exist on the server before they start
        controllers = {a.id: a for a in world.get_actors([r.actor_id for r in responses if not r.has_error()])}
        for response, (_, goal) in zip(responses, spawned):
            controller = controllers.get(response.actor_id) if not response.has_error() else None
            if controller is not None:
                controller.start()
                controller.go_to_location(goal)
                controller.set_max_speed(float(rng.uniform(1.0, 1.6)))
                self._controllers.append(controller)

    def _sidewalk_near(self, xy):
        carla = self.carla
        wp = self._map.get_waypoint(carla.Location(x=float(xy[0]), y=float(xy[1]), z=0.0), True,
                                    carla.LaneType.Sidewalk)
        if wp is None:
            return None
        loc = wp.transform.location
        return carla.Location(x=loc.x, y=loc.y, z=loc.z + 1.0)

    def _destroy_episode(self) -> None:
        """Stop sensors and walker controllers, then destroy every actor of the episode in one batch."""
        for actor in self._sensors + self._controllers:
            try:
                actor.stop()
            except RuntimeError:  # already gone with a reloaded world: nothing to stop
                pass
        if self._episode_ids:
            DestroyActor = self.carla.command.DestroyActor
            self._client.apply_batch_sync([DestroyActor(i) for i in self._episode_ids], False)
        self._episode_ids, self._sensors, self._controllers, self._ego = [], [], [], None

    # -- stepping --------------------------------------------------------------------------------
    def _step(self, control: Control, tick_controls: list[Control] | None = None) -> tuple[BackendState, StepEvents]:
        carla = self.carla
        self._steps += 1
        tick_controls = tick_controls or [control] * self.ticks_per_step
        events: list[Event] = []
        for i, tick_control in enumerate(tick_controls):
            if i == 0 or tick_control != tick_controls[i - 1]:  # CARLA holds an applied control until the next
                self._control = tick_control
                self._ego.apply_control(carla.VehicleControl(
                    throttle=float(tick_control.throttle), steer=float(tick_control.steer),
                    brake=float(tick_control.brake)))
            self._world.tick(self.timeout_s)
            events += self._watch_tick()
        state = self._read_state()
        events = self._collision_events() + events + self._timeout(state)
        self._update_weather(100.0 * self._arc / max(self._path.length, 1e-9))
        return state, StepEvents(events=events)

    def _rear_point(self, transform) -> np.ndarray:
        yaw = math.radians(transform.rotation.yaw)
        return np.array([transform.location.x - self._half_length * math.cos(yaw),
                         transform.location.y - self._half_length * math.sin(yaw)])

    def _watch_tick(self) -> list[Event]:
        """Red lights and stop signs, checked on every tick (cheap: the client caches actor state)."""
        transform, velocity = self._ego.get_transform(), self._ego.get_velocity()
        yaw = math.radians(transform.rotation.yaw)
        x, y = transform.location.x, transform.location.y
        rear = self._rear_point(transform)
        events = self._red_light(self._rear, rear, yaw)
        self._rear = rear
        return events + self._stop_sign(x, y, yaw, math.hypot(velocity.x, velocity.y))

    def _red_light(self, a: np.ndarray, b: np.ndarray, yaw: float) -> list[Event]:
        stops = self._statics["stops"]
        if not len(stops):
            return []
        near = np.flatnonzero(np.hypot(stops[:, 0] - b[0], stops[:, 1] - b[1]) < LIGHT_CHECK_RADIUS_M)
        for k in near:
            px, py, fx, fy, half_width, light_index = stops[k]
            if math.cos(yaw) * fx + math.sin(yaw) * fy <= 0.0:  # not heading the lane's way
                continue
            sa, sb = (a[0] - px) * fx + (a[1] - py) * fy, (b[0] - px) * fx + (b[1] - py) * fy
            if not sa < 0.0 <= sb:
                continue
            t = sa / (sa - sb)
            cx, cy = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
            if abs(-(cx - px) * fy + (cy - py) * fx) > half_width:
                continue
            light = self._statics["lights"][int(light_index)]
            if light.id != self._last_red and light.state == self.carla.TrafficLightState.Red:
                self._last_red = light.id
                return [Event(EventKind.RED_LIGHT, self._steps, detail=f"ran red light {light.id} at "
                                                                       f"({px:.1f}, {py:.1f})")]
        return []

    def _stop_sign(self, x: float, y: float, yaw: float, speed: float) -> list[Event]:
        ahead = np.array([0.0, self._half_length, self._half_length + 2.0])
        points = np.stack((x + ahead * math.cos(yaw), y + ahead * math.sin(yaw)), axis=1)
        affecting = None
        for sign_id, cx, cy, syaw, ex, ey in self._statics["signs"]:
            if math.hypot(cx - x, cy - y) > 30.0:
                continue
            dx, dy = points[:, 0] - cx, points[:, 1] - cy
            along, across = dx * math.cos(syaw) + dy * math.sin(syaw), -dx * math.sin(syaw) + dy * math.cos(syaw)
            if ((np.abs(along) <= ex) & (np.abs(across) <= ey)).any():
                affecting = sign_id
                break
        events = []
        if affecting != self._stop_target:
            if self._stop_target is not None and not self._stop_done:
                events.append(Event(EventKind.STOP_SIGN, self._steps,
                                    detail=f"did not stop at stop sign {self._stop_target}"))
            self._stop_target, self._stop_done = affecting, False
        if self._stop_target is not None and speed < STOP_SPEED_MPS:
            self._stop_done = True
        return events

    # -- sensors (their callbacks run on the client's thread: only record) ----------------------
    def _on_collision(self, event) -> None:
        other, where = event.other_actor, event.transform.location
        velocity = self._ego.get_velocity() if self._ego is not None else None
        speed = math.hypot(velocity.x, velocity.y) if velocity is not None else 0.0
        self._collisions.append((float(event.timestamp), int(other.id), str(other.type_id), where.x, where.y, speed))

    def _on_image(self, image) -> None:
        pixels = np.frombuffer(image.raw_data, np.uint8).reshape(image.height, image.width, 4)
        self._frame = pixels[:, :, 2::-1].copy()  # BGRA -> RGB

    def _collision_events(self) -> list[Event]:
        events = []
        while self._collisions:
            time, other_id, type_id, x, y, speed = self._collisions.popleft()
            last_id, last_time, last_xy = self._last_hit
            if other_id == last_id and time - last_time <= COLLISION_MEMORY_S:
                continue
            if last_xy is not None and math.hypot(x - last_xy[0], y - last_xy[1]) <= COLLISION_RADIUS_M:
                continue
            if speed < COLLISION_MIN_SPEED:
                continue
            self._last_hit = (other_id, time, (x, y))
            if "walker" in type_id:
                kind = EventKind.COLLISION_PEDESTRIAN
            elif "vehicle" in type_id:
                kind = EventKind.COLLISION_VEHICLE
            else:
                kind = EventKind.COLLISION_STATIC
            events.append(Event(kind, self._steps, detail=f"hit {type_id} (id {other_id}) at {speed:.1f} m/s"))
        return events

    # -- state -----------------------------------------------------------------------------------
    def _read_state(self) -> BackendState:
        state = self._reader.read(self._control, self._steps * self.dt)
        self._forget_far_hit(state.ego.x, state.ego.y)
        self._arc = self._reader.arc
        return state

    def _forget_far_hit(self, x: float, y: float) -> None:
        other_id, time, xy = self._last_hit
        if xy is not None and math.hypot(x - xy[0], y - xy[1]) > COLLISION_RADIUS_M:
            self._last_hit = (other_id, time, None)

    @property
    def route_timeout_s(self) -> float:
        """The Leaderboard's route timeout as it stands now (it grows as the ego advances); see `_timeout`."""
        return self._timeout_s

    def _timeout(self, state: BackendState) -> list[Event]:
        """The Leaderboard 2.0 route timeout (scenario_runner's RouteTimeoutBehavior): ROUTE_TIMEOUT_MIN_S to
        start with, plus, for each metre the ego advances along the route, the time that metre takes at
        ROUTE_TIMEOUT_SPEED_PCT % of the lane's speed limit; the route times out once the simulated time
        exceeds it."""
        if self._arc > self._timeout_arc:
            speed = state.ego.speed_limit * ROUTE_TIMEOUT_SPEED_PCT / 100.0
            self._timeout_s += (self._arc - self._timeout_arc) / max(speed, 1e-3)
            self._timeout_arc = self._arc
        if self._timed_out or state.sim_time_s <= self._timeout_s:
            return []
        self._timed_out = True
        return [Event(EventKind.ROUTE_TIMEOUT, self._steps,
                      detail=f"route not finished in {self._timeout_s:.0f} s (Leaderboard route timeout)")]

    def _update_weather(self, percentage: float) -> None:
        """Apply the route's weather at each whole percent of progress (RouteWeatherBehavior)."""
        whole = int(min(max(percentage, 0.0), 100.0))
        if whole == self._weather_percent:
            return
        self._weather_percent = whole
        weather = self.carla.WeatherParameters()
        for name, value in self.route.weather_at(whole).items():
            if hasattr(weather, name):
                setattr(weather, name, value)
        self._world.set_weather(weather)


def read_statics(world, path: RoutePolyline) -> dict:
    """Stop lines of every traffic light, which of them lie on the route `path`, and stop-sign areas: what
    the world holds that never moves (read once per loaded world)."""
    actors = world.get_actors()
    lights = list(actors.filter("traffic.traffic_light*"))
    rows = []  # x, y, forward x, forward y, half width, light index
    for k, light in enumerate(lights):
        for wp in light.get_stop_waypoints():
            t = wp.transform
            yaw = math.radians(t.rotation.yaw)
            rows.append((t.location.x, t.location.y, math.cos(yaw), math.sin(yaw), wp.lane_width / 2, k))
    stops = np.array(rows, float).reshape(-1, 6)
    on_route, arcs = np.zeros(0, int), np.zeros(0)
    near = np.flatnonzero(_min_distance(stops[:, :2], path.points) < ROUTE_LIGHT_MATCH_M + 2.0)
    if len(near):  # project only the stop lines near the route: big towns have thousands
        distance, arc = project_points(stops[near, :2], path.points)
        seg = np.clip(np.searchsorted(path.arc, arc) - 1, 0, len(path.headings) - 1)
        same_way = np.cos(path.headings[seg]) * stops[near, 2] + np.sin(path.headings[seg]) * stops[near, 3] > 0.5
        keep = (distance < ROUTE_LIGHT_MATCH_M) & same_way
        order = np.argsort(arc[keep])
        on_route, arcs = near[keep][order], arc[keep][order]
    signs = []
    for sign in actors.filter("traffic.stop*"):
        t, volume = sign.get_transform(), sign.trigger_volume
        c = t.transform(volume.location)
        yaw = math.radians(t.rotation.yaw + volume.rotation.yaw)
        signs.append((sign.id, c.x, c.y, yaw, volume.extent.x * STOP_BOX_SCALE, volume.extent.y * STOP_BOX_SCALE))
    return {"lights": lights, "light_index": {l.id: k for k, l in enumerate(lights)}, "stops": stops,
            "route_stops": on_route, "route_stop_arcs": arcs, "signs": signs}

class WorldReader:
    """The ego and the objects around it, read off a CARLA world in one snapshot per call: the state
    (BackendState) that the backend's env observes and that the Leaderboard adapter
    (agents/leaderboard_agent.py) turns into the same observation inside the official evaluator.

    `api` is the `carla` module, `path` the route (harness.route.RoutePolyline), `statics` what `read_statics`
    found for that world and route, `ego` the hero vehicle; `default_speed_limit` (m/s) is used where the
    lane reports none. `segment` and `arc` are the ego's projection on the route after the last `read`.
    """

    def __init__(self, api, world, world_map, path: RoutePolyline, statics: dict, ego, default_speed_limit: float):
        self.carla, self.world, self.map, self.path, self.statics = api, world, world_map, path, statics
        self.ego, self.default_speed_limit = ego, float(default_speed_limit)
        self.segment, self.arc = 0, 0.0
        self._kinds: dict[int, tuple] = {}  # actor id -> (vehicle / walker / None, length, width)

    def read(self, control: Control, sim_time_s: float) -> BackendState:
        """World-frame ego state (with the last applied `control`), vehicles and walkers in range, the
        light ahead on the route, and whether the ego is outside the route's lanes."""
        snapshot = self.world.get_snapshot()
        ego = snapshot.find(self.ego.id)
        t, v, acc = ego.get_transform(), ego.get_velocity(), ego.get_acceleration()
        yaw = math.radians(t.rotation.yaw)
        x, y = t.location.x, t.location.y
        speed = math.hypot(v.x, v.y)
        self.segment, self.arc, _ = self.path.project(np.array((x, y)), self.segment)
        limit = float(self.ego.get_speed_limit()) / 3.6  # km/h
        ego_state = EgoState(x=x, y=y, yaw=yaw, speed=speed, accel=acc.x * math.cos(yaw) + acc.y * math.sin(yaw),
                             speed_limit=limit if limit > 0.5 else self.default_speed_limit,
                             throttle=control.throttle, brake=control.brake, steer=control.steer)
        vehicles, walkers = self._others(snapshot, x, y)
        objects = WorldObjects(vehicles=vehicles, pedestrians=walkers, traffic_light=self._light_ahead(x, y))
        return BackendState(ego=ego_state, objects=objects, outside_route_lanes=self._outside_lanes(t),
                            sim_time_s=sim_time_s)

    def _others(self, snapshot, x: float, y: float) -> tuple[np.ndarray, np.ndarray]:
        """Vehicles and walkers in range, from one snapshot; what each actor is gets asked once."""
        kinds = self._kinds
        unknown = [s.id for s in snapshot if s.id not in kinds]
        if unknown:
            for actor in self.world.get_actors(unknown):
                e = actor.bounding_box.extent
                kind = "vehicle" if actor.type_id.startswith("vehicle.") else \
                       "walker" if actor.type_id.startswith("walker.") else None
                kinds[actor.id] = (kind, 2 * float(e.x), 2 * float(e.y))
            for actor_id in unknown:
                kinds.setdefault(actor_id, (None, 0.0, 0.0))
        vehicles, walkers = [], []
        for s in snapshot:
            kind, length, width = kinds[s.id]
            if kind is None or s.id == self.ego.id:
                continue
            t, v = s.get_transform(), s.get_velocity()
            reach = VEHICLE_RANGE_M if kind == "vehicle" else PEDESTRIAN_RANGE_M
            if math.hypot(t.location.x - x, t.location.y - y) > reach:
                continue
            if kind == "vehicle":
                vehicles.append((t.location.x, t.location.y, v.x, v.y, math.radians(t.rotation.yaw), length, width))
            else:
                walkers.append((t.location.x, t.location.y, v.x, v.y))
        return np.array(vehicles, float).reshape(-1, 7), np.array(walkers, float).reshape(-1, 4)

    def _light_ahead(self, x: float, y: float) -> tuple[int, float] | None:
        """The next light on the route within TRAFFIC_LIGHT_RANGE_M, else the one the ego is in the
        trigger volume of (`Vehicle.get_traffic_light`): (state index, metres to its stop line)."""
        statics = self.statics
        arcs = statics["route_stop_arcs"]
        k = int(np.searchsorted(arcs, self.arc - 0.5))
        light = distance = None
        if k < len(arcs) and arcs[k] - self.arc <= TRAFFIC_LIGHT_RANGE_M:
            row = statics["stops"][statics["route_stops"][k]]
            light, distance = statics["lights"][int(row[5])], max(float(arcs[k] - self.arc), 0.0)
        else:
            light = self.ego.get_traffic_light()
            if light is not None:
                stops = statics["stops"]
                mine = stops[stops[:, 5] == statics["light_index"].get(light.id, -1)]
                distance = float(np.hypot(mine[:, 0] - x, mine[:, 1] - y).min()) if len(mine) else 0.0
        if light is None:
            return None
        states = self.carla.TrafficLightState
        state = {states.Green: 0, states.Yellow: 1, states.Red: 2}.get(light.state)  # Off, Unknown: no light
        return None if state is None else (state, distance)

    def _outside_lanes(self, transform) -> bool:
        carla = self.carla
        location = carla.Location(x=transform.location.x, y=transform.location.y, z=transform.location.z)
        wp = self.map.get_waypoint(location, False, carla.LaneType.Any)
        inside = int(carla.LaneType.Driving) | int(carla.LaneType.Parking)
        if wp is None or not int(wp.lane_type) & inside:
            return True
        if wp.is_junction or not int(wp.lane_type) & int(carla.LaneType.Driving):
            return False
        route_heading = self.path.headings[min(self.segment, len(self.path.headings) - 1)]
        lane_heading = math.radians(wp.transform.rotation.yaw)
        return math.cos(lane_heading - route_heading) < 0.0  # a lane of the opposite direction


def _min_distance(points: np.ndarray, path: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Distance from each point to the nearest path vertex, in chunks (big towns have many points)."""
    out = np.empty(len(points))
    for i in range(0, len(points), chunk):
        p = points[i:i + chunk]
        out[i:i + chunk] = np.hypot(p[:, None, 0] - path[None, :, 0], p[:, None, 1] - path[None, :, 1]).min(axis=1)
    return out
