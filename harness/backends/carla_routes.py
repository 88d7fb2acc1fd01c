"""CARLA Leaderboard 2.0 route files, and their densification into a lane-level route on a map.

Route file format (carla-simulator/leaderboard ``data/routes_*.xml``)::

    <routes>
      <route id="0" town="Town12">
        <weathers><weather route_percentage="0" cloudiness="5.0" .../> ...</weathers>
        <waypoints><position x="983.5" y="5382.2" z="371"/> ...</waypoints>
        <scenarios>
          <scenario name="Accident_1" type="Accident">
            <trigger_point x="427.2" y="6086.8" z="359" yaw="144"/>
            <distance value="100"/>            <!-- any other child: a parameter -->
          </scenario>
        </scenarios>
      </route>
    </routes>

The file is read with defusedxml's SAX reader, which refuses entity declarations (billion laughs,
external entities), and through a locator so that every error names ``file:line``.

Densification follows the Leaderboard's ``interpolate_trajectory`` (GlobalRoutePlanner between
consecutive key points) with our own small planner, because the PyPI ``carla`` wheel has no
``agents`` package: the map's topology (one segment per lane of a road section) becomes a graph,
A* joins consecutive key points lane by lane, and each used segment is sampled with
``Waypoint.next``. The graph search and the geometry are plain Python/numpy (``LaneSegment``,
``LaneGraph``, ``plan_route``) so they are testable without a simulator; only ``densify`` talks to
a ``carla.Map``.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from xml.sax.handler import ContentHandler

import numpy as np

from prunedrive.harness.route import resample

ROUTE_SPACING = 1.0  # m between densified points, as the Leaderboard's interpolate_trajectory

# Every carla.WeatherParameters field, with the value of carla.WeatherParameters() (0.9.16).
WEATHER_DEFAULTS: dict[str, float] = {
    "cloudiness": 0.0, "precipitation": 0.0, "precipitation_deposits": 0.0, "wind_intensity": 0.0,
    "sun_azimuth_angle": 0.0, "sun_altitude_angle": 0.0, "fog_density": 0.0, "fog_distance": 0.0,
    "wetness": 0.0, "fog_falloff": 0.0, "scattering_intensity": 0.0, "mie_scattering_scale": 0.0,
    "rayleigh_scattering_scale": 0.0331, "dust_storm": 0.0,
}
# The Leaderboard's route_parser starts every <weather> from this base and overrides what it names.
BASE_WEATHER = {**WEATHER_DEFAULTS, "sun_altitude_angle": 70.0, "cloudiness": 50.0}

# Road options, named as agents.navigation.local_planner.RoadOption (lower case).
LANEFOLLOW, LEFT, RIGHT, STRAIGHT = "lanefollow", "left", "right", "straight"
CHANGELANELEFT, CHANGELANERIGHT = "changelaneleft", "changelaneright"
TURN_THRESHOLD_DEG = 30.0       # a junction segment turning less than this is "straight"
LANE_CHANGE_PENALTY_M = 5.0     # prefer staying in lane when a lane change gains nothing


class RouteFileError(ValueError):
    """A route file that cannot be used; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Weather:
    route_percentage: float
    params: dict[str, float]  # every WEATHER_DEFAULTS key


@dataclass(frozen=True)
class RouteScenario:
    name: str
    type: str
    trigger: tuple[float, float, float, float]  # x, y, z, yaw (degrees)
    params: dict[str, dict[str, str]] = field(default_factory=dict)  # child tag -> its attributes


@dataclass(frozen=True)
class RouteSpec:
    id: str
    town: str
    weathers: tuple[Weather, ...]  # sorted by route_percentage
    waypoints: tuple[tuple[float, float, float], ...]
    scenarios: tuple[RouteScenario, ...]
    source: str = ""
    line: int = 0

    def weather_at(self, percentage: float) -> dict[str, float]:
        return weather_at(self.weathers, percentage)


def weather_at(weathers: Sequence[Weather], percentage: float) -> dict[str, float]:
    """The weather at a route percentage, as the Leaderboard's RouteWeatherBehavior: linear between
    the two surrounding <weather> key points, the nearest one's before the first and after the last."""
    if not weathers:
        return dict(BASE_WEATHER)
    xs = [w.route_percentage for w in weathers]
    return {k: float(np.interp(percentage, xs, [w.params[k] for w in weathers])) for k in WEATHER_DEFAULTS}


