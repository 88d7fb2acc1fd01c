"""highway-env's road and road network, the same trajectories bit for bit, with their hottest loops cheaper.

Under cProfile, an expert drive of the standard suite spent ~30% of the simulator's time in
`RoadNetwork.get_closest_lane_index` (every vehicle, every frame: one Python call per lane of the network),
~22% in `Road.neighbour_vehicles` (every IDM vehicle, every frame, for its lane and the lanes it may change
to: one Python call per road user) and ~13% in `Road.step`'s all-pairs collision test (one call per pair,
most of them far apart); with these classes the drive takes about half the time. Each is answered by one
vectorised pass that only rules out what the original would rule out too, and the original code decides
everything that is left:

- `FastRoadNetwork.get_closest_lane_index`: the distance of every lane at once, in float64 numpy. It can
  differ from the original per-lane arithmetic by a few ulps (vectorised sin/arctan2, another summation
  order), far below `LANE_TOLERANCE_M`; where a circular lane's angle sits at its wrap-around (a
  discontinuity, where a few ulps decide between two very different values), or for a lane type it does
  not know, that lane's distance is the original's own. Every lane within `LANE_TOLERANCE_M` of the
  smallest distance then gets the original `distance_with_heading`, in the original order, and the first
  minimum wins, as in `np.argmin`. The true closest lane is always among them, so the answer is the same.
  `FastRoad.step` asks it once per frame for all vehicles, after their steps (see `_step_vehicles`).
- `FastRoad.neighbour_vehicles`: the lane coordinates of every road user at once, sorted, kept per lane for
  the act phase (nothing moves there); the original loop body then runs, in the original order, on the
  users that could be the front or rear vehicle (see there).
- `FastRoad.step`: the same vehicle steps, then the same `handle_collisions` calls in the same order,
  except for the pairs whose centres are, by a relative margin of 1e-9, farther apart than the original's
  own spherical pre-check allows: for those the original returns "no collision" and changes nothing.
  Pairs with a user whose class overrides the collision test are always checked.

- `FastRegulatedRoad`: the intersection's right-of-way rules (`RegulatedRoad`), each road user's 3 s
  prediction made once per round instead of once per pair, and a plain kinematic vehicle's without the deep
  copy of the whole road (see there).

`speed_up(road)` switches an existing road (and its network) to these classes in place; the state, the
vehicles and the random generator stay the same objects.
"""
from __future__ import annotations

import copy

import numpy as np
from highway_env import utils as hw_utils
from highway_env.road.lane import CircularLane, SineLane, StraightLane
from highway_env.road.regulation import RegulatedRoad
from highway_env.road.road import Road, RoadNetwork
from highway_env.vehicle.behavior import IDMVehicle
from highway_env.vehicle.kinematics import Vehicle
from highway_env.vehicle.objects import Landmark, RoadObject

LANE_TOLERANCE_M = 1e-6  # distances are sums of a few float64 terms of < 1e4 m: their rounding is < 1e-9
NEIGHBOUR_TOLERANCE_M = 1e-6  # the same bound, for lane coordinates
_WRAP_MARGIN = 1e-6      # a circular lane's angle this close to +-pi is computed the original way
_COLLISION_MARGIN = 1e-9


_KINEMATIC_STEPS = (Vehicle.step, IDMVehicle.step)  # steps that read no road state besides on_state_update


def _skip() -> None:
    pass


def _wrap_to_pi(x):
    return ((x + np.pi) % (2 * np.pi)) - np.pi  # highway_env.utils.wrap_to_pi, on arrays


