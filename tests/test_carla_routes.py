"""Leaderboard 2.0 route files (real devtest data) and lane-level route densification."""
import math
from pathlib import Path

import numpy as np
import pytest

import carla_standin as standin
from prunedrive.harness.backends.carla_route_planner import (
    CHANGELANERIGHT, LANEFOLLOW, RIGHT, STRAIGHT, LaneGraph, LaneSegment, densify, plan_route,
)
from prunedrive.harness.backends.carla_route_xml import (
    BASE_WEATHER, WEATHER_DEFAULTS, RouteFileError, load_route, parse_routes, weather_at,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "scenarios" / "carla" / "routes_devtest.xml"
SHARED = ROOT.parent / "shared" / "carla" / "routes_devtest.xml"


def test_every_shipped_devtest_route_parses():
    routes = parse_routes(SHIPPED)
    assert list(routes) == ["0", "1"]
    for route in routes.values():
        assert route.town == "Town12"
        assert len(route.waypoints) >= 20 and all(len(p) == 3 for p in route.waypoints)
        assert [w.route_percentage for w in route.weathers] == [0.0, 100.0]
        assert len(route.scenarios) > 40
        assert all(len(s.trigger) == 4 and s.name and s.type for s in route.scenarios)
    first = routes["0"]
    assert first.waypoints[0] == (983.5, 5382.2, 371.0)
    parking = first.scenarios[0]
    assert (parking.name, parking.type) == ("ParkingExit_1", "ParkingExit")
    assert parking.trigger == (983.5, 5382.2, 371.0, 90.0)
    assert parking.params == {"direction": {"value": "right"}, "front_vehicle_distance": {"value": "9"},
                              "behind_vehicle_distance": {"value": "9"}}
    left_turn = next(s for s in first.scenarios if s.name == "SignalizedJunctionLeftTurn_1")
    assert left_turn.params["source_dist_interval"] == {"from": "30", "to": "65"}


@pytest.mark.skipif(not SHARED.is_file(), reason="../shared/carla/routes_devtest.xml is only in the project "
                                                 "workspace, not in a user's clone")
def test_shipped_copy_matches_the_shared_real_file():
    assert parse_routes(SHARED).keys() == parse_routes(SHIPPED).keys()
    for a, b in zip(parse_routes(SHARED).values(), parse_routes(SHIPPED).values()):
        assert (a.waypoints, a.weathers, a.scenarios) == (b.waypoints, b.weathers, b.scenarios)


def test_weathers_start_from_the_leaderboard_base_and_interpolate_by_route_percentage():
    route = load_route(SHIPPED, 0)
    start, end, middle = route.weather_at(0), route.weather_at(100), route.weather_at(50)
    assert (start["cloudiness"], start["sun_altitude_angle"], start["fog_density"]) == (5.0, 90.0, 2.0)
    assert end["sun_altitude_angle"] == 15.0
    assert middle["sun_altitude_angle"] == pytest.approx(52.5)
    assert middle["cloudiness"] == 5.0
    assert start["fog_distance"] == BASE_WEATHER["fog_distance"]  # not named in the file
    assert set(start) == set(WEATHER_DEFAULTS)


def test_weather_before_the_first_and_after_the_last_key_point_is_the_nearest_one(tmp_path):
    path = write(tmp_path, ROUTE.format(weathers='<weathers><weather route_percentage="80" wetness="40"/>'
                                                  '<weather route_percentage="20" wetness="10"/></weathers>'))
    route = load_route(path, "r")
    assert [w.route_percentage for w in route.weathers] == [20.0, 80.0]  # sorted, as the Leaderboard
    assert route.weather_at(0)["wetness"] == 10.0
    assert route.weather_at(50)["wetness"] == pytest.approx(25.0)
    assert route.weather_at(100)["wetness"] == 40.0
    assert weather_at((), 30) == BASE_WEATHER
    assert (BASE_WEATHER["sun_altitude_angle"], BASE_WEATHER["cloudiness"]) == (70.0, 50.0)


def test_weather_defaults_are_carlas():
    carla = pytest.importorskip("carla", reason="the carla client (pip install prunedrive[carla]) is not installed")
    real = carla.WeatherParameters()
    for name, value in WEATHER_DEFAULTS.items():
        assert getattr(real, name) == pytest.approx(value, abs=1e-6), name


ROUTE = """<routes>
   <route id="r" town="Town01">
      {weathers}
      <waypoints>
         <position x="0" y="0" z="0"/>
         <position x="10" y="0" z="0"/>
      </waypoints>
   </route>
</routes>
"""


def write(tmp_path, text):
    path = tmp_path / "routes.xml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, line, message", [
    (ROUTE.format(weathers="<weathers>").replace("</route>", "</route>", 1), 8, "not well-formed XML: mismatched tag"),
    (ROUTE.format(weathers="").replace('<position x="10" y="0" z="0"/>', '<position x="10" z="0"/>'), 6,
     "<position>: missing attribute 'y'"),
    (ROUTE.format(weathers="").replace('x="10"', 'x="ten"'), 6, "attribute 'x' must be a finite number, got 'ten'"),
    (ROUTE.format(weathers='<weathers><weather cloudiness="5"/></weathers>'), 3,
     "missing attribute 'route_percentage'"),
    (ROUTE.format(weathers='<weathers><weather route_percentage="0" clouds="5"/></weathers>'), 3,
     "unknown weather parameter 'clouds'; allowed: route_percentage, cloudiness"),
    (ROUTE.format(weathers='<weathers><weather route_percentage="140"/></weathers>'), 3, "must be in [0, 100]"),
    (ROUTE.format(weathers="<extras/>"), 3, "<extras>: unexpected element inside <route>; allowed: weathers"),
    (ROUTE.format(weathers="").replace('town="Town01"', ""), 2, "<route>: missing attribute 'town'"),
    (ROUTE.format(weathers="").replace("</routes>", ROUTE.format(weathers="")[9:]), 9, "route id 'r' is repeated"),
    ('<!DOCTYPE r [\n<!ENTITY lol "lol">\n]>\n<routes/>\n', 2, "refused"),
    ('<?xml version="1.0"?>\n<!DOCTYPE r [\n<!ENTITY x SYSTEM "file:///etc/passwd">\n]>\n<routes>&x;</routes>\n', 3,
     "refused"),
    ("<route/>\n", 1, "the root element must be <routes>"),
    ("<routes>\n</routes>\n", 1, "no <route> in the file"),
    (ROUTE.format(weathers="<scenarios><scenario name='s' type='Accident'/></scenarios>"), 3,
     "scenario 's' needs exactly one <trigger_point>"),
])
def test_bad_files_give_one_error_naming_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(RouteFileError) as error:
        parse_routes(path)
    assert str(error.value).startswith(f"{path}:{line}: "), str(error.value)
    assert message in str(error.value)
    # one message, no chained traceback behind it
    assert error.value.__cause__ is None and (error.value.__context__ is None or error.value.__suppress_context__)