# -- parsing ---------------------------------------------------------------------------------------
@dataclass
class _Node:
    tag: str
    attrib: dict[str, str]
    line: int
    children: list["_Node"] = field(default_factory=list)


class _TreeBuilder(ContentHandler):
    """Builds a tiny element tree whose nodes remember their line."""

    def __init__(self):
        super().__init__()
        self.locator = None
        self.stack: list[_Node] = []
        self.root: _Node | None = None

    def setDocumentLocator(self, locator):  # noqa: N802 -- SAX API
        self.locator = locator

    def line(self) -> int:
        return self.locator.getLineNumber() if self.locator is not None else 0

    def startElement(self, name, attrs):  # noqa: N802
        node = _Node(name, dict(attrs), self.line())
        if self.stack:
            self.stack[-1].children.append(node)
        else:
            self.root = node
        self.stack.append(node)

    def endElement(self, name):  # noqa: N802
        self.stack.pop()


def _read_tree(path: Path) -> _Node:
    from defusedxml import DefusedXmlException
    from defusedxml.expatreader import create_parser
    from xml.sax import SAXParseException

    builder = _TreeBuilder()
    parser = create_parser()
    parser.setContentHandler(builder)
    try:
        with open(path, "rb") as f:
            parser.parse(f)
    except OSError as exc:
        raise RouteFileError(f"{path}: cannot read the route file: {exc.strerror or exc}") from None
    except SAXParseException as exc:
        raise RouteFileError(f"{path}:{exc.getLineNumber()}: not well-formed XML: {exc.getMessage()}") from None
    except DefusedXmlException as exc:  # entity or DTD declarations: refused, never expanded
        raise RouteFileError(f"{path}:{builder.line()}: refused: {exc} (route files may not declare "
                             "entities or DTDs)") from None
    if builder.root is None:
        raise RouteFileError(f"{path}:1: empty route file")
    return builder.root


class _Where:
    def __init__(self, path: Path):
        self.path = path

    def error(self, node: _Node, message: str) -> RouteFileError:
        return RouteFileError(f"{self.path}:{node.line}: <{node.tag}>: {message}")

    def attr(self, node: _Node, name: str) -> str:
        if name not in node.attrib:
            raise self.error(node, f"missing attribute {name!r}")
        return node.attrib[name]

    def number(self, node: _Node, name: str) -> float:
        text = self.attr(node, name)
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise self.error(node, f"attribute {name!r} must be a finite number, got {text!r}")
        return value

    def children(self, node: _Node, allowed: tuple[str, ...]) -> list[_Node]:
        for child in node.children:
            if child.tag not in allowed:
                raise self.error(child, f"unexpected element inside <{node.tag}>; allowed: {', '.join(allowed)}")
        return node.children


def parse_routes(path: str | Path) -> dict[str, RouteSpec]:
    """Every route of a Leaderboard 2.0 route file, by id, in file order. Errors: RouteFileError."""
    path = Path(path)
    root = _read_tree(path)
    at = _Where(path)
    if root.tag != "routes":
        raise at.error(root, "the root element must be <routes>")
    routes: dict[str, RouteSpec] = {}
    for node in at.children(root, ("route",)):
        route = _parse_route(node, at)
        if route.id in routes:
            raise at.error(node, f"route id {route.id!r} is repeated (first at line {routes[route.id].line})")
        routes[route.id] = route
    if not routes:
        raise at.error(root, "no <route> in the file")
    return routes


def load_route(path: str | Path, route_id: str | int) -> RouteSpec:
    routes = parse_routes(path)
    if str(route_id) not in routes:
        raise RouteFileError(f"{path}: no route with id {str(route_id)!r}; ids: {', '.join(routes)}")
    return routes[str(route_id)]