class _LaneTable:
    """Lanes as arrays, in the order given (for a network: `graph` order, the order of the original loop)."""

    def __init__(self, lanes: list, indexes: list | None = None):
        self.lanes, self.indexes = list(lanes), indexes
        kinds = [type(lane) for lane in self.lanes]
        self.straight = np.array([k in (StraightLane, SineLane) for k in kinds], dtype=bool)[:, None]
        self.circular = np.array([k is CircularLane for k in kinds], dtype=bool)[:, None]
        self.other = np.flatnonzero(~(self.straight | self.circular)[:, 0])  # the original's own arithmetic

        def column(name, default=0.0, kind=None):
            return np.array([float(getattr(lane, name)) if (kind is None or type(lane) in kind) else default
                             for lane in self.lanes], dtype=np.float64)[:, None]

        def points(name, kind):
            return np.array([np.asarray(getattr(lane, name), dtype=np.float64) if type(lane) in kind
                             else np.zeros(2) for lane in self.lanes], dtype=np.float64).reshape(-1, 2)[:, None, :]

        straight, circular = (StraightLane, SineLane), (CircularLane,)
        self.length = column("length", kind=straight + circular)
        self.start, self.dir = points("start", straight), points("direction", straight)
        self.lateral = points("direction_lateral", straight)
        self.heading = column("heading", kind=straight)
        self.amplitude, self.phase = column("amplitude", kind=(SineLane,)), column("phase", kind=(SineLane,))
        self.pulsation = column("pulsation", kind=(SineLane,))
        self.center = points("center", circular)
        self.radius = column("radius", default=1.0, kind=circular)
        self.start_phase = column("start_phase", kind=circular)
        self.turn = column("direction", kind=circular)  # +1 clockwise, -1 counter-clockwise
        self.any_straight, self.any_circular = bool(self.straight.any()), bool(self.circular.any())
        self.any_sine = bool(np.any(self.amplitude != 0))

    @classmethod
    def of_network(cls, network: RoadNetwork) -> _LaneTable:
        indexes, lanes = [], []
        for _from, to_dict in network.graph.items():
            for _to, to_lanes in to_dict.items():
                for _id, lane in enumerate(to_lanes):
                    indexes.append((_from, _to, _id))
                    lanes.append(lane)
        return cls(lanes, indexes)

    def coordinates(self, positions: np.ndarray):
        """`local_coordinates` of P positions on each of the L lanes, (L, P) each, to within rounding of the
        original's; `unsure` marks where that does not hold (a circular lane's angle at its wrap-around,
        where a few ulps decide between two very different values), and `wave` feeds `heading_at`."""
        s = r = wave = angle = None
        if self.any_straight:
            delta = positions[None, :, :] - self.start
            s = delta[..., 0] * self.dir[..., 0] + delta[..., 1] * self.dir[..., 1]
            r = delta[..., 0] * self.lateral[..., 0] + delta[..., 1] * self.lateral[..., 1]
            if self.any_sine:
                wave = self.pulsation * s + self.phase
                r = r - self.amplitude * np.sin(wave)
        if self.any_circular:
            from_center = positions[None, :, :] - self.center
            angle = _wrap_to_pi(np.arctan2(from_center[..., 1], from_center[..., 0]) - self.start_phase)
            s_circular = self.turn * angle * self.radius
            r_circular = self.turn * (self.radius - np.hypot(from_center[..., 0], from_center[..., 1]))
            s = s_circular if s is None else np.where(self.circular, s_circular, s)
            r = r_circular if r is None else np.where(self.circular, r_circular, r)
        if s is None:  # no lane of a known type: the caller uses the original's arithmetic for all
            s = r = np.zeros((len(self.lanes), len(positions)))
        unsure = self.circular & (np.abs(angle) > np.pi - _WRAP_MARGIN) if angle is not None \
            else np.zeros(s.shape, dtype=bool)
        return s, r, unsure, wave

    def distances(self, positions: np.ndarray, headings: np.ndarray | None) -> np.ndarray:
        """`distance_with_heading` of every lane (rows) from every position (columns; headings: one per position,
        or None), to within LANE_TOLERANCE_M of the original's."""
        s, r, unsure, wave = self.coordinates(positions)
        distance = np.abs(r) + np.maximum(s - self.length, 0.0) + np.maximum(-s, 0.0)
        if headings is not None:
            straight_heading = self.heading if wave is None else \
                self.heading + np.arctan(self.amplitude * self.pulsation * np.cos(wave))
            lane_heading = np.where(self.circular, self.turn * s / self.radius + self.start_phase
                                    + np.pi / 2 * self.turn, straight_heading)
            distance = distance + np.abs(_wrap_to_pi(headings[None, :] - lane_heading))
        # Lanes of other types, and circular ones at their wrap-around (disjoint sets): the original's own.
        exact = [(k, p) for k in self.other for p in range(len(positions))]
        if self.any_circular:
            exact += list(zip(*np.nonzero(unsure)))
        for k, p in exact:
            distance[k, p] = self.lanes[k].distance_with_heading(positions[p], None if headings is None else headings[p])
        return distance

    def closest(self, positions: np.ndarray, headings: np.ndarray | None) -> list | None:
        """The original `get_closest_lane_index` of each position (module docstring), or None on NaNs."""
        approx = self.distances(positions, headings)
        near = approx <= approx.min(axis=0) + LANE_TOLERANCE_M
        counts = near.sum(axis=0)
        if not counts.all():  # NaNs: let the original decide
            return None
        answer = []
        for p, count in enumerate(counts):
            if count == 1:
                answer.append(self.indexes[int(np.argmax(near[:, p]))])
                continue
            candidates = np.flatnonzero(near[:, p])
            heading = None if headings is None else headings[p]
            exact = [self.lanes[k].distance_with_heading(positions[p], heading) for k in candidates]
            answer.append(self.indexes[candidates[int(np.argmin(exact))]])
        return answer


