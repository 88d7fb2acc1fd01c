"""The scorer against hand-computed CARLA Leaderboard 2.0 cases."""
import math

import pytest

from prunedrive.harness.events import Event, EventKind as K
from prunedrive.harness.scoring import infraction_penalty, km_driven, mean_std, score_episode


def ev(kind, value=None):
    return Event(kind, step=1, value=value)


def test_clean_finished_route_scores_its_completion():
    score = score_episode(100.0, [])
    assert (score.driving_score, score.infraction_penalty, score.status) == (100.0, 1.0, "finished")


def test_several_infractions_multiply():
    events = [ev(K.COLLISION_VEHICLE), ev(K.RED_LIGHT), ev(K.STOP_SIGN), ev(K.COLLISION_PEDESTRIAN),
              ev(K.COLLISION_STATIC), ev(K.SCENARIO_TIMEOUT), ev(K.YIELD_TO_EMERGENCY_VEHICLE)]
    expected = 0.60 * 0.70 * 0.80 * 0.50 * 0.65 * 0.70 * 0.70
    score = score_episode(80.0, events)
    assert score.infraction_penalty == pytest.approx(expected)
    assert score.driving_score == pytest.approx(80.0 * expected)
    assert score.infractions["collision_vehicle"] == 1


def test_repeated_collisions_count_each_time():
    assert infraction_penalty([ev(K.COLLISION_PEDESTRIAN)] * 2) == pytest.approx(0.25)


def test_min_speed_scales_with_the_speed_percentage():
    # 60% of traffic speed: 1 - (1 - 0.7) * (1 - 0.6) = 0.88; a second checkpoint at 90%: 0.97
    assert infraction_penalty([ev(K.MIN_SPEED, 60.0)]) == pytest.approx(0.88)
    assert infraction_penalty([ev(K.MIN_SPEED, 60.0), ev(K.MIN_SPEED, 90.0)]) == pytest.approx(0.88 * 0.97)


def test_outside_route_lanes_takes_off_the_share_driven_outside():
    # 25% of the route outside the route lanes: penalty *= 1 - 25/100
    score = score_episode(100.0, [ev(K.OUTSIDE_ROUTE_LANES, 25.0), ev(K.COLLISION_VEHICLE)])
    assert score.infraction_penalty == pytest.approx(0.75 * 0.6)
    assert score.driving_score == pytest.approx(45.0)


@pytest.mark.parametrize("events, collision_ended, status", [
    ([ev(K.ROUTE_DEVIATION)], False, "route_deviation"),
    ([ev(K.AGENT_BLOCKED)], False, "agent_blocked"),
    ([ev(K.ROUTE_TIMEOUT)], False, "timeout"),
    ([ev(K.COLLISION_VEHICLE)], True, "collision_ended"),
])
def test_status_of_unfinished_routes(events, collision_ended, status):
    assert score_episode(42.0, events, collision_ended).status == status


def test_error_marks_the_episode_failed_but_keeps_its_progress():
    score = score_episode(30.0, [ev(K.COLLISION_VEHICLE)], error="Traceback ...")
    assert score.status == "failed"
    assert score.driving_score == pytest.approx(18.0)


def test_global_statistics_helpers():
    mean, std = mean_std([100.0, 50.0, 0.0])
    assert mean == pytest.approx(50.0) and std == pytest.approx(50.0)  # sample std, as the Leaderboard
    assert math.isnan(mean_std([3.0])[1])
    assert km_driven(2000.0, 50.0) == pytest.approx(1.0)