def _parse_route(node: _Node, at: _Where) -> RouteSpec:
    route_id, town = at.attr(node, "id"), at.attr(node, "town")
    parts: dict[str, _Node] = {}
    for child in at.children(node, ("weathers", "waypoints", "scenarios")):
        if child.tag in parts:
            raise at.error(child, f"repeated inside route {route_id!r}")
        parts[child.tag] = child

    weathers = []
    for w in at.children(parts["weathers"], ("weather",)) if "weathers" in parts else []:
        params = dict(BASE_WEATHER)
        for name in w.attrib:
            if name != "route_percentage" and name not in WEATHER_DEFAULTS:
                raise at.error(w, f"unknown weather parameter {name!r}; allowed: route_percentage, "
                                  f"{', '.join(WEATHER_DEFAULTS)}")
            if name != "route_percentage":
                params[name] = at.number(w, name)
        percentage = at.number(w, "route_percentage")
        if not 0.0 <= percentage <= 100.0:
            raise at.error(w, f"route_percentage must be in [0, 100], got {percentage:g}")
        weathers.append(Weather(percentage, params))
    weathers.sort(key=lambda w: w.route_percentage)

    if "waypoints" not in parts:
        raise at.error(node, f"route {route_id!r} has no <waypoints>")
    positions = at.children(parts["waypoints"], ("position",))
    if len(positions) < 2:
        raise at.error(parts["waypoints"], f"route {route_id!r} needs at least two <position> elements")
    waypoints = tuple((at.number(p, "x"), at.number(p, "y"), at.number(p, "z")) for p in positions)

    scenarios = []
    for s in at.children(parts["scenarios"], ("scenario",)) if "scenarios" in parts else []:
        name, kind = at.attr(s, "name"), at.attr(s, "type")
        triggers = [c for c in s.children if c.tag == "trigger_point"]
        if len(triggers) != 1:
            raise at.error(s, f"scenario {name!r} needs exactly one <trigger_point>")
        t = triggers[0]
        trigger = (at.number(t, "x"), at.number(t, "y"), at.number(t, "z"), at.number(t, "yaw"))
        params = {c.tag: dict(c.attrib) for c in s.children if c.tag != "trigger_point"}
        scenarios.append(RouteScenario(name, kind, trigger, params))
    return RouteSpec(route_id, town, tuple(weathers), waypoints, tuple(scenarios), str(at.path), node.line)


# -- lane graph (pure geometry) --------------------------------------------------------------------
@dataclass(frozen=True)
class LaneSegment:
    """One lane of one road section, between the two waypoints of a `Map.get_topology()` pair."""

    key: tuple[int, int, int]              # road_id, section_id, lane_id
    start: tuple[float, float, float]
    end: tuple[float, float, float]
    start_yaw: float = 0.0                 # degrees, CARLA convention
    end_yaw: float = 0.0
    junction: bool = False
    left: int | None = None                # index of the same-direction lane a driver may change into
    right: int | None = None


@dataclass(frozen=True)
class Step:
    """One edge of a planned path: follow segment `a`, or change from lane `a` into lane `b`."""

    option: str
    a: int
    b: int | None = None


class _NodeIndex:
    """Merges segment ends that coincide (within 0.3 m, 1 m in height) into one graph node."""

    CELL = 1.0

    def __init__(self):
        self.points: list[tuple[float, float, float]] = []
        self._cells: dict[tuple[int, int], list[int]] = {}

    def get(self, p: tuple[float, float, float]) -> int:
        cx, cy = int(math.floor(p[0] / self.CELL)), int(math.floor(p[1] / self.CELL))
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for n in self._cells.get((cx + dx, cy + dy), ()):
                    q = self.points[n]
                    if math.hypot(p[0] - q[0], p[1] - q[1]) < 0.3 and abs(p[2] - q[2]) < 1.0:
                        return n
        self.points.append(tuple(map(float, p)))
        self._cells.setdefault((cx, cy), []).append(len(self.points) - 1)
        return len(self.points) - 1


def _turn(segment: LaneSegment) -> str:
    if not segment.junction:
        return LANEFOLLOW
    delta = (segment.end_yaw - segment.start_yaw + 180.0) % 360.0 - 180.0
    if abs(delta) < TURN_THRESHOLD_DEG:
        return STRAIGHT
    return RIGHT if delta > 0 else LEFT  # CARLA's yaw grows clockwise (y points right)