class FastRoadNetwork(RoadNetwork):
    """`RoadNetwork` whose closest-lane search is vectorised; the same lane index, always (module docstring).
    Its lane table is rebuilt when `add_lane` is called; a network edited otherwise (its `graph` directly,
    or a lane's geometry in place) must not be switched to this class."""

    _table: _LaneTable | None = None

    def add_lane(self, _from: str, _to: str, lane) -> None:
        self._table = None
        super().add_lane(_from, _to, lane)

    def get_closest_lane_index(self, position: np.ndarray, heading: float | None = None):
        found = self.closest_lane_indexes(np.asarray(position, dtype=np.float64)[None, :],
                                          None if heading is None else np.array([heading], dtype=np.float64))
        return super().get_closest_lane_index(position, heading) if found is None else found[0]

    def closest_lane_indexes(self, positions: np.ndarray, headings: np.ndarray | None) -> list | None:
        """`get_closest_lane_index` of P positions (P, 2) at once (headings (P,) or None); None where the
        vectorised pass cannot decide (NaNs, no lanes): ask the original then."""
        if self._table is None:
            self._table = _LaneTable.of_network(self)
        return self._table.closest(positions, headings) if self._table.lanes else None


def _plain_collision_test(user) -> bool:
    cls = type(user)
    return cls.handle_collisions is RoadObject.handle_collisions and cls._is_colliding is RoadObject._is_colliding


