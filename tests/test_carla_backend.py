"""The CARLA backend on the in-repo stand-in of the carla API (tests/carla_standin.py).

Nothing here needs a CARLA server; tests/test_carla_server.py drives a real one when CARLA_HOST is set.
The last tests check that the stand-in cannot drift from the real `carla` package and its stubs.
"""
import ast
import enum
import inspect
import itertools
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import carla_standin as standin
from prunedrive.agents.expert import ExpertAgent
from prunedrive.harness.action import Control
from prunedrive.harness.backends.base import SimulatorError
from prunedrive.harness.backends.carla import CarlaBackend
from prunedrive.harness.backends.carla_connection import import_carla
from prunedrive.harness.env import DriveEnv
from prunedrive.harness.events import COLLISIONS, EventKind
from prunedrive.scenarios.loader import Scenario

ROOT = Path(__file__).resolve().parents[1]
ROUTES = """<routes>
   <route id="straight" town="StandinTown">
      <weathers>
         <weather route_percentage="0" cloudiness="10" sun_altitude_angle="60"/>
         <weather route_percentage="100" cloudiness="90" sun_altitude_angle="20"/>
      </weathers>
      <waypoints><position x="20" y="1.75" z="0"/><position x="300" y="1.75" z="0"/></waypoints>
   </route>
   <route id="light" town="StandinTown">
      <waypoints><position x="150" y="1.75" z="0"/><position x="260" y="1.75" z="0"/></waypoints>
   </route>
   <route id="stop" town="StandinTown">
      <waypoints><position x="330" y="1.75" z="0"/><position x="399" y="1.75" z="0"/></waypoints>
   </route>
   <route id="turn" town="StandinTown">
      <waypoints><position x="20" y="1.75" z="0"/><position x="220" y="100" z="0"/></waypoints>
   </route>
</routes>
"""
_ports = itertools.count(3100)


@pytest.fixture
def server():
    s = standin.StandinServer(port=next(_ports))
    yield s
    s.shutdown()


@pytest.fixture
def route_file(tmp_path):
    path = tmp_path / "routes.xml"
    path.write_text(ROUTES)
    return path


def scenario(route_file, route_id="straight", policy_hz=5.0, vehicles=0, pedestrians=0, **options):
    return Scenario(name=f"test-{route_id}", kind="carla_route", policy_hz=policy_hz, vehicles=vehicles,
                    pedestrians=pedestrians, duration_s=120.0,
                    options={"route_file": str(route_file), "route_id": route_id, "camera_size": [32, 24], **options})


def make(server, route_file, route_id="straight", render=False, **kw):
    return CarlaBackend(scenario(route_file, route_id, **kw), render=render, port=server.port, api=standin)


def drive(backend, control, steps):
    events, state = [], None
    for _ in range(steps):
        state, step_events = backend.step(control)
        events += step_events.events
    return state, events


def hero(server):
    (ego,) = [a for a in server.actors("vehicle.*") if a.attributes["role_name"] == "hero"]
    return ego


def only_map_actors_left(server):
    return {a.type_id for a in server.actors()} == {"traffic.traffic_light", "traffic.stop"}


# -- lifecycle -------------------------------------------------------------------------------------
def test_reset_spawns_the_hero_at_the_route_start_with_sensors_in_synchronous_mode(server, route_file):
    backend = make(server, route_file, render=True)
    state = backend.reset(0)
    ego = hero(server)
    assert ego.type_id == "vehicle.lincoln.mkz_2020"
    assert (state.ego.x, state.ego.y, state.ego.yaw) == pytest.approx((20.0, 1.75, 0.0), abs=1e-6)
    sensors = {s.type_id: s for s in server.actors("sensor.*")}
    assert set(sensors) == {"sensor.other.collision", "sensor.camera.rgb"}  # off-lane is read from the map
    assert all(s.parent is ego and s.is_listening() for s in sensors.values())
    settings = server.world.get_settings()
    assert settings.synchronous_mode and settings.fixed_delta_seconds == 0.05 and not settings.no_rendering_mode
    assert server.tms[8000]._sync and server.tms[8000]._seed == 0
    assert server.world.get_weather().cloudiness == pytest.approx(10.0)  # the route's weather at 0 %
    frame = backend.render()
    assert frame.shape == (24, 32, 3) and frame.dtype == np.uint8
    polyline = backend.route_polyline()
    assert np.allclose(polyline[0], (20, 1.75)) and np.allclose(polyline[-1], (300, 1.75))

    backend.close()
    assert only_map_actors_left(server)
    assert server.world.get_settings() == server.original_settings and not server.tms[8000]._sync
    assert server.warnings == [] and server.individual_destroys == 0
    backend.close()  # closing twice is harmless


