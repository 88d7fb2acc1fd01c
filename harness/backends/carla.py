"""The CARLA backend: one Leaderboard 2.0 route on a CARLA 0.9.16 server, in synchronous mode.

Lifecycle. The client connects on the first `reset` and switches the world to synchronous mode with a
fixed delta, restoring the settings it found on `close` (carla_connection.py). Each `reset(seed)` destroys
the previous episode's actors in one batch, loads the route's town if another is loaded, sets the weather,
spawns the ego, its sensors and the background traffic (carla_spawn.py), then ticks once. `step` applies a
VehicleControl and ticks `ticks_per_step` times.

The backend composes what the other carla_* modules hold, one idea each:
  carla_connection.py   the client, time-outs and errors, synchronous mode, the town; the probe before a run
  carla_spawn.py        the episode's actors: ego, sensors, background vehicles and walkers
  carla_infractions.py  collisions, red lights, stop signs and the route timeout, as Leaderboard 2.0 counts them
  carla_world.py        what is read off the world: stop lines and signs, the state each step (`WorldReader`,
                        shared with agents/leaderboard_agent.py inside the official evaluator), the weather
  carla_route_xml.py    the Leaderboard route files; carla_route_planner.py joins their key points lane by lane
What the backend reports beyond the pose is those detectors' events; the shared criteria in
harness/criteria.py do the rest. With the Leaderboard's route timeout the env applies no fixed timeout: the
suite's `duration_s` is not used.

Not done: the route file's <scenarios> (the Leaderboard's scenario_runner scenarios such as
ParkedObstacle or YieldToEmergencyVehicle) are parsed but never spawned, so scenario timeouts and
yield-to-emergency-vehicle infractions never occur here; background traffic is the Traffic Manager's,
not the Leaderboard's BackgroundBehavior.

Times out and crashes: every RuntimeError from the client becomes SimulatorError; the runner then closes
the env and retries on a new one. `reset` after a failure reconnects on a fresh client first (`reconnect`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from prunedrive.harness.action import Control
from prunedrive.harness.backends.base import BackendState, ServerOptions
from prunedrive.harness.backends.carla_connection import PROBE_TIMEOUT_S, CarlaConnection, import_carla, probe_server
from prunedrive.harness.backends.carla_infractions import CollisionTest, RedLightTest, RouteTimeout, StopSignTest
from prunedrive.harness.backends.carla_route_planner import densify
from prunedrive.harness.backends.carla_route_xml import load_route
from prunedrive.harness.backends.carla_spawn import EpisodeActors
from prunedrive.harness.backends.carla_world import RouteWeather, WorldReader, read_statics
from prunedrive.harness.events import Event, StepEvents
from prunedrive.harness.route import RoutePolyline
from prunedrive.scenarios.loader import Scenario

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]

# Its keys are what CarlaBackend.OPTIONS declares (a suite's options are checked against those before it runs).
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

    # What it declares (base.Backend): its kind, its scenario options, its server flags (--carla-host/-port/-servers).
    KINDS = ("carla_route",)
    OPTIONS = tuple(DEFAULT_OPTIONS)
    SERVER = ServerOptions("carla", "CARLA")

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
        self.connection = CarlaConnection(self.carla, self.host, self.port, self.tm_port, self.timeout_s,
                                          client_factory)
        self.actors = EpisodeActors(self.connection)
        self._town_cache: dict[str, dict] = {}  # town -> densified route (pure geometry, survives reconnects)
        self._polyline: np.ndarray | None = None
        self._statics: dict | None = None        # traffic lights and stop signs of the loaded world
        self._route_timeout: RouteTimeout | None = None  # the episode's detectors and weather: made by reset

    # -- connection ------------------------------------------------------------------------------
    @classmethod
    def probe(cls, scenario: Scenario, timeout_s: float = PROBE_TIMEOUT_S, client_factory=None, api=None,
              host: str | None = None, port: int | None = None, **_) -> None:
        """Ask the server for its version once, with a short time-out, before a run drives anything
        (carla_connection.probe_server)."""
        options = {**DEFAULT_OPTIONS, **scenario.options, **{k: v for k, v in (("host", host), ("port", port))
                                                               if v is not None}}
        probe_server(options["host"], options["port"], timeout_s, client_factory, api)

    def reconnect(self) -> None:
        """Drop the current client and connect a fresh one; the last episode's actors are destroyed by id.
        `reset` does this by itself after a time-out."""
        self.connection.call(self._reconnect)

    def _reconnect(self) -> None:
        self._forget_connection()
        self.connection.connect()
        self.actors.destroy()

    def _forget_connection(self) -> None:
        self.connection.drop()
        self._statics = None
        self.actors.forget_handles()

    # -- Backend protocol ------------------------------------------------------------------------
    def reset(self, seed: int) -> BackendState:
        return self.connection.call(self._reset, int(seed))

    def step(self, control: Control) -> tuple[BackendState, StepEvents]:
        if self.actors.ego is None:
            raise RuntimeError("call reset() before step()")
        return self.connection.call(self._step, control)

    def step_ticks(self, controls: list[Control]) -> tuple[BackendState, StepEvents]:
        """One policy step with a control per 20 Hz tick (harness.latency); equal controls are exactly `step`."""
        if self.actors.ego is None:
            raise RuntimeError("call reset() before step_ticks()")
        if len(controls) != self.ticks_per_step:
            raise ValueError(f"step_ticks needs {self.ticks_per_step} controls (one per tick), got {len(controls)}")
        return self.connection.call(self._step, controls[0], controls)

    def route_polyline(self) -> np.ndarray:
        if self._polyline is None:
            raise RuntimeError("call reset() before route_polyline()")
        return self._polyline.copy()

    def render(self) -> np.ndarray | None:
        frame = self.actors.frame
        return None if frame is None else frame.copy()

    def close(self) -> None:
        """Destroy the episode's actors and restore the world settings; never raises."""
        connection = self.connection
        if connection.client is None:
            return
        try:
            connection.shorten_timeout_if_dead()
            self.actors.destroy()
            connection.restore()
        except RuntimeError as exc:
            log.warning("closing the CARLA backend (%s:%s) failed: %s", self.host, self.port, exc)
        finally:
            self._forget_connection()

    @property
    def route_timeout_s(self) -> float:
        """The Leaderboard's route timeout as it stands now (it grows as the ego advances; RouteTimeout)."""
        return self._route_timeout.timeout_s

    # -- episode ---------------------------------------------------------------------------------
    def _reset(self, seed: int) -> BackendState:
        connection = self.connection
        if connection.client is None or connection.dead:
            self._reconnect()
        self.actors.destroy()
        self._prepare_world()
        world = connection.world
        rng = np.random.default_rng(seed)
        connection.tm.set_random_device_seed(seed)
        world.set_pedestrians_seed(seed)
        self._weather = RouteWeather(self.carla, self.route)
        self._weather.update(world, 0.0)
        camera = self.options["camera_size"] if self.render_enabled else None
        self.actors.spawn_ego(self.route.waypoints[0], self.options["ego_blueprint"], camera)
        self.actors.spawn_background(self._path.points, self.background_vehicles, self.background_walkers, rng,
                                     self.timeout_s)
        world.tick(self.timeout_s)
        self._steps, self._control = 0, Control()
        ego, half_length = self.actors.ego, self.actors.half_length
        self._reader = WorldReader(self.carla, world, connection.map, self._path, self._statics, ego,
                                   self.scenario.speed_limit_mps)
        self._route_timeout = RouteTimeout()
        self.actors.contacts.clear()  # contacts while spawning are nobody's infraction
        self._collisions = CollisionTest()
        self._red_lights = RedLightTest(self._statics, self.carla.TrafficLightState.Red, half_length,
                                        ego.get_transform())
        self._stop_signs = StopSignTest(self._statics, half_length)
        return self._read_state()

    def _prepare_world(self) -> None:
        """The route's town loaded in synchronous mode, the route densified on its map (once per town) and
        what never moves in it read (once per loaded world)."""
        if self.connection.load_town(self.route.town, float(self.options["load_timeout_s"])):
            self._statics = None
        self.connection.synchronous(self.fixed_delta, self.no_rendering)
        if self.route.town not in self._town_cache:
            points = densify(self.connection.map, self.route.waypoints, api=self.carla)
            polyline = np.array([(x, y) for x, y, _ in points])
            self._town_cache[self.route.town] = {"polyline": polyline, "path": RoutePolyline(polyline)}
        self._polyline = self._town_cache[self.route.town]["polyline"]
        self._path = self._town_cache[self.route.town]["path"]
        if self._statics is None:
            self._statics = read_statics(self.connection.world, self._path)

    # -- stepping --------------------------------------------------------------------------------
    def _step(self, control: Control, tick_controls: list[Control] | None = None) -> tuple[BackendState, StepEvents]:
        carla, world, ego = self.carla, self.connection.world, self.actors.ego
        self._steps += 1
        tick_controls = tick_controls or [control] * self.ticks_per_step
        events: list[Event] = []
        for i, tick_control in enumerate(tick_controls):
            if i == 0 or tick_control != tick_controls[i - 1]:  # CARLA holds an applied control until the next
                self._control = tick_control
                ego.apply_control(carla.VehicleControl(
                    throttle=float(tick_control.throttle), steer=float(tick_control.steer),
                    brake=float(tick_control.brake)))
            world.tick(self.timeout_s)
            events += self._watch_tick()
        state = self._read_state()
        collisions = self._collisions.events(self.actors.contacts, self._steps)
        events = collisions + events + self._route_timeout.check(self._arc, state.ego.speed_limit, state.sim_time_s,
                                                                 self._steps)
        self._weather.update(world, 100.0 * self._arc / max(self._path.length, 1e-9))
        return state, StepEvents(events=events)

    def _watch_tick(self) -> list[Event]:
        """Red lights and stop signs, checked on every tick (cheap: the client caches actor state)."""
        ego = self.actors.ego
        transform, velocity = ego.get_transform(), ego.get_velocity()
        yaw = math.radians(transform.rotation.yaw)
        events = self._red_lights.check(transform, self._steps)
        return events + self._stop_signs.check(transform.location.x, transform.location.y, yaw,
                                               math.hypot(velocity.x, velocity.y), self._steps)

    def _read_state(self) -> BackendState:
        state = self._reader.read(self._control, self._steps * self.dt)
        self._collisions.forget_far_hit(state.ego.x, state.ego.y)
        self._arc = self._reader.arc
        return state
