"""The CARLA backend's own infraction detectors on their own, without a server or stand-in: plain records in,
Leaderboard 2.0 events out (the backend tests drive the same classes through tests/carla_standin.py)."""
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest

from prunedrive.harness.backends.carla_infractions import (
    COLLISION_MEMORY_S, ROUTE_TIMEOUT_MIN_S, CollisionTest, RedLightTest, RouteTimeout, StopSignTest, rear_point,
)
from prunedrive.harness.events import EventKind


def contact(time, other_id, type_id="vehicle.audi.a2", x=0.0, y=0.0, speed=5.0):
    return (time, other_id, type_id, x, y, speed)


def test_collisions_count_once_per_actor_within_memory_and_radius_and_never_for_a_standing_ego():
    test = CollisionTest()
    contacts = deque([contact(1.0, 7), contact(1.1, 7, x=20.0),          # same actor within 5 s: once
                      contact(1.2, 8, "walker.pedestrian.0001", x=3.0),  # within 5 m of the last hit: ignored
                      contact(1.3, 9, "static.prop.box", x=40.0, speed=0.05)])  # standing ego: not at fault
    events = test.events(contacts, step=4)
    assert [(e.kind, e.step) for e in events] == [(EventKind.COLLISION_VEHICLE, 4)] and not contacts
    more = deque([contact(1.0 + COLLISION_MEMORY_S + 0.1, 7, x=30.0), contact(9.0, 8, "walker.x", x=60.0),
                  contact(9.5, 9, "static.prop.box", x=90.0)])
    assert [e.kind for e in test.events(more, step=5)] == [EventKind.COLLISION_VEHICLE,
                                                          EventKind.COLLISION_PEDESTRIAN, EventKind.COLLISION_STATIC]


def test_a_hit_far_behind_is_forgotten_so_a_new_actor_there_counts():
    test = CollisionTest()
    test.events(deque([contact(1.0, 7)]), step=1)
    assert not test.events(deque([contact(2.0, 8, x=4.0)]), step=2)  # within 5 m of the last hit
    test.forget_far_hit(10.0, 0.0)
    assert len(test.events(deque([contact(3.0, 9, x=4.0)]), step=3)) == 1


def test_the_route_timeout_grows_with_progress_at_ten_percent_of_the_speed_limit():
    timeout = RouteTimeout()
    assert timeout.timeout_s == ROUTE_TIMEOUT_MIN_S
    assert not timeout.check(arc=10.0, speed_limit=10.0, sim_time_s=1.0, step=1)
    assert timeout.timeout_s == pytest.approx(ROUTE_TIMEOUT_MIN_S + 10.0 / 1.0)
    assert not timeout.check(arc=5.0, speed_limit=10.0, sim_time_s=2.0, step=2)  # going back adds nothing
    assert timeout.timeout_s == pytest.approx(ROUTE_TIMEOUT_MIN_S + 10.0)
    events = timeout.check(arc=10.0, speed_limit=10.0, sim_time_s=311.0, step=3)
    assert [(e.kind, e.step) for e in events] == [(EventKind.ROUTE_TIMEOUT, 3)]
    assert not timeout.check(arc=10.0, speed_limit=10.0, sim_time_s=400.0, step=4)  # once


def pose(x, y=0.0, yaw=0.0):
    return SimpleNamespace(location=SimpleNamespace(x=x, y=y), rotation=SimpleNamespace(yaw=yaw))


def test_a_red_light_counts_when_the_rear_bumper_crosses_its_stop_line_heading_the_lanes_way():
    light = SimpleNamespace(id=3, state="red")
    statics = {"stops": np.array([[10.0, 0.0, 1.0, 0.0, 1.75, 0]]), "lights": [light], "signs": []}
    assert rear_point(pose(5.0), 2.0) == pytest.approx([3.0, 0.0])
    ahead = RedLightTest(statics, "red", 2.0, pose(11.0))
    assert not ahead.check(pose(11.9), step=1)                  # the front crossed, the rear did not
    assert [e.kind for e in ahead.check(pose(12.5), step=2)] == [EventKind.RED_LIGHT]
    assert not ahead.check(pose(13.0), step=3)
    backwards = RedLightTest(statics, "red", 2.0, pose(11.0, yaw=180.0))
    assert not backwards.check(pose(15.0, yaw=180.0), step=1)   # crossing against the lane's way
    light.state = "green"
    assert not RedLightTest(statics, "red", 2.0, pose(11.0)).check(pose(12.5), step=1)


def test_leaving_a_stop_sign_area_without_stopping_is_one_infraction():
    statics = {"signs": [(5, 20.0, 0.0, 0.0, 3.0, 2.0)]}
    rolled, stopped = StopSignTest(statics, 2.0), StopSignTest(statics, 2.0)
    for x in (10.0, 17.0, 22.0, 30.0):
        events = rolled.check(x, 0.0, 0.0, speed=3.0, step=int(x))
    assert [e.kind for e in events] == [EventKind.STOP_SIGN]
    for x, speed in ((17.0, 3.0), (18.0, 0.0), (30.0, 3.0)):
        assert not stopped.check(x, 0.0, 0.0, speed=speed, step=int(x))
