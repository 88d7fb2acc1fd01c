"""What is read off a CARLA world: what never moves (stop lines, stop signs), the state each step
(`WorldReader`), and the route's weather.

`WorldReader` reads the ego, the vehicles and walkers around it, the light ahead and whether the ego is
outside the route's lanes, in one snapshot per call; agents/leaderboard_agent.py shares it inside the
official evaluator. `RouteWeather` applies the route file's weather as the ego advances.
"""
from __future__ import annotations

import math

import numpy as np

from prunedrive.harness.action import Control
from prunedrive.harness.backends.base import BackendState
from prunedrive.harness.observation import PEDESTRIAN_RANGE_M, VEHICLE_RANGE_M, EgoState, WorldObjects
from prunedrive.harness.route import RoutePolyline, project_points

STOP_BOX_SCALE = 1.2          # RunningStopTest's trigger volume multiplier
TRAFFIC_LIGHT_RANGE_M = 50.0  # the observation reports a light this far ahead along the route
ROUTE_LIGHT_MATCH_M = 2.5     # a stop waypoint this close to the route belongs to it


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
    near = np.flatnonzero(min_distance(stops[:, :2], path.points) < ROUTE_LIGHT_MATCH_M + 2.0)
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


class RouteWeather:
    """The route's weather, applied at each whole percent of progress (RouteWeatherBehavior). `route` is the
    route file's RouteSpec; a new one applies its weather at the first `update` whatever the percentage."""

    def __init__(self, api, route):
        self.carla, self.route = api, route
        self.percent = -1

    def update(self, world, percentage: float) -> None:
        whole = int(min(max(percentage, 0.0), 100.0))
        if whole == self.percent:
            return
        self.percent = whole
        weather = self.carla.WeatherParameters()
        for name, value in self.route.weather_at(whole).items():
            if hasattr(weather, name):
                setattr(weather, name, value)
        world.set_weather(weather)


def min_distance(points: np.ndarray, path: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Distance from each point to the nearest path vertex, in chunks (big towns have many points)."""
    out = np.empty(len(points))
    for i in range(0, len(points), chunk):
        p = points[i:i + chunk]
        out[i:i + chunk] = np.hypot(p[:, None, 0] - path[None, :, 0], p[:, None, 1] - path[None, :, 1]).min(axis=1)
    return out
