"""A STAND-IN for the subset of the `carla` 0.9.16 Python API that harness/backends/carla.py uses.

This is not CARLA. It lets the backend's lifecycle, ticking, cleanup and criteria be tested on a
machine without a simulator. Classes and methods are named as in `carla` and take the same
parameter names (tests/test_carla_backend.py checks every public member here against the real
package and its `libcarla.pyi` stubs, so the two cannot drift). What it simulates:

- "StandinTown": road 1 runs east from x=0 to x=200 with two eastbound lanes (-1 at y=1.75,
  -2 at y=5.25), one westbound lane (1, y=-1.75) and a sidewalk (-3, y=8.75); a junction where
  lane -1 goes straight on to road 2 (east to x=400) and lane -2 turns right (radius 20 m) onto
  road 3 (south, +y, 150 m); road 2 has a westbound lane back. CARLA frame: x forward/east, y right.
- a traffic light (stop line at x=197 on lanes -1 and -2 of road 1; its state changes only through
  `set_state`), and a stop sign whose trigger volume covers x 385..391 of road 2's lane -1;
- kinematic vehicles (a bicycle model for controlled ones, lane following at 8 m/s under
  autopilot), walkers walking to their AI controller's target, static props;
- collision sensors that fire every tick while two bounding boxes overlap (as CARLA's re-fire during
  contact), lane-invasion sensors, RGB cameras that deliver a small BGRA image each tick.

Test controls are on `StandinServer` (not part of the carla API): `hang()` makes every call time out
like a dead server, `crash_after_ticks(n)`, `collide(actor, other)` injects a collision event, and
the server logs batches, ticks and misuse (`warnings`).
"""
from __future__ import annotations

import fnmatch
import math
from enum import IntEnum, IntFlag

import numpy as np

TOWN = "StandinTown"


# -- value types -----------------------------------------------------------------------------------
class Vector3D:
    def __init__(self, x=0.0, y=0.0, z=0.0):
        self.x, self.y, self.z = float(x), float(y), float(z)

    def length(self):
        return math.sqrt(self.x**2 + self.y**2 + self.z**2)

    def distance(self, vector):
        return math.dist((self.x, self.y, self.z), (vector.x, vector.y, vector.z))

    def __add__(self, other):
        return type(self)(self.x + other.x, self.y + other.y, self.z + other.z)

    def __sub__(self, other):
        return type(self)(self.x - other.x, self.y - other.y, self.z - other.z)

    def __repr__(self):
        return f"{type(self).__name__}(x={self.x:.2f}, y={self.y:.2f}, z={self.z:.2f})"


class Location(Vector3D):
    def __init__(self, x=0.0, y=0.0, z=0.0):
        super().__init__(x, y, z)

    def distance(self, location):
        return super().distance(location)


class Rotation:
    def __init__(self, pitch=0.0, yaw=0.0, roll=0.0):
        self.pitch, self.yaw, self.roll = float(pitch), float(yaw), float(roll)

    def get_forward_vector(self):
        r = math.radians(self.yaw)
        return Vector3D(math.cos(r), math.sin(r), 0.0)


class Transform:
    def __init__(self, location=None, rotation=None):
        self.location = location if location is not None else Location()
        self.rotation = rotation if rotation is not None else Rotation()

    def transform(self, in_point):
        """A point in this transform's frame, in the world frame (yaw only)."""
        r = math.radians(self.rotation.yaw)
        c, s = math.cos(r), math.sin(r)
        return Location(self.location.x + c * in_point.x - s * in_point.y,
                        self.location.y + s * in_point.x + c * in_point.y, self.location.z + in_point.z)

    def get_forward_vector(self):
        return self.rotation.get_forward_vector()


class BoundingBox:
    def __init__(self, location, extent):
        self.location, self.extent, self.rotation = location, extent, Rotation()


class VehicleControl:
    def __init__(self, throttle=0.0, steer=0.0, brake=0.0, hand_brake=False, reverse=False,
                 manual_gear_shift=False, gear=0):
        self.throttle, self.steer, self.brake = float(throttle), float(steer), float(brake)
        self.hand_brake, self.reverse, self.manual_gear_shift, self.gear = hand_brake, reverse, manual_gear_shift, gear


class WeatherParameters:
    def __init__(self, cloudiness=0.0, precipitation=0.0, precipitation_deposits=0.0, wind_intensity=0.0,
                 sun_azimuth_angle=0.0, sun_altitude_angle=0.0, fog_density=0.0, fog_distance=0.0, wetness=0.0,
                 fog_falloff=0.0, scattering_intensity=0.0, mie_scattering_scale=0.0,
                 rayleigh_scattering_scale=0.0331):
        self.cloudiness, self.precipitation = cloudiness, precipitation
        self.precipitation_deposits, self.wind_intensity = precipitation_deposits, wind_intensity
        self.sun_azimuth_angle, self.sun_altitude_angle = sun_azimuth_angle, sun_altitude_angle
        self.fog_density, self.fog_distance = fog_density, fog_distance
        self.wetness, self.fog_falloff = wetness, fog_falloff
        self.scattering_intensity, self.mie_scattering_scale = scattering_intensity, mie_scattering_scale
        self.rayleigh_scattering_scale, self.dust_storm = rayleigh_scattering_scale, 0.0