class LaneGraph:
    """Segments as edges between their end nodes, plus lane-change edges, searched with A*.

    Edge costs are chord lengths (start to end), so the straight-line heuristic is admissible.
    A lane change from `a` into its neighbour `b` goes from a's start to b's end, like the
    GlobalRoutePlanner's lane-change links, at b's length plus a small penalty.
    """

    def __init__(self, segments: Sequence[LaneSegment]):
        self.segments = list(segments)
        nodes = _NodeIndex()
        self.start_node = [nodes.get(s.start) for s in self.segments]
        self.end_node = [nodes.get(s.end) for s in self.segments]
        self.nodes = nodes.points
        self.edges: dict[int, list[tuple[int, float, Step]]] = {}
        for i, s in enumerate(self.segments):
            out = self.edges.setdefault(self.start_node[i], [])
            out.append((self.end_node[i], _dist(s.start, s.end), Step(_turn(s), i)))
            if s.junction:
                continue
            for j, option in ((s.left, CHANGELANELEFT), (s.right, CHANGELANERIGHT)):
                if j is not None:
                    target = self.segments[j]
                    cost = max(_dist(s.start, target.end), _dist(target.start, target.end)) + LANE_CHANGE_PENALTY_M
                    out.append((self.end_node[j], cost, Step(option, i, j)))

    def search(self, start: int, goal: int) -> list[Step] | None:
        """The cheapest chain of steps from node `start` to node `goal` ([] when equal), or None."""
        if start == goal:
            return []
        goal_xyz = self.nodes[goal]
        best = {start: 0.0}
        came: dict[int, tuple[int, Step]] = {}
        frontier = [(_dist(self.nodes[start], goal_xyz), 0.0, start)]
        while frontier:
            _, cost, node = heapq.heappop(frontier)
            if node == goal:
                steps = []
                while node != start:
                    node, step = came[node][0], came[node][1]
                    steps.append(step)
                return steps[::-1]
            if cost > best[node]:
                continue
            for nxt, edge_cost, step in self.edges.get(node, ()):
                new = cost + edge_cost
                if new < best.get(nxt, math.inf):
                    best[nxt] = new
                    came[nxt] = (node, step)
                    heapq.heappush(frontier, (new + _dist(self.nodes[nxt], goal_xyz), new, nxt))
        return None

    def nearest(self, xy: Sequence[float]) -> int:
        """The segment whose chord passes closest to a point (a fallback for locating key points)."""
        p = np.asarray(xy[:2], float)
        a = np.array([s.start[:2] for s in self.segments])
        ab = np.array([s.end[:2] for s in self.segments]) - a
        t = np.clip(((p - a) * ab).sum(1) / np.maximum((ab**2).sum(1), 1e-9), 0.0, 1.0)
        return int(np.argmin(np.hypot(*(a + t[:, None] * ab - p).T)))


def _dist(p, q) -> float:
    return math.dist(p, q)


