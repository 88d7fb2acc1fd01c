"""Route criteria on synthetic trajectories along a straight 100 m route."""
import numpy as np
import pytest

from prunedrive.harness.backends.base import BackendState
from prunedrive.harness.criteria import RouteCriteria
from prunedrive.harness.events import EventKind as K
from prunedrive.harness.observation import EgoState, WorldObjects
from prunedrive.harness.route import RoutePolyline


def state(x, y=0.0, speed=10.0, t=0.0, outside=False, vehicles=None):
    objects = WorldObjects(vehicles=np.zeros((0, 7)) if vehicles is None else vehicles)
    return BackendState(EgoState(x=x, y=y, yaw=0.0, speed=speed), objects, outside_route_lanes=outside, sim_time_s=t)


def criteria(**kw):
    args = dict(dt=0.5, duration_s=100.0, blocked_s=5.0, deviation_m=30.0)
    args.update(kw)
    return RouteCriteria(RoutePolyline(np.array([[0.0, 0.0], [100.0, 0.0]])), **args)


def test_route_completion_follows_progress_and_never_goes_back():
    c = criteria()
    for i, x in enumerate([10, 40, 30, 55]):
        c.update(state(x, t=i * 0.5), i)
    assert c.route_completion == pytest.approx(55.0)


def test_progress_is_not_counted_far_from_the_route():
    c = criteria()
    c.update(state(50, y=15.0), 1)  # 15 m off: not on the route, not yet a deviation
    assert c.route_completion == 0.0


def test_outside_lanes_share_of_the_route():
    c = criteria()
    for i, (x, outside) in enumerate([(10, False), (30, True), (50, True), (60, False)]):
        c.update(state(x, outside=outside, t=i * 0.5), i)
    [event] = c.finish(4)
    assert event.kind == K.OUTSIDE_ROUTE_LANES
    assert event.value == pytest.approx(40.0)  # 10 -> 50 driven outside, of 100 m


def test_deviation_and_blocked_end_the_route():
    c = criteria()
    c.update(state(10, y=35.0), 1)
    assert c.stopped and c.events[-1].kind == K.ROUTE_DEVIATION
    c = criteria()
    for i in range(11):
        c.update(state(5, speed=0.0, t=i * 0.5), i)
    assert c.stopped and c.events[-1].kind == K.AGENT_BLOCKED


def test_route_timeout():
    c = criteria(duration_s=2.0)
    c.update(state(10, t=2.0), 4)
    assert c.timed_out and c.events[-1].kind == K.ROUTE_TIMEOUT


def test_min_speed_checkpoint_compares_with_nearby_traffic():
    c = criteria()
    traffic = np.array([[0.0, 4.0, 20.0, 0.0, 0.0, 5.0, 2.0]])
    for i, x in enumerate(np.linspace(1, 26, 6)):
        traffic[0, 0] = x
        c.update(state(x, speed=10.0, t=i * 0.5, vehicles=traffic.copy()), i)
    [event] = [e for e in c.events if e.kind == K.MIN_SPEED]
    assert event.value == pytest.approx(50.0)
    assert c.efficiency == pytest.approx(50.0)