class WorldSettings:
    def __init__(self, synchronous_mode=False, no_rendering_mode=False, fixed_delta_seconds=0.0,
                 max_culling_distance=0.0, deterministic_ragdolls=False, tile_stream_distance=3000.0,
                 actor_active_distance=2000.0, spectator_as_ego=True):
        self.synchronous_mode, self.no_rendering_mode = synchronous_mode, no_rendering_mode
        self.fixed_delta_seconds, self.max_culling_distance = fixed_delta_seconds, max_culling_distance
        self.deterministic_ragdolls, self.tile_stream_distance = deterministic_ragdolls, tile_stream_distance
        self.actor_active_distance, self.spectator_as_ego = actor_active_distance, spectator_as_ego

    def __eq__(self, other):
        return isinstance(other, WorldSettings) and vars(self) == vars(other)

    def _copy(self):
        return WorldSettings(**vars(self))


class LaneType(IntFlag):
    NONE = 1
    Driving = 2
    Shoulder = 8
    Sidewalk = 32
    Parking = 256
    Any = 0xFFFFE  # every type but NONE, like carla's -2


class LaneChange(IntFlag):
    NONE = 0
    Right = 1
    Left = 2
    Both = 3


class TrafficLightState(IntEnum):
    Red = 0
    Yellow = 1
    Green = 2
    Off = 3
    Unknown = 4


class AttachmentType(IntEnum):
    Rigid = 0
    SpringArm = 1
    SpringArmGhost = 2


class Timestamp:
    _internal_init = True

    def __init__(self, frame, elapsed_seconds, delta_seconds, platform_timestamp=0.0):
        self.frame, self.elapsed_seconds, self.delta_seconds = frame, elapsed_seconds, delta_seconds
        self.platform_timestamp = platform_timestamp


# -- road network ----------------------------------------------------------------------------------
class _Lane:
    def __init__(self, road_id, lane_id, points, lane_type=LaneType.Driving, width=3.5, junction=False,
                 lane_change=LaneChange.NONE):
        self.road_id, self.lane_id, self.lane_type, self.width = road_id, lane_id, lane_type, width
        self.junction, self.lane_change = junction, lane_change
        self.points = np.asarray(points, float)
        self.arc = np.concatenate(([0.0], np.cumsum(np.hypot(*np.diff(self.points, axis=0).T))))
        self.length = float(self.arc[-1])
        self.successors: list[_Lane] = []
        self.left: _Lane | None = None
        self.right: _Lane | None = None
        self.speed_kmh = 30.0

    def position(self, s):
        s = min(max(s, 0.0), self.length)
        return float(np.interp(s, self.arc, self.points[:, 0])), float(np.interp(s, self.arc, self.points[:, 1]))

    def heading(self, s):
        i = min(max(int(np.searchsorted(self.arc, s, side="right")) - 1, 0), len(self.points) - 2)
        d = self.points[i + 1] - self.points[i]
        return math.atan2(d[1], d[0])

    def project(self, x, y):
        """(s, distance) of the nearest point of the centreline."""
        a, ab = self.points[:-1], np.diff(self.points, axis=0)
        ab2 = np.maximum((ab**2).sum(1), 1e-12)
        t = np.clip(((np.array([x, y]) - a) * ab).sum(1) / ab2, 0.0, 1.0)
        d = np.hypot(*(a + t[:, None] * ab - (x, y)).T)
        i = int(np.argmin(d))
        return float(self.arc[i] + t[i] * math.sqrt(ab2[i])), float(d[i])


def _line(x0, y0, x1, y1, n=2):
    return np.stack((np.linspace(x0, x1, n), np.linspace(y0, y1, n)), axis=1)


def _arc(cx, cy, radius, a0, a1, n=24):
    a = np.linspace(a0, a1, n)
    return np.stack((cx + radius * np.cos(a), cy + radius * np.sin(a)), axis=1)