def test_without_rendering_there_is_no_camera_and_the_renderer_is_off(server, route_file):
    backend = make(server, route_file)
    backend.reset(0)
    assert not server.actors("sensor.camera.*") and backend.render() is None
    assert server.world.get_settings().no_rendering_mode
    backend.close()


@pytest.mark.parametrize("policy_hz, ticks", [(5, 4), (10, 2), (20, 1), (1, 20)])
def test_each_step_ticks_a_whole_number_of_fixed_deltas(server, route_file, policy_hz, ticks):
    backend = make(server, route_file, policy_hz=policy_hz)
    backend.reset(0)
    before = server.ticks
    state, _ = backend.step(Control())
    assert server.ticks - before == ticks
    assert backend.dt == pytest.approx(ticks * 0.05) and state.sim_time_s == pytest.approx(backend.dt)
    backend.close()


def test_a_policy_rate_that_is_not_a_whole_number_of_ticks_is_refused(route_file):
    with pytest.raises(ValueError, match=r"policy_hz 3 is not a whole number of 0.05 s ticks"):
        CarlaBackend(scenario(route_file, policy_hz=3.0), api=standin)


def test_every_episode_actor_is_destroyed_in_one_batch_at_reset_and_close(server, route_file):
    backend = make(server, route_file, render=True, vehicles=3, pedestrians=2)
    backend.reset(1)
    first = {a.id for a in server.actors() if not a.type_id.startswith("traffic.")}
    assert len(first) == 1 + 2 + 3 + 2 + 2  # hero, its 2 sensors (collision, camera), 3 cars, 2 walkers + controllers
    backend.reset(2)
    second = {a.id for a in server.actors() if not a.type_id.startswith("traffic.")}
    assert len(second) == len(first) and first.isdisjoint(second)
    destroys = [batch for batch in server.batches if "DestroyActor" in batch]
    assert destroys == [["DestroyActor"] * len(first)] and set(server.destroyed) == first
    backend.close()
    destroys = [batch for batch in server.batches if "DestroyActor" in batch]
    assert len(destroys) == 2 and set(server.destroyed) == first | second
    assert only_map_actors_left(server)
    assert server.warnings == [] and server.individual_destroys == 0  # sensors and controllers stopped first


def test_background_traffic_runs_on_the_traffic_manager_near_the_route(server, route_file):
    backend = make(server, route_file, vehicles=6, pedestrians=2)
    backend.reset(2)
    cars = [a for a in server.actors("vehicle.*") if a.attributes["role_name"] != "hero"]
    assert len(cars) == 6 and {a.id for a in cars} == server.tms[8000]._vehicles
    assert all(a._autopilot and "crossbike" not in a.type_id for a in cars)  # four wheels only
    assert all(c._started for c in server.actors("controller.ai.walker"))
    start = {a.id: a.get_location() for a in server.actors("walker.*")}
    state, _ = drive(backend, Control(brake=1.0), 5)
    ego = hero(server).get_location()
    near_cars = [a for a in cars if a.get_location().distance(ego) <= 100.0]  # VEHICLE_RANGE_M
    near_walkers = [a for a in server.actors("walker.*") if a.get_location().distance(ego) <= 50.0]
    assert near_cars and len(state.objects.vehicles) == len(near_cars)
    assert near_walkers and len(state.objects.pedestrians) == len(near_walkers)
    lengths = sorted(2 * a.bounding_box.extent.x for a in near_cars)
    assert sorted(state.objects.vehicles[:, 5]) == pytest.approx(lengths)
    assert sorted(state.objects.vehicles[:, 0]) == pytest.approx(sorted(a.get_location().x for a in near_cars))
    assert all(a.get_location().distance(start[a.id]) > 0.5 for a in server.actors("walker.*"))  # walking
    backend.close()
    assert only_map_actors_left(server)


# -- backend criteria ------------------------------------------------------------------------------
def test_driving_into_a_prop_is_one_static_collision_not_one_per_tick(server, route_file):
    backend = make(server, route_file)
    backend.reset(0)
    server.spawn("static.prop.streetbarrier", 45, 1.75, yaw=90)
    _, events = drive(backend, Control(throttle=0.6), 35)
    assert [e.kind for e in events if e.kind in COLLISIONS] == [EventKind.COLLISION_STATIC]
    assert "static.prop.streetbarrier" in next(e.detail for e in events if e.kind in COLLISIONS)
    backend.close()
    assert {a.type_id for a in server.actors("static.*")} == {"static.prop.streetbarrier"}  # not ours: kept