def test_missing_file_and_unknown_route_id(tmp_path):
    with pytest.raises(RouteFileError, match="cannot read the route file"):
        parse_routes(tmp_path / "nope.xml")
    with pytest.raises(RouteFileError, match=r"no route with id '7'; ids: 0, 1"):
        load_route(SHIPPED, 7)


# -- densification: the pure graph search and geometry -------------------------------------------
def line(a, b, spacing=1.0):
    n = max(int(math.dist(a, b) / spacing), 1) + 1
    return np.linspace(a, b, n)


def seg(key, a, b, **kw):
    return LaneSegment(key=(key, 0, -1), start=(*a, 0.0), end=(*b, 0.0), **kw)


def test_a_star_takes_the_shorter_branch_and_names_turns():
    segments = [
        seg(0, (0, 0), (100, 0)),
        seg(1, (100, 0), (200, 0), junction=True),                       # straight through the junction
        seg(2, (100, 0), (150, 80), junction=True, start_yaw=0, end_yaw=60),  # the long way round
        seg(3, (150, 80), (200, 0), start_yaw=-60, end_yaw=-60),
        seg(4, (200, 0), (300, 0)),
    ]
    graph = LaneGraph(segments)
    paths = {i: line(s.start[:2], s.end[:2]) for i, s in enumerate(segments)}
    route = plan_route(graph, [(10, 0, 0), (250, 0, 0)], [0, 4], paths.__getitem__)
    xy = np.array([p[:2] for p in route])
    assert np.allclose(xy[0], (10, 0)) and np.allclose(xy[-1], (250, 0))
    assert np.abs(xy[:, 1]).max() < 1e-9  # never took the detour
    assert {p[2] for p in route} == {LANEFOLLOW, STRAIGHT}
    spacing = np.hypot(*np.diff(xy, axis=0).T)
    assert spacing.max() <= 1.0 + 1e-9 and spacing.min() > 0.05