def _standin_town() -> list[_Lane]:
    both = LaneChange.Both
    r1a = _Lane(1, -1, _line(0, 1.75, 200, 1.75), lane_change=both)
    r1b = _Lane(1, -2, _line(0, 5.25, 200, 5.25), lane_change=both)
    r1w = _Lane(1, 1, _line(200, -1.75, 0, -1.75))
    walk = _Lane(1, -3, _line(0, 8.75, 200, 8.75), lane_type=LaneType.Sidewalk, width=3.0)
    straight = _Lane(10, -1, _line(200, 1.75, 220, 1.75), junction=True)
    # Right turn: from (200, 5.25) heading east, centre 20 m to the right (+y), ending heading +y.
    turn = _Lane(11, -1, _arc(200, 25.25, 20.0, -math.pi / 2, 0.0), junction=True)
    back = _Lane(12, 1, _line(220, -1.75, 200, -1.75), junction=True)
    r2 = _Lane(2, -1, _line(220, 1.75, 400, 1.75))
    r2w = _Lane(2, 1, _line(400, -1.75, 220, -1.75))
    r3 = _Lane(3, -1, _line(220, 25.25, 220, 175.25))
    r1a.successors, r1b.successors, straight.successors, turn.successors = [straight], [turn], [r2], [r3]
    r2w.successors, back.successors = [back], [r1w]
    r1a.right, r1b.left, r1a.left, r1w.left = r1b, r1a, r1w, r1a
    r1b.right, walk.left = walk, r1b
    r2.left, r2w.left = r2w, r2
    return [r1a, r1b, r1w, walk, straight, turn, back, r2, r2w, r3]


class Waypoint:
    _internal_init = True

    def __init__(self, lane: _Lane, s: float):
        self._lane, self.s = lane, float(min(max(s, 0.0), lane.length))

    @property
    def id(self):
        return hash((self._lane.road_id, self._lane.lane_id, round(self.s, 3)))

    @property
    def transform(self):
        x, y = self._lane.position(self.s)
        return Transform(Location(x, y, 0.0), Rotation(yaw=math.degrees(self._lane.heading(self.s))))

    road_id = property(lambda self: self._lane.road_id)
    section_id = property(lambda self: 0)
    lane_id = property(lambda self: self._lane.lane_id)
    is_junction = property(lambda self: self._lane.junction)
    junction_id = property(lambda self: 100 if self._lane.junction else -1)
    lane_width = property(lambda self: self._lane.width)
    lane_type = property(lambda self: self._lane.lane_type)
    lane_change = property(lambda self: self._lane.lane_change)

    def next(self, distance):
        s = self.s + distance
        if s <= self._lane.length + 1e-9:
            return [Waypoint(self._lane, s)]
        rest = s - self._lane.length
        return [w for succ in self._lane.successors for w in Waypoint(succ, 0.0)._advance(rest)]

    def _advance(self, distance):
        return [self] if distance <= 1e-9 else self.next(distance)

    def get_left_lane(self):
        return self._beside(self._lane.left)

    def get_right_lane(self):
        return self._beside(self._lane.right)

    def _beside(self, lane):
        if lane is None:
            return None
        x, y = self._lane.position(self.s)
        return Waypoint(lane, lane.project(x, y)[0])


class Map:
    _internal_init = True

    def __init__(self, name: str, lanes: list[_Lane]):
        self._name, self._lanes = name, lanes

    @property
    def name(self):
        return f"Carla/Maps/{self._name}/{self._name}"

    def get_topology(self):
        return [(Waypoint(l, 0.0), Waypoint(l, l.length)) for l in self._lanes if l.lane_type & LaneType.Driving]

    def get_waypoint(self, location, project_to_road=True, lane_type=LaneType.Driving):
        best, best_d = None, math.inf
        for lane in self._lanes:
            if not lane.lane_type & lane_type:
                continue
            s, d = lane.project(location.x, location.y)
            if (project_to_road or d <= lane.width / 2) and d < best_d:
                best, best_d = Waypoint(lane, s), d
        return best

    def get_spawn_points(self):
        points = []
        for lane in self._lanes:
            if lane.lane_type & LaneType.Driving and not lane.junction:
                for s in np.arange(10.0, lane.length - 5.0, 25.0):
                    x, y = lane.position(s)
                    points.append(Transform(Location(x, y, 0.5), Rotation(yaw=math.degrees(lane.heading(s)))))
        return points


# -- blueprints and actors -------------------------------------------------------------------------
class ActorAttribute:
    _internal_init = True

    def __init__(self, id, value):  # noqa: A002 -- carla's name
        self._id, self._value = id, str(value)

    @property
    def id(self):
        return self._id

    def as_int(self):
        return int(self._value)

    def as_str(self):
        return self._value


class ActorBlueprint:
    _internal_init = True

    def __init__(self, id, extent=(0.1, 0.1, 0.1), **attributes):  # noqa: A002
        self._id, self._extent, self._attributes = id, extent, {k: str(v) for k, v in attributes.items()}

    @property
    def id(self):
        return self._id

    def has_attribute(self, id):  # noqa: A002
        return id in self._attributes

    def get_attribute(self, id):  # noqa: A002
        return ActorAttribute(id, self._attributes[id])

    def set_attribute(self, id, value):  # noqa: A002
        if id not in self._attributes:
            raise IndexError(f"blueprint {self._id} has no attribute {id!r}")
        self._attributes[id] = str(value)


