"""Latency in the loop inside the official evaluator: agents/leaderboard_agent.py with `latency:` in its config
applies harness.latency's clock on the evaluator's 20 Hz ticks (stand-in evaluator and server, as in
tests/test_leaderboard.py)."""
import math

import numpy as np
import pandas as pd
import pytest

import leaderboard_standin as lb
from test_leaderboard import ADAPTER, agent_config, evaluator, server  # noqa: F401 (fixtures)

from prunedrive.agents.registry import AgentError


def drive(tmp_path, evaluator, ticks: int, **config) -> tuple[list, pd.DataFrame]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    evaluator.spawn_hero(20.0, 1.75)
    route = lb.dense_route(evaluator.world.get_map(), (20.0, 1.75, 0.0), 250.0)
    evaluator.run(ADAPTER, agent_config(tmp_path, agent="expert", **config), route, ticks=ticks)
    controls = [(c.throttle, c.brake, c.steer) for c in evaluator.controls]
    return controls, pd.read_parquet(tmp_path / "steps" / "prunedrive_steps_000.parquet")


def test_a_fixed_latency_holds_the_brake_then_each_answer_from_its_effect_tick(tmp_path, evaluator):
    controls, steps = drive(tmp_path, evaluator, 40, latency="fixed:300")
    # 5 Hz on 0.05 s ticks: 4 ticks per policy step. 300 ms: the answer read at tick 0 acts from tick 6; the agent
    # is free at 0.3 s and reads again at the next policy step (tick 8), whose answer acts from tick 14, ...
    assert steps.decided.tolist() == [True, False] * 5
    assert steps.effect_tick[steps.decided].tolist() == [6, 14, 22, 30, 38]
    assert (steps.effect_tick[~steps.decided] == -1).all()
    assert np.allclose(steps.latency_s[steps.decided], 0.3)
    assert controls[:6] == [(0.0, 1.0, 0.0)] * 6  # full brake before the first answer
    for first in (6, 14, 22, 30):  # each answer holds for exactly 8 ticks, from its effect tick on
        assert len(set(controls[first:first + 8])) == 1
    assert controls[6] != controls[0]  # the expert's first answer is not a full brake on an empty road
    # Stale: the brake placeholder (ticks 0-5), and ticks more than one policy period after the observation.
    stale = [int(t < 6 or (t - (8 * ((t - 6) // 8))) * 0.05 > 0.2 + 1e-9) for t in range(40)]
    assert steps.stale_ticks.tolist() == [sum(stale[k:k + 4]) for k in range(0, 40, 4)]


@pytest.fixture(scope="module")
def without_latency(tmp_path_factory):
    return {}


@pytest.mark.parametrize("latency", [None, "fixed:0"])
def test_fixed_zero_drives_as_without_latency(tmp_path, evaluator, without_latency, latency):
    """Two evaluator runs on fresh stand-in worlds (the first stores, the second compares)."""
    controls, steps = drive(tmp_path, evaluator, 24, **({"latency": latency} if latency else {}))
    if latency is None:
        without_latency["run"] = controls, steps
        return
    plain, plain_steps = without_latency["run"]
    zero, zero_steps = controls, steps
    assert zero == plain
    assert zero_steps.decided.all() and zero_steps.stale_ticks.eq(0).all()
    assert np.allclose(zero_steps.throttle, plain_steps.throttle)


@pytest.mark.parametrize("latency, message", [("fixed:-5", "milliseconds >= 0"), ("soon", "not a latency model"),
                                              ("profile:missing.yaml", "missing.yaml")])
def test_a_bad_latency_entry_names_the_config_file(tmp_path, evaluator, latency, message):
    with pytest.raises(AgentError, match=message) as caught:
        drive(tmp_path, evaluator, 4, latency=latency)
    assert "agent.yaml" in str(caught.value) and "latency" in str(caught.value)
