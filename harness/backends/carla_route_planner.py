"""A route's key points joined lane by lane on a CARLA map: a small A* route planner.

Densification follows the Leaderboard's ``interpolate_trajectory`` (GlobalRoutePlanner between
consecutive key points) with our own small planner, because the PyPI ``carla`` wheel has no
``agents`` package: the map's topology (one segment per lane of a road section) becomes a graph,
A* joins consecutive key points lane by lane, and each used segment is sampled with
``Waypoint.next``. The graph search and the geometry are plain Python/numpy (``LaneSegment``,
``LaneGraph``, ``plan_route``) so they are testable without a simulator; only ``densify`` talks to
a ``carla.Map``. The route files themselves are carla_route_xml.py.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from prunedrive.harness.route import resample

ROUTE_SPACING = 1.0  # m between densified points, as the Leaderboard's interpolate_trajectory

# Road options, named as agents.navigation.local_planner.RoadOption (lower case).
LANEFOLLOW, LEFT, RIGHT, STRAIGHT = "lanefollow", "left", "right", "straight"
CHANGELANELEFT, CHANGELANERIGHT = "changelaneleft", "changelaneright"
TURN_THRESHOLD_DEG = 30.0       # a junction segment turning less than this is "straight"
LANE_CHANGE_PENALTY_M = 5.0     # prefer staying in lane when a lane change gains nothing


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