def test_collisions_are_typed_and_repeats_within_5_s_or_5_m_count_once(server, route_file):
    backend = make(server, route_file)
    backend.reset(0)
    car = server.spawn("vehicle.tesla.model3", 150, -1.75, yaw=180)
    walker = server.spawn("walker.pedestrian.0001", 100, 8.75)
    ego, go = hero(server), Control(throttle=0.4)
    kinds = []

    def hit(other):
        server.collide(ego, other)
        kinds.extend(e.kind for e in backend.step(go)[1].events if e.kind in COLLISIONS)

    drive(backend, go, 5)
    hit(car), hit(car), hit(car)          # the sensor fires on every tick of a contact
    drive(backend, go, 10)                # 2 s later and more than 5 m on
    hit(walker)
    hit(car)                              # far from the last hit, but the same car within 5 s
    drive(backend, go, 15)
    hit(car)                              # more than 5 s after the first hit on it
    assert kinds == [EventKind.COLLISION_VEHICLE, EventKind.COLLISION_PEDESTRIAN, EventKind.COLLISION_VEHICLE]
    backend.close()


def test_a_standing_ego_that_is_hit_is_not_at_fault(server, route_file):
    backend = make(server, route_file)
    backend.reset(0)
    server.collide(hero(server), server.spawn("vehicle.audi.a2", 60, 1.75))
    _, events = drive(backend, Control(brake=1.0), 2)
    assert not events
    backend.close()


def traffic_light(server):
    (light,) = server.actors("traffic.traffic_light")
    return light


@pytest.mark.parametrize("state, runs", [(standin.TrafficLightState.Red, 1), (standin.TrafficLightState.Green, 0),
                                         (standin.TrafficLightState.Yellow, 0)])
def test_crossing_the_stop_line_while_red_is_one_infraction(server, route_file, state, runs):
    backend = make(server, route_file, "light")
    backend.reset(0)
    traffic_light(server).set_state(state)
    ego_state, events = drive(backend, Control(throttle=0.5), 45)
    assert ego_state.ego.x > 210  # well through the junction
    assert sum(e.kind == EventKind.RED_LIGHT for e in events) == runs
    backend.close()


def test_stopping_before_a_red_light_is_fine_and_the_light_is_observed(server, route_file):
    backend = make(server, route_file, "light")
    state = backend.reset(0)
    traffic_light(server).set_state(standin.TrafficLightState.Red)
    events = []
    while state.ego.x < 185:
        state, step_events = backend.step(Control(throttle=0.5))
        events += step_events.events
    state, more = drive(backend, Control(brake=1.0), 15)
    assert state.ego.speed == 0.0 and not [e for e in events + more if e.kind == EventKind.RED_LIGHT]
    light_state, distance = state.objects.traffic_light
    assert light_state == 2 and distance == pytest.approx(197.0 - state.ego.x, abs=0.3)
    backend.close()


def test_passing_a_stop_sign_without_stopping_is_an_infraction(server, route_file):
    backend = make(server, route_file, "stop")
    backend.reset(0)
    state, events = drive(backend, Control(throttle=0.5), 45)
    assert state.ego.x > 392
    assert [e.kind for e in events] == [EventKind.STOP_SIGN]
    backend.close()


def test_stopping_in_the_stop_sign_area_is_fine(server, route_file):
    backend = make(server, route_file, "stop")
    state, events = backend.reset(0), []
    while state.ego.x < 378:  # then brake: the car stops with its front in the sign's area
        state, step_events = backend.step(Control(throttle=0.3))
        events += step_events.events
    for control, steps in ((Control(brake=1.0), 10), (Control(throttle=0.5), 20)):
        state, more = drive(backend, control, steps)
        events += more
    assert state.ego.x > 392 and not [e for e in events if e.kind == EventKind.STOP_SIGN]
    backend.close()


@pytest.mark.parametrize("x, y, yaw, outside", [
    (50, 1.75, 0, False),     # on the route's lane
    (50, 5.25, 0, False),     # the other lane of the same direction
    (50, 8.75, 0, True),      # the sidewalk
    (50, 20.0, 0, True),      # off every lane
    (50, -1.75, 0, True),     # the opposite direction's lane
    (210, 3.5, 0, False),     # in the junction
])
def test_outside_route_lanes(server, route_file, x, y, yaw, outside):
    backend = make(server, route_file)
    backend.reset(0)
    hero(server).set_transform(standin.Transform(standin.Location(x, y, 0.0), standin.Rotation(yaw=yaw)))
    state, _ = backend.step(Control(brake=1.0))
    assert state.outside_route_lanes is outside
    backend.close()