_BLUEPRINTS = [
    ("vehicle.lincoln.mkz_2020", (2.45, 1.07, 0.75), dict(role_name="autopilot", number_of_wheels=4)),
    ("vehicle.tesla.model3", (2.40, 1.05, 0.75), dict(role_name="autopilot", number_of_wheels=4)),
    ("vehicle.audi.a2", (1.85, 0.90, 0.75), dict(role_name="autopilot", number_of_wheels=4)),
    ("vehicle.bh.crossbike", (0.75, 0.40, 0.80), dict(role_name="autopilot", number_of_wheels=2)),
    ("walker.pedestrian.0001", (0.25, 0.25, 0.90), dict(role_name="walker", is_invincible="false")),
    ("walker.pedestrian.0002", (0.25, 0.25, 0.90), dict(role_name="walker", is_invincible="false")),
    ("controller.ai.walker", (0.0, 0.0, 0.0), {}),
    ("sensor.other.collision", (0.0, 0.0, 0.0), dict(role_name="front")),
    ("sensor.other.lane_invasion", (0.0, 0.0, 0.0), dict(role_name="front")),
    ("sensor.camera.rgb", (0.0, 0.0, 0.0), dict(role_name="front", image_size_x=800, image_size_y=600, fov=90)),
    ("static.prop.streetbarrier", (1.0, 0.3, 0.5), dict(role_name="prop")),
]


class BlueprintLibrary:
    _internal_init = True

    def __init__(self, blueprints):
        self._blueprints = list(blueprints)

    def filter(self, wildcard_pattern):
        return BlueprintLibrary([b for b in self._blueprints if fnmatch.fnmatch(b.id, wildcard_pattern)])

    def find(self, id):  # noqa: A002
        for b in self._blueprints:
            if b.id == id:
                return ActorBlueprint(b.id, b._extent, **b._attributes)
        raise IndexError(f"blueprint {id!r} not found")

    def __iter__(self):
        return iter([ActorBlueprint(b.id, b._extent, **b._attributes) for b in self._blueprints])

    def __len__(self):
        return len(self._blueprints)


class Actor:
    _internal_init = True

    def __init__(self, world, actor_id, blueprint, transform, parent=None):
        self._world, self._id, self._type_id = world, actor_id, blueprint.id
        self._attributes = dict(blueprint._attributes)
        self._extent = Vector3D(*blueprint._extent)
        self._parent, self._offset = parent, transform if parent is not None else None
        t = transform if parent is None else parent.get_transform()
        self._x, self._y, self._z, self._yaw = t.location.x, t.location.y, t.location.z, math.radians(t.rotation.yaw)
        self._speed, self._accel, self._alive = 0.0, 0.0, True

    id = property(lambda self: self._id)
    type_id = property(lambda self: self._type_id)
    attributes = property(lambda self: dict(self._attributes))
    is_alive = property(lambda self: self._alive)
    parent = property(lambda self: self._parent)

    @property
    def bounding_box(self):
        return BoundingBox(Location(), Vector3D(self._extent.x, self._extent.y, self._extent.z))

    def get_world(self):
        return self._world

    def get_transform(self):
        if self._parent is not None:
            return self._parent.get_transform()
        return Transform(Location(self._x, self._y, self._z), Rotation(yaw=math.degrees(self._yaw)))

    def get_location(self):
        return self.get_transform().location

    def get_velocity(self):
        return Vector3D(self._speed * math.cos(self._yaw), self._speed * math.sin(self._yaw), 0.0)

    def get_acceleration(self):
        return Vector3D(self._accel * math.cos(self._yaw), self._accel * math.sin(self._yaw), 0.0)

    def set_transform(self, transform):
        self._x, self._y, self._z = transform.location.x, transform.location.y, transform.location.z
        self._yaw = math.radians(transform.rotation.yaw)

    def destroy(self):
        self._world._server.individual_destroys += 1
        return self._world._destroy(self._id)

    def _tick(self, dt):
        pass


class Vehicle(Actor):
    _WHEELBASE, _MAX_STEER = 2.9, math.radians(45.0)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._control, self._autopilot, self._lane, self._s = VehicleControl(), False, None, 0.0

    @property
    def bounding_box(self):
        return super().bounding_box

    def apply_control(self, control):
        self._control = control

    def get_control(self):
        return self._control

    def set_autopilot(self, enabled=True, port=8000):
        tm = self._world._server.tms.get(port)
        if tm is None:
            raise RuntimeError(f"no traffic manager on port {port}")
        self._autopilot = bool(enabled)
        if enabled:
            w = self._world._map.get_waypoint(self.get_location())
            self._lane, self._s, self._speed = w._lane, w.s, 0.0
            tm._vehicles.add(self._id)
        else:
            tm._vehicles.discard(self._id)

    def get_speed_limit(self):
        return self._world._map.get_waypoint(self.get_location())._lane.speed_kmh

    def get_traffic_light(self):
        for light in self._world._lights():
            if _inside(light._trigger_box(), self._x, self._y):
                return light
        return None

    def get_traffic_light_state(self):
        light = self.get_traffic_light()
        return light.state if light is not None else TrafficLightState.Green

    def _tick(self, dt):
        before = self._speed
        if self._autopilot:
            self._speed = 8.0
            self._s += self._speed * dt
            while self._s > self._lane.length and self._lane.successors:
                self._s -= self._lane.length
                self._lane = self._lane.successors[0]
            if self._s >= self._lane.length:  # a dead end: park there
                self._s, self._speed = self._lane.length, 0.0
            self._x, self._y = self._lane.position(self._s)
            self._yaw = self._lane.heading(self._s)
        else:  # a kinematic bicycle driven by VehicleControl
            c = self._control
            accel = 4.0 * c.throttle - 9.0 * c.brake - (0.2 if self._speed > 0 else 0.0)
            self._speed = max(self._speed + accel * dt, 0.0)
            self._yaw += self._speed * math.tan(c.steer * self._MAX_STEER) / self._WHEELBASE * dt
            self._x += self._speed * math.cos(self._yaw) * dt
            self._y += self._speed * math.sin(self._yaw) * dt
        self._accel = (self._speed - before) / dt