class FastRoad(Road):
    """`Road` whose collision loop and neighbour search do the original's work on fewer candidates
    (module docstring)."""

    _act_users: tuple | None = None  # during act(): the road users and their positions, which act() never moves
    _act_lanes: dict | None = None   # during act(): id(lane) -> the users' coordinates on it (_on_lane)
    _lane_tables: dict | None = None

    def act(self) -> None:
        self._act_users, self._act_lanes = self._users(), {}
        try:
            super().act()
        finally:
            self._act_users = self._act_lanes = None

    def step(self, dt: float) -> None:
        self._step_vehicles(dt)
        vehicles, others = self.vehicles, self.vehicles + self.objects
        may_collide = self._may_collide(vehicles, others, dt)
        for i, vehicle in enumerate(vehicles):
            for j in range(i + 1, len(vehicles)):
                if may_collide[i, j]:
                    vehicle.handle_collisions(vehicles[j], dt)
            for j in range(len(vehicles), len(others)):
                if may_collide[i, j]:
                    vehicle.handle_collisions(others[j], dt)

    def _step_vehicles(self, dt: float) -> None:
        """Each vehicle's `step`, in order, as the original; for vehicles whose step is highway-env's own
        kinematics, the lane search that ends it (`on_state_update`) runs after the loop for all of them at
        once (FastRoadNetwork.closest_lane_indexes), when every vehicle's step is one of those. Their steps
        read no other vehicle's lane, so the lanes found are the same, and each is set before anything else
        reads it."""
        network = self.network
        # Only when every vehicle qualifies: another class's step might read a lane set earlier in the loop.
        deferred = list(self.vehicles)
        if (not isinstance(network, FastRoadNetwork) or len(deferred) < 2
                or len({id(v) for v in deferred}) != len(deferred)
                or not all(type(v).step in _KINEMATIC_STEPS and type(v).on_state_update is Vehicle.on_state_update
                           and "on_state_update" not in vars(v) and v.road is self for v in deferred)):
            deferred = []
        for vehicle in deferred:
            vehicle.on_state_update = _skip  # an instance attribute, removed below
        try:
            for vehicle in self.vehicles:
                vehicle.step(dt)
        finally:
            for vehicle in deferred:
                del vehicle.on_state_update
        if not deferred:
            return
        positions = np.array([np.asarray(v.position, dtype=np.float64) for v in deferred]).reshape(-1, 2)
        headings = np.array([float(v.heading) for v in deferred], dtype=np.float64)
        found = network.closest_lane_indexes(positions, headings)
        for k, vehicle in enumerate(deferred):
            if found is None:
                vehicle.on_state_update()
                continue
            vehicle.lane_index = found[k]  # from here on, Vehicle.on_state_update's body
            vehicle.lane = network.get_lane(vehicle.lane_index)
            if self.record_history:
                vehicle.history.appendleft(vehicle.create_from(vehicle))

    def _users(self) -> tuple[list, np.ndarray]:
        users = [u for u in self.vehicles + self.objects if not isinstance(u, Landmark)]
        return users, np.array([np.asarray(u.position, dtype=np.float64) for u in users]).reshape(-1, 2)

    def neighbour_vehicles(self, vehicle, lane_index=None):
        """`Road.neighbour_vehicles`, the same answer: the front vehicle is the last in order of those on the
        lane with the smallest s_v >= s, the rear one the first with the largest s_v < s. A vectorised pass
        keeps every user that could be either (within NEIGHBOUR_TOLERANCE_M of every test it takes), and
        the original loop body decides among them, in the original order, with the original arithmetic."""
        lane_index = lane_index or vehicle.lane_index
        if not lane_index or self.neighbour_vehicles_connected_lanes:
            return super().neighbour_vehicles(vehicle, lane_index)
        lane = self.network.get_lane(lane_index)
        if type(lane) not in (StraightLane, SineLane, CircularLane):
            return super().neighbour_vehicles(vehicle, lane_index)
        users, positions = self._act_users or self._users()
        order, sorted_s, sorted_on, unsure = self._on_lane(lane, positions)
        s = lane.local_coordinates(vehicle.position)[0]
        tol = NEIGHBOUR_TOLERANCE_M
        # The nearest users surely on the lane and surely ahead / behind bound where the answers can be.
        ahead = int(np.searchsorted(sorted_s, s + tol, "left"))
        behind = int(np.searchsorted(sorted_s, s - tol, "left"))
        first_on = ahead + int(np.argmax(sorted_on[ahead:])) if sorted_on[ahead:].any() else None
        last_on = int(np.flatnonzero(sorted_on[:behind])[-1]) if sorted_on[:behind].any() else None
        nearest_ahead = sorted_s[first_on] if first_on is not None else np.inf
        nearest_behind = sorted_s[last_on] if last_on is not None else -np.inf
        front = order[behind:int(np.searchsorted(sorted_s, nearest_ahead + 2 * tol, "right"))]
        rear = order[int(np.searchsorted(sorted_s, nearest_behind - 2 * tol, "left")):ahead]
        contenders = sorted(set(front.tolist()) | set(rear.tolist()) | set(unsure.tolist()))
        s_front = s_rear = v_front = v_rear = None
        for k in contenders:  # in the original order
            v = users[k]
            if v is vehicle:
                continue
            # From here on, Road.neighbour_vehicles's loop body for one lane, as it is.
            s_k, lat_k = lane.local_coordinates(v.position)
            if not lane.on_lane(v.position, s_k, lat_k, margin=1):
                continue
            if s <= s_k and (s_front is None or s_k <= s_front):
                s_front, v_front = s_k, v
            if s_k < s and (s_rear is None or s_k > s_rear):
                s_rear, v_rear = s_k, v
        return v_front, v_rear

    def _on_lane(self, lane, positions: np.ndarray) -> tuple:
        """The road users that may be on `lane` (not surely off it), sorted by their approximate s: their
        indexes, s, and whether each is surely on the lane; and the users whose coordinates are unsure (a
        circular lane's wrap-around). Within act() the answer is kept per lane: positions do not change there."""
        cached = self._act_lanes.get(id(lane)) if self._act_lanes is not None else None
        if cached is not None and cached[0] is lane:
            return cached[1]
        if self._lane_tables is None:
            self._lane_tables = {}
        table = self._lane_tables.get(id(lane))
        if table is None or table.lanes[0] is not lane:
            table = self._lane_tables[id(lane)] = _LaneTable([lane])
        s_v, lat_v, unsure, _ = table.coordinates(positions)
        s_v, lat_v, unsure = s_v[0], np.abs(lat_v[0]), unsure[0]
        tol, reach = NEIGHBOUR_TOLERANCE_M, lane.VEHICLE_LENGTH
        half_width = lane.width / 2 + 1  # on_lane(margin=1); these lane types have one width
        off = (lat_v > half_width + tol) | (s_v < -reach - tol) | (s_v >= lane.length + reach + tol)
        on = (lat_v <= half_width - tol) & (s_v >= -reach + tol) & (s_v < lane.length + reach - tol)
        if table.any_circular:
            on &= ~unsure
            off &= ~unsure
        # Users not surely off, sorted by s (ties in the original order); the unsure ones are always checked.
        maybe = np.flatnonzero(~off)
        order = maybe[np.argsort(s_v[maybe], kind="stable")]
        answer = (order, s_v[order], on[order], np.flatnonzero(unsure) if table.any_circular else order[:0])
        if self._act_lanes is not None:
            self._act_lanes[id(lane)] = (lane, answer)
        return answer

    @staticmethod
    def _may_collide(vehicles: list, others: list, dt: float) -> np.ndarray:
        """[i, j]: False only where RoadObject._is_colliding's spherical pre-check surely says "apart"."""
        if not vehicles or not others:
            return np.ones((len(vehicles), len(others)), dtype=bool)
        positions = np.array([np.asarray(u.position, dtype=np.float64) for u in others]).reshape(-1, 2)
        offsets = positions[None, :, :] - positions[:len(vehicles), None, :]
        squared = offsets[..., 0] * offsets[..., 0] + offsets[..., 1] * offsets[..., 1]
        diagonals = np.array([float(u.diagonal) for u in others])
        speeds = np.array([float(v.speed) for v in vehicles])
        reach = np.maximum((diagonals[:len(vehicles), None] + diagonals[None, :]) / 2 + speeds[:, None] * dt, 0.0)
        apart = squared > reach * reach * (1.0 + _COLLISION_MARGIN)
        plain = np.array([_plain_collision_test(u) for u in others])
        return ~(apart & plain[:len(vehicles), None] & plain[None, :])