def test_weather_follows_route_progress(server, route_file):
    backend = make(server, route_file)
    backend.reset(0)
    hero(server).set_transform(standin.Transform(standin.Location(90, 1.75, 0.0), standin.Rotation()))
    backend.step(Control(brake=1.0))
    weather = server.world.get_weather()
    assert weather.cloudiness == pytest.approx(30.0, abs=0.5)  # a quarter of the way from 10 to 90
    assert weather.sun_altitude_angle == pytest.approx(50.0, abs=0.5)
    backend.close()


# -- failures --------------------------------------------------------------------------------------
def test_a_server_that_stops_answering_is_a_simulator_error_and_the_next_reset_reconnects(server, route_file):
    backend = make(server, route_file, vehicles=2)
    backend.reset(0)
    client = backend.connection.client
    server.crash_after_ticks(6)
    with pytest.raises(SimulatorError, match=rf"CARLA server at 127\.0\.0\.1:{server.port} did not answer"):
        drive(backend, Control(throttle=0.5), 5)
    stale = {a.id for a in server.actors() if not a.type_id.startswith("traffic.")}
    backend.close()  # must not raise while the server hangs
    server.resume()
    backend.reset(1)
    assert backend.connection.client is not client  # a fresh client
    assert stale.isdisjoint(a.id for a in server.actors())  # the crashed episode's actors were destroyed
    backend.close()
    assert only_map_actors_left(server) and server.world.get_settings() == server.original_settings


def test_a_server_that_never_answers_is_one_clear_error(route_file):
    backend = CarlaBackend(scenario(route_file), api=standin, port=2999)
    with pytest.raises(SimulatorError) as error:
        backend.reset(0)
    message = str(error.value)
    assert "CARLA server at 127.0.0.1:2999 did not answer" in message and "--carla-host" in message
    backend.close()