def test_a_lane_change_reaches_a_turn_that_only_the_other_lane_has():
    arc = np.array([(100 + 20 * math.sin(t), 23.5 - 20 * math.cos(t)) for t in np.linspace(0, math.pi / 2, 30)])
    segments = [
        seg(0, (0, 0), (100, 0), right=1),
        seg(1, (0, 3.5), (100, 3.5), left=0),
        seg(2, tuple(arc[0]), tuple(arc[-1]), junction=True, start_yaw=0, end_yaw=90),
        seg(3, tuple(arc[-1]), (120, 100)),
    ]
    paths = {0: line((0, 0), (100, 0)), 1: line((0, 3.5), (100, 3.5)), 2: arc, 3: line(arc[-1], (120, 100))}
    route = plan_route(LaneGraph(segments), [(5, 0, 0), (120, 80, 0)], [0, 3], paths.__getitem__)
    options = [p[2] for p in route]
    assert options[0] == CHANGELANERIGHT and RIGHT in options and options[-1] == LANEFOLLOW
    xy = np.array([p[:2] for p in route])
    assert abs(xy[0, 1]) < 0.1 and abs(xy[80, 1] - 3.5) < 0.1  # changed lanes within the section
    assert np.allclose(xy[-1], (120, 80), atol=0.6)


def test_a_key_point_behind_on_the_same_lane_goes_round_the_loop():
    corners = [(0, 0), (50, 0), (50, 50), (0, 50)]
    segments = [seg(k, corners[k], corners[(k + 1) % 4]) for k in range(4)]
    paths = {k: line(corners[k], corners[(k + 1) % 4]) for k in range(4)}
    route = plan_route(LaneGraph(segments), [(40, 0, 0), (10, 0, 0)], [0, 0], paths.__getitem__)
    xy = np.array([p[:2] for p in route])
    assert np.hypot(*np.diff(xy, axis=0).T).sum() == pytest.approx(10 + 50 + 50 + 50 + 10)


def test_unreachable_key_points_are_an_error():
    segments = [seg(0, (0, 0), (10, 0)), seg(1, (50, 0), (60, 0))]
    paths = {0: line((0, 0), (10, 0)), 1: line((50, 0), (60, 0))}
    with pytest.raises(ValueError, match=r"no lane path from route key point 0 \(1.0, 0.0\) to key point 1"):
        plan_route(LaneGraph(segments), [(1, 0, 0), (55, 0, 0)], [0, 1], paths.__getitem__)


def test_graph_merges_ends_that_coincide_up_to_rounding():
    graph = LaneGraph([seg(0, (0, 0), (10.0000001, 0)), seg(1, (9.9999999, 0), (20, 0))])
    assert graph.end_node[0] == graph.start_node[1]
    assert graph.nearest((15, 1)) == 1


# -- densification on a carla.Map (the stand-in's StandinTown) -------------------------------------
@pytest.fixture
def town():
    server = standin.StandinServer(port=2901)
    yield server.world.get_map()
    server.shutdown()


def on_some_lane(carla_map, x, y):
    return carla_map.get_waypoint(standin.Location(x, y, 0.0), project_to_road=False) is not None


def test_densify_on_a_map_follows_lanes_through_the_junction(town):
    straight = densify(town, [(20, 1.75, 0), (300, 1.75, 0)], api=standin)
    xy = np.array([p[:2] for p in straight])
    assert np.allclose(xy[0], (20, 1.75)) and np.allclose(xy[-1], (300, 1.75))
    assert np.allclose(xy[:, 1], 1.75) and np.all(np.diff(xy[:, 0]) > 0)
    assert {p[2] for p in straight} == {LANEFOLLOW, STRAIGHT}

    turn = densify(town, [(20, 1.75, 0), (220, 100, 0)], api=standin)
    options = [p[2] for p in turn]
    assert CHANGELANERIGHT in options and RIGHT in options  # only the right lane turns right
    xy = np.array([p[:2] for p in turn])
    assert np.allclose(xy[-1], (220, 100), atol=0.6)
    assert all(on_some_lane(town, x, y) for x, y in xy)
    assert np.hypot(*np.diff(xy, axis=0).T).max() < 1.6