def blend(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A lane change: from polyline `a` to the parallel polyline `b`, moving across in the middle half."""
    n = max(len(a), len(b), 2)
    a, b = _n_points(resample(a, 1.0), n), _n_points(resample(b, 1.0), n)
    t = np.linspace(0.0, 1.0, n)
    w = np.clip((t - 0.25) / 0.5, 0.0, 1.0)
    w = w * w * (3 - 2 * w)  # smoothstep: no kink where the change starts and ends
    return (1 - w)[:, None] * a + w[:, None] * b


def _n_points(points: np.ndarray, n: int) -> np.ndarray:
    arc = np.concatenate(([0.0], np.cumsum(np.hypot(*np.diff(points, axis=0).T))))
    s = np.linspace(0.0, arc[-1], n)
    return np.stack((np.interp(s, arc, points[:, 0]), np.interp(s, arc, points[:, 1])), axis=1)


def plan_route(graph: LaneGraph, keypoints: Sequence[Sequence[float]], located: Sequence[int],
               path_of: Callable[[int], np.ndarray]) -> list[tuple[float, float, str]]:
    """Join consecutive key points lane by lane: (x, y, road option) points from the first to the last.

    located[k]: the segment holding key point k. path_of(i): segment i sampled as an (n, 2) polyline.
    """
    out: list[tuple[float, float, str]] = []
    for k in range(len(keypoints) - 1):
        i, j = located[k], located[k + 1]
        a, b = np.asarray(keypoints[k][:2], float), np.asarray(keypoints[k + 1][:2], float)
        ahead = i == j and _nearest_index(path_of(i), b) >= _nearest_index(path_of(i), a)
        if ahead:
            steps = [Step(_turn(graph.segments[i]), i)]
        else:
            # Like the GlobalRoutePlanner: search from the start of the key point's segment (so a lane
            # change out of it is possible) to the start of the target's segment, then follow that one.
            # When both lie on one segment with the target behind, go round: leave the segment first.
            start = graph.end_node[i] if i == j else graph.start_node[i]
            middle = graph.search(start, graph.start_node[j])
            last_step = [Step(_turn(graph.segments[j]), j)]
            if middle is None:  # the target may only be reachable by changing into its lane
                middle, last_step = graph.search(start, graph.end_node[j]), []
            if not middle and not last_step:
                raise ValueError(f"no lane path from route key point {k} ({a[0]:.1f}, {a[1]:.1f}) to key point "
                                 f"{k + 1} ({b[0]:.1f}, {b[1]:.1f}) on this map")
            steps = ([Step(_turn(graph.segments[i]), i)] if i == j else []) + middle + last_step
        pieces, options = [], []
        for step in steps:
            piece = path_of(step.a) if step.b is None else blend(path_of(step.a), path_of(step.b))
            pieces.append(piece)
            options += [step.option] * len(piece)
        points = np.concatenate(pieces)
        first = _nearest_index(pieces[0], a)
        last = len(points) - len(pieces[-1]) + _nearest_index(pieces[-1], b)
        last = max(last, first)  # defensive: the search above never puts the target behind the start
        chunk = [(float(x), float(y), o) for (x, y), o in zip(points[first:last + 1], options[first:last + 1])]
        out += chunk[1:] if out else chunk
    return _drop_repeats(out)


def _nearest_index(points: np.ndarray, p: np.ndarray) -> int:
    return int(np.argmin(np.hypot(points[:, 0] - p[0], points[:, 1] - p[1])))


def _drop_repeats(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    kept = points[:1]
    for p in points[1:]:
        if math.hypot(p[0] - kept[-1][0], p[1] - kept[-1][1]) > 0.05:
            kept.append(p)
    return kept


# -- the carla.Map side ----------------------------------------------------------------------------
def topology_segments(carla_map, api: Any) -> tuple[list[LaneSegment], list[tuple[Any, Any]]]:
    """LaneSegments from `carla_map.get_topology()`, and the (entry, exit) waypoints of each."""
    pairs = list(carla_map.get_topology())
    index = {(w.road_id, w.section_id, w.lane_id): i for i, (w, _) in enumerate(pairs)}
    driving = int(api.LaneType.Driving)
    segments = []
    for entry, exit_ in pairs:
        neighbours = {}
        for side, bit, get in (("left", 2, entry.get_left_lane), ("right", 1, entry.get_right_lane)):
            other = get() if int(entry.lane_change) & bit else None  # LaneChange: Right = 1, Left = 2
            if (other is not None and int(other.lane_type) & driving and other.lane_id * entry.lane_id > 0):
                neighbours[side] = index.get((other.road_id, other.section_id, other.lane_id))
        a, b = entry.transform, exit_.transform
        segments.append(LaneSegment(
            key=(entry.road_id, entry.section_id, entry.lane_id),
            start=(a.location.x, a.location.y, a.location.z), end=(b.location.x, b.location.y, b.location.z),
            start_yaw=a.rotation.yaw, end_yaw=b.rotation.yaw, junction=bool(entry.is_junction), **neighbours))
    return segments, pairs


def sample_lane(entry, exit_, spacing: float = ROUTE_SPACING, max_length_m: float = 5000.0) -> np.ndarray:
    """(x, y) every `spacing` metres from `entry` to `exit_` along the lane (Waypoint.next)."""
    end = exit_.transform.location
    w, points = entry, [(entry.transform.location.x, entry.transform.location.y)]
    for _ in range(int(max_length_m / spacing)):
        if w.transform.location.distance(end) <= spacing:
            break
        candidates = w.next(spacing)
        if not candidates:
            break
        w = min(candidates, key=lambda c: c.transform.location.distance(end))  # stay on this segment
        points.append((w.transform.location.x, w.transform.location.y))
    points.append((end.x, end.y))
    return np.array(points, float)


def densify(carla_map, waypoints: Sequence[Sequence[float]], spacing: float = ROUTE_SPACING,
            api: Any = None) -> list[tuple[float, float, str]]:
    """The route through the key `waypoints` (x, y, z), lane by lane, as (x, y, road option) points."""
    if api is None:
        import carla as api  # noqa: PLC0415 -- lazy: the carla extra is optional
    segments, pairs = topology_segments(carla_map, api)
    if not segments:
        raise ValueError("the map has no topology (no driving lanes)")
    graph = LaneGraph(segments)
    index = {s.key: i for i, s in enumerate(segments)}
    located = []
    for x, y, z in waypoints:
        w = carla_map.get_waypoint(api.Location(x=float(x), y=float(y), z=float(z)))
        key = (w.road_id, w.section_id, w.lane_id) if w is not None else None
        located.append(index[key] if key in index else graph.nearest((x, y)))
    paths: dict[int, np.ndarray] = {}

    def path_of(i: int) -> np.ndarray:
        if i not in paths:
            paths[i] = sample_lane(*pairs[i], spacing=spacing)
        return paths[i]

    return plan_route(graph, waypoints, located, path_of)