def speed_up(road: Road, fast_roads: dict[type, type]) -> None:
    """Switch a road built by an env's `_make_road` to its fast class ({highway-env class: ours}) and its
    network to `FastRoadNetwork`, in place. Only exact highway-env types are switched: a subclass may have
    changed what the fast classes assume."""
    if type(road.network) is RoadNetwork:
        road.network.__class__ = FastRoadNetwork
    if type(road) in fast_roads:
        road.__class__ = fast_roads[type(road)]


# Prediction of a plain kinematic vehicle (the ego, walkers) is safe to run on a shallow stand-in when every
# method that runs is one of these: none of them reads the vehicle's road except through on_state_update,
# which does nothing on a vehicle without a road.
_KINEMATIC_PREDICTION = {"predict_trajectory_constant_speed": Vehicle.predict_trajectory_constant_speed,
                         "step": Vehicle.step, "clip_actions": Vehicle.clip_actions,
                         "on_state_update": Vehicle.on_state_update}


def reads_no_road(act):
    """Mark a road user class's `act` that, like `Vehicle.act`, reads no road state (the embedded backend's
    walkers): a user with it and Vehicle's own prediction methods is predicted without the deep copy."""
    act.reads_no_road = True
    return act


def _predict_kinematic(vehicle: Vehicle, times: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """`Vehicle.predict_trajectory_constant_speed`, bit for bit, without `copy.deepcopy(vehicle)`.

    The original deep-copies the vehicle, which drags its road along: the road network, every other
    vehicle and the random generator; then each of the 11 predicted steps runs `on_state_update` on the
    copy, a closest-lane search over the whole network (together ~7 ms a prediction under cProfile). Neither
    feeds the prediction: `Vehicle.step` moves position, heading and speed from the action, the speed,
    `crashed` and `impact` only, and the lane it finds is never read again. Here the copy is shallow
    (`copy.copy`) with its own position array (the one value `step` updates in place) and no road (so
    `on_state_update` skips the lane search), and the same `act`/`step` code runs on it: the same
    floating-point operations in the same order on the same inputs, so the same positions and headings.
    """
    if vehicle.prediction_type == "zero_steering":
        action = {"acceleration": 0.0, "steering": 0.0}
    elif vehicle.prediction_type == "constant_steering":
        action = {"acceleration": 0.0, "steering": vehicle.action["steering"]}
    else:
        raise ValueError("Unknown predition type")
    dt = np.diff(np.concatenate(([0.0], times)))
    ghost = copy.copy(vehicle)
    ghost.road = None
    ghost.position = vehicle.position.copy()
    ghost.action = dict(vehicle.action)
    for name in ("heading", "speed"):  # a 0-d array would be updated in place: give the copy its own
        if isinstance(getattr(vehicle, name), np.ndarray):
            setattr(ghost, name, getattr(vehicle, name).copy())
    ghost.act(action)
    positions, headings = [], []
    for t in dt:
        ghost.step(t)
        positions.append(ghost.position.copy())
        headings.append(ghost.heading)
    return positions, headings


def _has_kinematic_prediction(vehicle) -> bool:
    cls = type(vehicle)
    act = getattr(cls, "act", None)
    return (all(getattr(cls, name, None) is method for name, method in _KINEMATIC_PREDICTION.items())
            and (act is Vehicle.act or getattr(act, "reads_no_road", False)))


class FastRegulatedRoad(RegulatedRoad, FastRoad):
    """highway-env's intersection road (`RegulatedRoad`) with the same right-of-way rules, computed cheaper.

    `enforce_road_rules` asks `is_conflict_possible` about every pair of road users, and each call
    predicts both users' next 3 s from scratch: a user's prediction is made n - 1 times per round, and for
    a plain kinematic vehicle (the ego, walkers) each one deep-copies the whole road. This was ~80% of an
    intersection step's time. The equivalence, piece by piece:

    - Each user's prediction is computed once per `enforce_road_rules` round and reused for all its pairs.
      Predictions are pure functions of the users' position, heading, speed, action, crash state, lane and
      route, and nothing in the round changes those: resolving a conflict only sets the yielding user's
      target speed, colour and yield timer, which no prediction reads.
    - A plain kinematic vehicle's prediction runs without the deep copy (`_predict_kinematic`). Other users
      (IDM traffic) use their own `predict_trajectory_constant_speed`, unchanged.
    - The pair test keeps the original's order and arithmetic: for each predicted time it does the same
      `np.linalg.norm(...) > v1.LENGTH` pre-check and the same `rotated_rectangles_intersect` call, and
      answers at the first time that intersects. Before that, one vectorised pass over all pairs and times
      drops the times whose squared distance exceeds LENGTH**2 by a relative 1e-9: the original's norm
      differs from that by a few ulps (1e-16) at most, so it would have skipped them too. NaNs are kept.
    Anything off that path (another horizon or step, a user not in the round, predictions of unequal
    length or not float64 2-vectors) falls back to `RegulatedRoad.is_conflict_possible` itself.
    Its `step` is `FastRoad.step` (highway_fast.py) once the right-of-way is enforced.
    """

    _round: dict | None = None  # during enforce_road_rules: id(user) -> index, and the pair candidates

    def enforce_road_rules(self) -> None:
        self._round = self._predict_round(self.vehicles)
        try:
            super().enforce_road_rules()
        finally:
            self._round = None

    @staticmethod
    def _predict_round(users: list, horizon: int = 3, step: float = 0.25) -> dict | None:
        if len(users) < 2:
            return None
        times = np.arange(step, horizon, step)
        predictions = [_predict_kinematic(u, times) if _has_kinematic_prediction(u)
                       else u.predict_trajectory_constant_speed(times) for u in users]
        if len({len(p[0]) for p in predictions} | {len(p[1]) for p in predictions}) != 1:
            return None
        if not all(isinstance(x, np.ndarray) and x.dtype == np.float64 and x.shape == (2,)
                   for p in predictions for x in p[0]):
            return None  # the pre-check below reasons about float64 arithmetic only
        positions = np.array([p[0] for p in predictions], dtype=np.float64)  # (n, T, 2)
        offsets = positions[None, :, :, :] - positions[:, None, :, :]  # [i, j, t] = p_j(t) - p_i(t)
        squared = offsets[..., 0] * offsets[..., 0] + offsets[..., 1] * offsets[..., 1]
        lengths = np.array([float(u.LENGTH) for u in users])
        bound = (lengths * lengths * (1.0 + 1e-9))[:, None, None]
        candidates = ~(squared > bound)  # times at which the original's pre-check may pass
        return {"index": {id(u): k for k, u in enumerate(users)}, "predictions": predictions,
                "candidates": candidates, "horizon": horizon, "step": step}

    def is_conflict_possible(self, v1, v2, horizon: int = 3, step: float = 0.25) -> bool:
        r = self._round
        i = j = None
        if r is not None and (horizon, step) == (r["horizon"], r["step"]):
            i, j = r["index"].get(id(v1)), r["index"].get(id(v2))
        if i is None or j is None:
            return RegulatedRoad.is_conflict_possible(v1, v2, horizon, step)
        positions_1, headings_1 = r["predictions"][i]
        positions_2, headings_2 = r["predictions"][j]
        for t in np.flatnonzero(r["candidates"][i, j]):
            position_1, heading_1 = positions_1[t], headings_1[t]
            position_2, heading_2 = positions_2[t], headings_2[t]
            # From here on, RegulatedRoad.is_conflict_possible's loop body, as it is.
            if np.linalg.norm(position_2 - position_1) > v1.LENGTH:
                continue
            if hw_utils.rotated_rectangles_intersect(
                (position_1, 1.5 * v1.LENGTH, 0.9 * v1.WIDTH, heading_1),
                (position_2, 1.5 * v2.LENGTH, 0.9 * v2.WIDTH, heading_2),
            ):
                return True
        return False