class Walker(Actor):
    _target, _max_speed = None, 1.4

    def _tick(self, dt):
        target = self._target
        if target is None:
            self._speed = 0.0
            return
        dx, dy = target.x - self._x, target.y - self._y
        distance = math.hypot(dx, dy)
        self._speed = min(self._max_speed, distance / dt)
        if distance > 1e-6:
            self._yaw = math.atan2(dy, dx)
            self._x += self._speed * dt * dx / distance
            self._y += self._speed * dt * dy / distance


class WalkerAIController(Actor):
    def start(self):
        self._started = True
        self._parent._max_speed = 1.4

    def stop(self):
        self._started = False
        self._parent._target = None

    def go_to_location(self, destination):
        self._parent._target = destination

    def set_max_speed(self, speed=1.4):
        self._parent._max_speed = float(speed)


class Sensor(Actor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._callback = None

    def listen(self, callback):
        self._callback = callback

    def is_listening(self):
        return self._callback is not None

    def stop(self):
        self._callback = None


class TrafficSign(Actor):
    def __init__(self, world, actor_id, blueprint, transform, parent=None, trigger_volume=None):
        super().__init__(world, actor_id, blueprint, transform, parent)
        self._trigger = trigger_volume

    @property
    def trigger_volume(self):
        return self._trigger

    def _trigger_box(self):
        t = self.get_transform()
        c = t.transform(self._trigger.location)
        return c.x, c.y, math.radians(t.rotation.yaw), self._trigger.extent.x, self._trigger.extent.y


class TrafficLight(TrafficSign):
    def __init__(self, *args, stop_waypoints=(), **kwargs):
        super().__init__(*args, **kwargs)
        self._state, self._stops = TrafficLightState.Green, list(stop_waypoints)

    @property
    def state(self):
        return self._state

    def get_state(self):
        return self._state

    def set_state(self, state):
        self._state = state

    def get_stop_waypoints(self):
        return list(self._stops)


class ActorList(list):
    _internal_init = True

    def filter(self, wildcard_pattern):
        return ActorList(a for a in self if fnmatch.fnmatch(a.type_id, wildcard_pattern))

    def find(self, actor_id):
        return next((a for a in self if a.id == actor_id), None)


# -- sensor data -----------------------------------------------------------------------------------
class SensorData:
    _internal_init = True

    def __init__(self, frame, timestamp, transform):
        self._frame, self._timestamp, self._transform = frame, timestamp, transform

    frame = property(lambda self: self._frame)
    timestamp = property(lambda self: self._timestamp)
    transform = property(lambda self: self._transform)


class CollisionEvent(SensorData):
    def __init__(self, frame, timestamp, transform, actor, other_actor):
        super().__init__(frame, timestamp, transform)
        self._actor, self._other = actor, other_actor

    actor = property(lambda self: self._actor)
    other_actor = property(lambda self: self._other)
    normal_impulse = property(lambda self: Vector3D(1000.0, 0.0, 0.0))


class LaneInvasionEvent(SensorData):
    def __init__(self, frame, timestamp, transform, actor):
        super().__init__(frame, timestamp, transform)
        self._actor = actor

    actor = property(lambda self: self._actor)
    crossed_lane_markings = property(lambda self: [])


class Image(SensorData):
    def __init__(self, frame, timestamp, transform, width, height):
        super().__init__(frame, timestamp, transform)
        self._width, self._height = width, height
        pixels = np.zeros((height, width, 4), np.uint8)
        pixels[..., 2] = frame % 256  # red in BGRA: frames are told apart by their colour
        pixels[..., 3] = 255
        self._raw = pixels.tobytes()

    width = property(lambda self: self._width)
    height = property(lambda self: self._height)
    fov = property(lambda self: 90.0)
    raw_data = property(lambda self: self._raw)


class ActorSnapshot:
    _internal_init = True

    def __init__(self, actor):
        self._id = actor.id
        self._transform, self._velocity = actor.get_transform(), actor.get_velocity()
        self._accel = actor.get_acceleration()

    id = property(lambda self: self._id)

    def get_transform(self):
        return self._transform

    def get_velocity(self):
        return self._velocity

    def get_acceleration(self):
        return self._accel


class WorldSnapshot:
    _internal_init = True

    def __init__(self, world):
        self._frame = world._frame
        self._timestamp = Timestamp(world._frame, world._time, world._delta)
        self._actors = {a.id: ActorSnapshot(a) for a in world._actors.values()}

    frame = property(lambda self: self._frame)
    timestamp = property(lambda self: self._timestamp)

    def find(self, actor_id):
        return self._actors.get(actor_id)

    def has_actor(self, actor_id):
        return actor_id in self._actors

    def __iter__(self):
        return iter(list(self._actors.values()))

    def __len__(self):
        return len(self._actors)


# -- world, client, traffic manager ----------------------------------------------------------------
def _rpc(method):
    """Methods that talk to the server: they time out like the real client when it does not answer."""
    def wrapper(self, *args, **kwargs):
        self._server_check()
        return method(self, *args, **kwargs)
    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = method.__name__, method.__doc__, method
    return wrapper


def _corners(x, y, yaw, ex, ey):
    c, s = math.cos(yaw), math.sin(yaw)
    offsets = ((ex, ey), (ex, -ey), (-ex, -ey), (-ex, ey))
    return np.array([(x + c * dx - s * dy, y + s * dx + c * dy) for dx, dy in offsets])


def _overlap(a, b) -> bool:
    """Separating-axis test of two oriented rectangles (x, y, yaw, half length, half width)."""
    ca, cb = _corners(*a), _corners(*b)
    for yaw in (a[2], b[2]):
        for axis in ((math.cos(yaw), math.sin(yaw)), (-math.sin(yaw), math.cos(yaw))):
            pa, pb = ca @ axis, cb @ axis
            if pa.max() < pb.min() or pb.max() < pa.min():
                return False
    return True


def _inside(box, x, y) -> bool:
    cx, cy, yaw, ex, ey = box
    dx, dy = x - cx, y - cy
    c, s = math.cos(yaw), math.sin(yaw)
    return abs(dx * c + dy * s) <= ex and abs(-dx * s + dy * c) <= ey


class World:
    _internal_init = True

    def __init__(self, server, town=TOWN, settings=None):
        self._server, self._town = server, town
        self._map = Map(town, _standin_town())
        self._id = server._next_world_id()
        self._settings = settings._copy() if settings is not None else WorldSettings()
        self._weather, self._actors, self._frame, self._time, self._delta = WeatherParameters(), {}, 0, 0.0, 0.0
        self._rng = np.random.default_rng(0)
        self._pending_collisions: list[tuple[Actor, Actor]] = []
        self._library = BlueprintLibrary(ActorBlueprint(i, e, **a) for i, e, a in _BLUEPRINTS)
        lanes = {(l.road_id, l.lane_id): l for l in self._map._lanes}
        light_bp = ActorBlueprint("traffic.traffic_light", (0.3, 0.3, 2.0))
        stops = [Waypoint(lanes[(1, -1)], 197.0), Waypoint(lanes[(1, -2)], 197.0)]
        self._add(TrafficLight, light_bp, Transform(Location(198.0, 8.0, 0.0)),
                  trigger_volume=BoundingBox(Location(-6.0, -4.5, 0.0), Vector3D(5.0, 3.5, 1.0)), stop_waypoints=stops)
        self._add(TrafficSign, ActorBlueprint("traffic.stop", (0.3, 0.3, 1.5)), Transform(Location(388.0, 5.0, 0.0)),
                  trigger_volume=BoundingBox(Location(0.0, -3.25, 0.0), Vector3D(3.0, 1.5, 1.0)))

    id = property(lambda self: self._id)

    def _server_check(self):
        self._server._check()

    def _add(self, cls, blueprint, transform, parent=None, **kwargs):
        actor = cls(self, self._server._next_actor_id(), blueprint, transform, parent=parent, **kwargs)
        self._actors[actor.id] = actor
        return actor

    def _lights(self):
        return [a for a in self._actors.values() if isinstance(a, TrafficLight)]

    def _destroy(self, actor_id) -> bool:
        actor = self._actors.pop(actor_id, None)
        if actor is None:
            return False
        if isinstance(actor, Sensor) and actor.is_listening():
            self._server.warnings.append(f"destroyed sensor {actor_id} while it was listening")
        if isinstance(actor, WalkerAIController) and getattr(actor, "_started", False):
            self._server.warnings.append(f"destroyed walker controller {actor_id} without stop()")
        for tm in self._server.tms.values():
            tm._vehicles.discard(actor_id)
        actor._alive = False
        return True

    @_rpc
    def get_map(self):
        return self._map

    @_rpc
    def get_settings(self):
        return self._settings._copy()

    @_rpc
    def apply_settings(self, world_settings):
        self._settings = world_settings._copy()
        return self._frame

    @_rpc
    def get_blueprint_library(self):
        return self._library

    @_rpc
    def set_weather(self, weather):
        self._weather = weather

    @_rpc
    def get_weather(self):
        return self._weather

    @_rpc
    def set_pedestrians_seed(self, seed):
        self._rng = np.random.default_rng(seed)

    @_rpc
    def get_random_location_from_navigation(self):
        walk = next(l for l in self._map._lanes if l.lane_type == LaneType.Sidewalk)
        x, y = walk.position(float(self._rng.uniform(0.0, walk.length)))
        return Location(x, y, 1.0)

    @_rpc
    def get_actors(self, actor_ids=None):
        ids = sorted(self._actors) if actor_ids is None else [i for i in actor_ids if i in self._actors]
        return ActorList(self._actors[i] for i in ids)

    @_rpc
    def get_actor(self, actor_id):
        return self._actors.get(actor_id)

    @_rpc
    def get_snapshot(self):
        return WorldSnapshot(self)

    @_rpc
    def spawn_actor(self, blueprint, transform, attach_to=None, attachment_type=AttachmentType.Rigid):
        kind = blueprint.id.split(".")[0]
        classes = {"vehicle": Vehicle, "walker": Walker, "sensor": Sensor, "controller": WalkerAIController}
        cls = classes.get(kind, Actor)
        if attach_to is None and kind in ("vehicle", "walker", "static"):
            box = (transform.location.x, transform.location.y, math.radians(transform.rotation.yaw),
                   blueprint._extent[0], blueprint._extent[1])
            for other in self._actors.values():
                if other.parent is None and other.type_id.split(".")[0] in ("vehicle", "walker", "static") \
                        and _overlap(box, other._box()):
                    raise RuntimeError("Spawn failed because of collision at spawn position")
        return self._add(cls, blueprint, transform, parent=attach_to)

    @_rpc
    def try_spawn_actor(self, blueprint, transform, attach_to=None, attachment_type=AttachmentType.Rigid):
        try:
            return self.spawn_actor(blueprint, transform, attach_to, attachment_type)
        except RuntimeError:
            return None

    @_rpc
    def tick(self, seconds=10.0):
        server = self._server
        server.ticks += 1
        if server.crash_at is not None and server.ticks >= server.crash_at:
            server.hang()
            self._server_check()
        dt = self._settings.fixed_delta_seconds or 0.05
        self._frame, self._time, self._delta = self._frame + 1, self._time + dt, dt
        for actor in list(self._actors.values()):
            actor._tick(dt)
        self._fire_sensors()
        return self._frame

    def _fire_sensors(self):
        movers = [a for a in self._actors.values()
                  if a.parent is None and a.type_id.split(".")[0] in ("vehicle", "walker", "static")]
        for sensor in [a for a in self._actors.values() if isinstance(a, Sensor)]:
            parent, callback = sensor.parent, sensor._callback
            if callback is None or parent is None or parent.id not in self._actors:
                continue
            data = (self._frame, self._time, parent.get_transform())
            if sensor.type_id == "sensor.other.collision":
                hits = [o for o in movers if o is not parent and _overlap(parent._box(), o._box())]
                hits += [o for a, o in self._pending_collisions if a is parent]
                for other in hits:
                    callback(CollisionEvent(*data, parent, other))
            elif sensor.type_id == "sensor.other.lane_invasion":
                lane = self._map.get_waypoint(parent.get_location())._lane
                last = getattr(sensor, "_lane", lane)
                if lane is not last and lane not in last.successors:
                    callback(LaneInvasionEvent(*data, parent))
                sensor._lane = lane
            elif sensor.type_id == "sensor.camera.rgb":
                callback(Image(*data, int(sensor._attributes["image_size_x"]), int(sensor._attributes["image_size_y"])))
        self._pending_collisions.clear()


def _box(self):
    return self._x, self._y, self._yaw, self._extent.x, self._extent.y


Actor._box = _box


class TrafficManager:
    _internal_init = True

    def __init__(self, server, port):
        self._server, self._port, self._sync, self._seed, self._vehicles = server, port, False, None, set()

    def _server_check(self):
        self._server._check()

    @_rpc
    def get_port(self):
        return self._port

    @_rpc
    def set_synchronous_mode(self, mode_switch=True):
        self._sync = bool(mode_switch)

    @_rpc
    def set_random_device_seed(self, value):
        self._seed = value


class command:  # noqa: N801 -- mirrors the carla.command module
    class FutureActor:
        pass

    class Response:
        _internal_init = True

        def __init__(self, actor_id=0, error=""):
            self._actor_id, self._error = actor_id, error

        actor_id = property(lambda self: self._actor_id)
        error = property(lambda self: self._error)

        def has_error(self):
            return bool(self._error)

    class DestroyActor:
        def __init__(self, actor):
            self.actor_id = actor if isinstance(actor, int) else actor.id

    class SetAutopilot:
        def __init__(self, actor, enabled, port=8000):
            self.actor_id, self.enabled, self.port = actor, enabled, port

    class SpawnActor:
        def __init__(self, blueprint=None, transform=None, parent=None):
            self.blueprint, self.transform, self.parent_id, self._then = blueprint, transform, parent, []

        def then(self, command):  # noqa: F811 -- carla's parameter name
            self._then.append(command)
            return self


class Client:
    def __init__(self, host="127.0.0.1", port=2000, worker_threads=0):
        self._host, self._port, self._timeout = host, int(port), 5.0
        self._server = StandinServer.registry.get((host, int(port)))

    def _server_check(self):
        if self._server is None:
            raise RuntimeError(_timeout_message(self._timeout, self._host, self._port))
        self._server.timeout_s = self._timeout
        self._server._check()

    def set_timeout(self, second):
        self._timeout = float(second)

    @_rpc
    def get_world(self):
        return self._server.world

    @_rpc
    def get_available_maps(self):
        return [f"/Game/Carla/Maps/{TOWN}"]

    @_rpc
    def load_world(self, map_name, reset_settings=True, map_layers=None):
        if map_name.split("/")[-1] != TOWN:
            raise RuntimeError(f"map '{map_name}' not found")
        server = self._server
        server.loads += 1
        server.world = World(server, TOWN, None if reset_settings else server.world._settings)
        return server.world

    @_rpc
    def get_trafficmanager(self, client_connection=8000):
        return self._server.tms.setdefault(client_connection, TrafficManager(self._server, client_connection))

    @_rpc
    def apply_batch(self, commands, do_tick=False):
        self.apply_batch_sync(commands, do_tick)

    @_rpc
    def apply_batch_sync(self, commands, do_tick=False):
        world, responses = self._server.world, []
        self._server.batches.append([type(c).__name__ for c in commands])
        for c in commands:
            responses.append(self._run(world, c))
        if do_tick:
            world.tick()
        return responses

    def _run(self, world, c, future=None):
        if isinstance(c, command.DestroyActor):
            ok = world._destroy(c.actor_id)
            self._server.destroyed += [c.actor_id] if ok else []
            return command.Response(c.actor_id, "" if ok else f"actor {c.actor_id} not found")
        if isinstance(c, command.SetAutopilot):
            actor_id = future if c.actor_id is command.FutureActor else c.actor_id
            world._actors[actor_id].set_autopilot(c.enabled, c.port)
            return command.Response(actor_id)
        if isinstance(c, command.SpawnActor):
            parent = world._actors.get(c.parent_id) if c.parent_id is not None else None
            try:
                actor = world.spawn_actor(c.blueprint, c.transform, attach_to=parent)
            except RuntimeError as exc:
                return command.Response(0, str(exc))
            for follow in c._then:
                self._run(world, follow, future=actor.id)
            return command.Response(actor.id)
        raise TypeError(f"the stand-in does not run {type(c).__name__}")


def _timeout_message(seconds, host, port):
    return (f"time-out of {int(seconds * 1000)}ms while waiting for the simulator, make sure the simulator "
            f"is ready and connected to {host}:{port}")


class StandinServer:
    """A simulated CARLA server listening on (host, port) while it exists (not part of carla's API)."""

    registry: dict[tuple[str, int], "StandinServer"] = {}

    def __init__(self, host="127.0.0.1", port=2000, town=TOWN):
        self.host, self.port = host, port
        self._ids, self._world_ids = 100, 0
        self.timeout_s, self.hung, self.crash_at = 5.0, False, None
        self.ticks = self.loads = self.individual_destroys = 0
        self.batches: list[list[str]] = []
        self.destroyed: list[int] = []
        self.warnings: list[str] = []
        self.tms: dict[int, TrafficManager] = {}
        self.world = World(self, town)
        self.original_settings = self.world._settings._copy()
        StandinServer.registry[(host, port)] = self

    def _next_actor_id(self):
        self._ids += 1
        return self._ids

    def _next_world_id(self):
        self._world_ids += 1
        return self._world_ids

    def _check(self):
        if self.hung:
            raise RuntimeError(_timeout_message(self.timeout_s, self.host, self.port))

    def hang(self):
        self.hung = True

    def resume(self):
        self.hung, self.crash_at = False, None

    def crash_after_ticks(self, n: int):
        self.crash_at = self.ticks + n

    def collide(self, actor, other):
        """A collision of `actor` with `other` reported on the next tick."""
        self.world._pending_collisions.append((actor, other))

    def spawn(self, blueprint_id, x, y, yaw=0.0):
        """A test actor (not made by the backend), e.g. a static prop to drive into."""
        bp = self.world._library.find(blueprint_id)
        return self.world.spawn_actor(bp, Transform(Location(x, y, 0.0), Rotation(yaw=yaw)))

    def actors(self, pattern="*"):
        return [a for a in self.world._actors.values() if fnmatch.fnmatch(a.type_id, pattern)]

    def shutdown(self):
        StandinServer.registry.pop((self.host, self.port), None)
