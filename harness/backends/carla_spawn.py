"""The actors of one CARLA episode: spawned at its start, destroyed in one batch at its end.

The ego (role_name "hero") at the route start with its collision sensor (and a chase camera when
rendering), background vehicles under Traffic Manager autopilot on spawn points near the route and walkers
on the sidewalks beside it, each walking under an AI controller. Every actor's id is kept, so that the
episode's actors can be destroyed by id even after the client that spawned them was lost. The sensors'
callbacks run on the client's thread: they only record (`contacts`, `frame`).
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from prunedrive.harness.backends.carla_connection import CarlaConnection
from prunedrive.harness.backends.carla_world import min_distance

BACKGROUND_RADIUS_M = 60.0    # background vehicles spawn this close to the route ...
EGO_CLEARANCE_M = 15.0        # ... and this far from the ego


class EpisodeActors:
    """What one episode spawned on the server `connection` talks to. `ego` is the hero vehicle (None when
    there is none), `half_length` half its bounding box's length, `contacts` the collision sensor's records
    (time, other actor id, its type_id, x, y, ego speed), `frame` the chase camera's last RGB image."""

    def __init__(self, connection: CarlaConnection):
        self.connection, self.carla = connection, connection.carla
        self.ego = None
        self.half_length = 0.0
        self.contacts: deque = deque()
        self.frame = None
        self._ids: list[int] = []
        self._sensors: list = []
        self._controllers: list = []

    # -- the ego ---------------------------------------------------------------------------------
    def spawn_ego(self, start_xyz, blueprint: str, camera_size=None) -> None:
        """The hero on the lane at `start_xyz`, half a metre up; a chase camera of `camera_size` (width,
        height) when given."""
        carla, world = self.carla, self.connection.world
        x, y, z = start_xyz
        start = self.connection.map.get_waypoint(carla.Location(x=x, y=y, z=z)).transform
        where = carla.Transform(carla.Location(x=start.location.x, y=start.location.y, z=start.location.z + 0.5),
                                carla.Rotation(pitch=0.0, yaw=start.rotation.yaw, roll=0.0))
        library = world.get_blueprint_library()
        bp = library.find(blueprint)
        bp.set_attribute("role_name", "hero")
        self.ego = world.spawn_actor(bp, where)
        self._ids.append(self.ego.id)
        extent = self.ego.bounding_box.extent
        self.half_length = float(extent.x)
        self._attach("sensor.other.collision", carla.Transform(), self._on_collision)
        self.frame = None
        if camera_size is not None:
            width, height = (int(v) for v in camera_size)
            chase = carla.Transform(carla.Location(x=-6.0, y=0.0, z=3.0),
                                    carla.Rotation(pitch=-15.0, yaw=0.0, roll=0.0))
            self._attach("sensor.camera.rgb", chase, self._on_image,
                         image_size_x=str(width), image_size_y=str(height), fov="90")

    def _attach(self, blueprint_id: str, where, callback, **attributes) -> None:
        world = self.connection.world
        bp = world.get_blueprint_library().find(blueprint_id)
        for key, value in attributes.items():
            bp.set_attribute(key, value)
        sensor = world.spawn_actor(bp, where, attach_to=self.ego)
        self._ids.append(sensor.id)
        self._sensors.append(sensor)
        sensor.listen(callback)

    def _on_collision(self, event) -> None:
        other, where = event.other_actor, event.transform.location
        velocity = self.ego.get_velocity() if self.ego is not None else None
        speed = math.hypot(velocity.x, velocity.y) if velocity is not None else 0.0
        self.contacts.append((float(event.timestamp), int(other.id), str(other.type_id), where.x, where.y, speed))

    def _on_image(self, image) -> None:
        pixels = np.frombuffer(image.raw_data, np.uint8).reshape(image.height, image.width, 4)
        self.frame = pixels[:, :, 2::-1].copy()  # BGRA -> RGB

    # -- background traffic ----------------------------------------------------------------------
    def spawn_background(self, route_points: np.ndarray, vehicles: int, walkers: int, rng: np.random.Generator,
                         timeout_s: float) -> None:
        """`vehicles` and `walkers` near the route `route_points` (x, y), drawn with `rng`."""
        route = route_points[::4]  # a point every 10 m is enough to find what is near the route
        if vehicles > 0:
            self._spawn_vehicles(route, vehicles, rng)
        if walkers > 0:
            self._spawn_walkers(route, walkers, rng, timeout_s)

    def _spawn_vehicles(self, route: np.ndarray, count: int, rng: np.random.Generator) -> None:
        """Four-wheeled vehicles under Traffic Manager autopilot, on spawn points near the route: a big
        town's spawn points are mostly kilometres away, where traffic would never meet the ego."""
        command, world = self.carla.command, self.connection.world
        cars = [bp for bp in world.get_blueprint_library().filter("vehicle.*")
                if not bp.has_attribute("number_of_wheels") or bp.get_attribute("number_of_wheels").as_int() == 4]
        points = list(self.connection.map.get_spawn_points())
        if not cars or not points:
            return
        xy = np.array([(p.location.x, p.location.y) for p in points])
        near = np.flatnonzero((min_distance(xy, route) < BACKGROUND_RADIUS_M)
                              & (np.hypot(*(xy - route[0]).T) > EGO_CLEARANCE_M))
        batch = []
        for k in rng.permutation(near)[:count]:
            bp = cars[int(rng.integers(len(cars)))]
            if bp.has_attribute("role_name"):
                bp.set_attribute("role_name", "autopilot")
            autopilot = command.SetAutopilot(command.FutureActor, True, self.connection.tm_port)
            batch.append(command.SpawnActor(bp, points[k]).then(autopilot))
        if batch:
            responses = self.connection.client.apply_batch_sync(batch, False)
            self._ids += [r.actor_id for r in responses if not r.has_error()]

    def _spawn_walkers(self, route: np.ndarray, count: int, rng: np.random.Generator, timeout_s: float) -> None:
        """Walkers on the sidewalks beside the route, each walking to a sidewalk point beside another
        part of it under an AI controller."""
        carla, command = self.carla, self.carla.command
        world, client = self.connection.world, self.connection.client
        library = world.get_blueprint_library()
        kinds = list(library.filter("walker.pedestrian.*"))
        batch, goals = [], []
        for _ in range(count):
            here, there = (self._sidewalk_near(route[int(rng.integers(len(route)))]) for _ in range(2))
            if here is None or there is None or not kinds:
                continue
            bp = kinds[int(rng.integers(len(kinds)))]
            if bp.has_attribute("is_invincible"):
                bp.set_attribute("is_invincible", "false")
            batch.append(command.SpawnActor(bp, carla.Transform(here, carla.Rotation(pitch=0.0, yaw=0.0, roll=0.0))))
            goals.append(there)
        spawned = [(r.actor_id, goal) for r, goal in zip(client.apply_batch_sync(batch, False) if batch else [],
                                                         goals) if not r.has_error()]
        if not spawned:
            return
        self._ids += [walker for walker, _ in spawned]
        controller_bp = library.find("controller.ai.walker")
        responses = client.apply_batch_sync(
            [command.SpawnActor(controller_bp, carla.Transform(), walker) for walker, _ in spawned], False)
        self._ids += [r.actor_id for r in responses if not r.has_error()]
        world.tick(timeout_s)  # controllers must exist on the server before they start
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
        wp = self.connection.map.get_waypoint(carla.Location(x=float(xy[0]), y=float(xy[1]), z=0.0), True,
                                              carla.LaneType.Sidewalk)
        if wp is None:
            return None
        loc = wp.transform.location
        return carla.Location(x=loc.x, y=loc.y, z=loc.z + 1.0)

    # -- the end ---------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Stop sensors and walker controllers, then destroy every actor of the episode in one batch."""
        for actor in self._sensors + self._controllers:
            try:
                actor.stop()
            except RuntimeError:  # already gone with a reloaded world: nothing to stop
                pass
        if self._ids:
            DestroyActor = self.carla.command.DestroyActor
            self.connection.client.apply_batch_sync([DestroyActor(i) for i in self._ids], False)
        self._ids, self._sensors, self._controllers, self.ego = [], [], [], None

    def forget_handles(self) -> None:
        """Drop the handles of a lost client's actors but keep their ids: `destroy` on the next client
        removes them by id."""
        self.ego, self._sensors, self._controllers = None, [], []