def test_the_real_client_times_out_into_the_same_error(route_file):
    carla = pytest.importorskip("carla", reason="the carla client (pip install prunedrive[carla]) is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    backend = CarlaBackend(scenario(route_file), api=carla, port=port, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(SimulatorError, match=rf"127\.0\.0\.1:{port} did not answer \(time-out of 300ms"):
        backend.reset(0)
    assert time.monotonic() - started < 10.0


# -- options ---------------------------------------------------------------------------------------
def test_options_are_checked_and_keyword_arguments_override_the_suite(server, route_file):
    with pytest.raises(ValueError, match=r"unknown CARLA option\(s\) prot; allowed: route_file, route_id, host"):
        CarlaBackend(scenario(route_file, prot=1), api=standin)
    no_id = Scenario(name="x", kind="carla_route", options={"route_file": str(route_file)})
    with pytest.raises(ValueError, match="option 'route_id' is required"):
        CarlaBackend(no_id, api=standin)
    backend = CarlaBackend(scenario(route_file, port=1, host="nowhere"), port=server.port, host="127.0.0.1",
                           api=standin)
    assert (backend.host, backend.port, backend.tm_port, backend.timeout_s) == ("127.0.0.1", server.port, 8000, 60.0)
    shipped = CarlaBackend(Scenario(name="d", kind="carla_route", options={
        "route_file": "scenarios/carla/routes_devtest.xml", "route_id": 1}), api=standin)
    assert shipped.route.town == "Town12" and shipped.route.id == "1"
    with pytest.raises(ValueError, match="route file 'missing.xml' not found"):
        CarlaBackend(Scenario(name="m", kind="carla_route", options={"route_file": "missing.xml", "route_id": 0}),
                     api=standin)


def test_without_the_carla_package_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "carla", None)
    with pytest.raises(ImportError, match=r"pip install prunedrive\[carla\]"):
        import_carla()


def test_the_backend_modules_import_without_carla():
    code = ("import sys; sys.modules['carla'] = None; import harness.backends.carla; "
            "from scenarios.loader import load_suite; load_suite('carla-devtest')")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# -- the env end to end ----------------------------------------------------------------------------
def test_the_expert_drives_a_route_with_a_lane_change_and_a_turn_through_drive_env(server, route_file):
    env = DriveEnv(scenario(route_file, "turn", vehicles=2, pedestrians=1), render_mode="rgb_array",
                   port=server.port, api=standin)
    agent = ExpertAgent()
    observation, _ = env.reset(seed=4)
    done, frames = False, 0
    while not done:
        observation, _, terminated, truncated, info = env.step(agent.act(observation))
        frames += env.render() is not None
        done = terminated or truncated
    outcome = info["outcome"]
    assert outcome.route_completion == 100.0 and outcome.outside_lanes_m == 0.0
    assert not [e for e in outcome.events if e.kind in COLLISIONS]
    assert frames == outcome.steps
    env.close()
    assert only_map_actors_left(server) and server.world.get_settings() == server.original_settings


# -- the stand-in cannot drift from carla ------------------------------------------------------------
def _stub_classes(path: Path) -> dict[str, tuple[list[str], dict[str, list[list[str]]], set[str]]]:
    """class -> (base names, method -> parameter-name lists (one per overload), property names)."""
    classes = {}
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [ast.unparse(b).split("[")[0].split(".")[-1] for b in node.bases]
        methods, properties = {}, set()
        for item in node.body:
            if isinstance(item, ast.FunctionDef):
                decorators = [ast.unparse(d) for d in item.decorator_list]
                if "property" in decorators or any(d.endswith(".setter") for d in decorators):
                    properties.add(item.name)
                    continue
                a = item.args
                names = [x.arg for x in a.posonlyargs + a.args] + ([a.vararg.arg] if a.vararg else [])
                methods.setdefault(item.name, []).append(names + [x.arg for x in a.kwonlyargs])
        classes[node.name] = (bases, methods, properties)
    return classes


def _lookup(stubs, name, member):
    """(overloads, is_property) of `member` on stub class `name` or its bases; None if absent."""
    if name not in stubs:
        return None
    bases, methods, properties = stubs[name]
    if member in properties:
        return [], True
    if member in methods:
        return methods[member], False
    for base in bases:
        found = _lookup(stubs, base, member)
        if found is not None:
            return found
    return None


def _check_class(cls, real, stubs, name, prefix=""):
    problems = []
    label = prefix + name
    if real is None:
        return [f"{label}: no such class in carla"]
    if issubclass(cls, enum.Enum):
        return [f"{label}.{m}: not in carla" for m in cls.__members__ if not hasattr(real, m)]
    for member, value in vars(cls).items():
        if member.startswith("_") and member != "__init__":
            continue  # stand-in internals
        if member == "__init__" and getattr(cls, "_internal_init", False):
            continue  # made by the server in carla, never by users
        if not hasattr(real, member):
            problems.append(f"{label}.{member}: not in carla")
            continue
        found = _lookup(stubs, name, member)
        if found is None:
            problems.append(f"{label}.{member}: not in the stubs")
        elif isinstance(value, property):
            if not found[1]:
                problems.append(f"{label}.{member}: a property here, a method in carla")
        elif inspect.isfunction(value):
            params = list(inspect.signature(value).parameters)
            if found[1] or params not in found[0]:
                problems.append(f"{label}.{member}{tuple(params)}: carla has {found[0] or 'a property'}")
        else:
            problems.append(f"{label}.{member}: a public non-method attribute the stubs cannot check")
    return problems


def test_every_stand_in_class_and_method_matches_the_real_carla_api():
    carla = pytest.importorskip("carla", reason="the carla client (pip install prunedrive[carla]) is not installed")
    stub_dir = Path(carla.__file__).parent
    stubs, command_stubs = _stub_classes(stub_dir / "libcarla.pyi"), _stub_classes(stub_dir / "command.pyi")
    classes = [(n, c) for n, c in vars(standin).items()
               if isinstance(c, type) and c.__module__ == standin.__name__ and not n.startswith(("_", "Standin"))
               and n != "command"]
    assert len(classes) > 30
    problems = []
    for name, cls in classes:
        problems += _check_class(cls, getattr(carla, name, None), stubs, name)
    for name, cls in vars(standin.command).items():
        if isinstance(cls, type):
            problems += _check_class(cls, getattr(carla.command, name, None), command_stubs, name, "command.")
    assert problems == []


def test_the_drift_check_catches_a_wrong_parameter_name():
    carla = pytest.importorskip("carla", reason="the carla client (pip install prunedrive[carla]) is not installed")
    stubs = _stub_classes(Path(carla.__file__).parent / "libcarla.pyi")

    class Client:  # noqa: D401 -- a deliberately wrong stand-in
        def set_timeout(self, seconds):
            pass

        def get_wrold(self):
            pass

    problems = _check_class(Client, carla.Client, stubs, "Client")
    assert problems == ["Client.set_timeout('self', 'seconds'): carla has [['self', 'second']]",
                        "Client.get_wrold: not in carla"]
