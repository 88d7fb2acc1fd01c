"""The one episode state machine (harness.lockstep; K = 1 is the sequential path) and the runner's contract
with its env: reset/step/info only, so Gymnasium wrappers can sit between them; an action checked once."""
import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from gymnasium.wrappers import RecordEpisodeStatistics

from prunedrive.agents.expert import ExpertAgent
from prunedrive.harness import env as env_module
from prunedrive.harness.action import Control
from prunedrive.harness.agent import HOOKS, hook
from prunedrive.harness.env import DriveEnv
from prunedrive.harness.env_pool import default_make_env
from prunedrive.harness.episode import run_episode
from prunedrive.harness.latency import parse_latency
from prunedrive.harness.lockstep import run_episode_with_retries
from prunedrive.harness.results import RunDir
from prunedrive.harness.runner import run_suite
from prunedrive.scenarios.loader import load_suite

TIMINGS = ("wall", "cpu")  # columns that differ run to run


class FailsInSeedTwo(ExpertAgent):
    """Drives like the expert; in the episode of seed 2 its third act() raises (a partial record)."""

    name = "fails-in-seed-2"

    def __init__(self, seeds):
        super().__init__()
        self.seeds, self.calls, self.failing = iter(seeds), 0, False

    def reset(self, scenario):
        super().reset(scenario)
        self.calls, self.failing = 0, next(self.seeds) == 2

    def act(self, observation):
        self.calls += 1
        if self.failing and self.calls == 3:
            raise RuntimeError("model exploded")
        return super().act(observation)


class CopyObservation(gym.ObservationWrapper):
    """A custom observation wrapper: hands the runner its own copy of every observation (and counts them)."""

    def __init__(self, env):
        super().__init__(env)
        self.seen = 0

    def observation(self, observation):
        self.seen += 1
        return {name: np.array(value, copy=True) for name, value in observation.items()}


class Wrapping:
    """A make_env hook that wraps every env the run makes, and keeps the wrappers to look at afterwards."""

    def __init__(self):
        self.made = []

    def __call__(self, scenario, record, **options):
        env = RecordEpisodeStatistics(CopyObservation(default_make_env(scenario, record, **options)))
        self.made.append(env)
        return env


def _run(suite, agents, path, **options) -> tuple[pd.DataFrame, pd.DataFrame]:
    run_dir = RunDir(path)
    run_dir.create({}, [])
    episodes = run_suite(suite, agents, run_dir, progress=False, **options)
    return episodes, pd.read_parquet(path / "steps.parquet")


def _without_timings(frame: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in frame.columns if c != "run_id" and not any(t in c for t in TIMINGS)]
    order = ["episode", "step"] if "step" in frame else ["agent", "scenario", "seed"]
    return frame[keep].sort_values(order, kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("latency", [None, "fixed:100"])
def test_a_wrapped_env_gives_the_same_episodes_as_the_bare_one(tiny_suite, tmp_path, latency):
    suite = load_suite(tiny_suite)
    seeds = [seed for _, seed in suite.episodes()]
    model = parse_latency(latency) if latency else None
    bare, bare_steps = _run(suite, [ExpertAgent(), FailsInSeedTwo(seeds)], tmp_path / "bare", latency=model)
    wrapping = Wrapping()
    wrapped, wrapped_steps = _run(suite, [ExpertAgent(), FailsInSeedTwo(seeds)], tmp_path / "wrapped",
                                  latency=model, make_env=wrapping)
    failed = bare.set_index(["agent", "seed"]).loc[("fails-in-seed-2", 2)]
    assert failed.status == "failed" and failed.steps == 2 and failed.route_completion > 0  # its own partial record
    pd.testing.assert_frame_equal(_without_timings(wrapped), _without_timings(bare))
    pd.testing.assert_frame_equal(_without_timings(wrapped_steps), _without_timings(bare_steps))
    assert (wrapped_steps.sim_wall_s > 0).all()  # the simulator's time came through the wrappers
    # The wrappers really were in the loop: the runner drove on their observations and they saw episodes end.
    assert wrapping.made and sum(env.env.seen for env in wrapping.made) >= len(bare_steps)
    assert sum(env.episode_count for env in wrapping.made) == (bare.status != "failed").sum()


def test_gymnasium_wrappers_forward_no_attributes_so_the_runner_needs_none():
    """The premise: Gymnasium 1.x wrappers do not forward the env's own attributes."""
    from prunedrive.scenarios.loader import load_scenario

    env = RecordEpisodeStatistics(DriveEnv(load_scenario("smoke/highway-cruise")))
    with pytest.raises(AttributeError):
        env.criteria  # noqa: B018
    env.close()


class BatchCapable(ExpertAgent):
    """Has the batch hooks; at K = 1 none of them may be used (the sequential path asks act())."""

    name = "batch-capable"

    def __init__(self):
        super().__init__()
        self.batch_calls = []

    def configure_batch(self, capacity):
        self.batch_calls.append("configure_batch")

    def act_batch(self, observations):
        self.batch_calls.append("act_batch")
        return [ExpertAgent.act(self, o) for o in observations]


def test_k1_is_the_sequential_path_through_act(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    agent = BatchCapable()
    episodes, steps = _run(suite, [agent], tmp_path / "k1", batch=1)
    assert agent.batch_calls == [] and (episodes.status != "failed").all() and (steps.batch_size == 1).all()
    reference, _ = _run(suite, [ExpertAgent()], tmp_path / "expert")
    columns = ["seed", "status", "driving_score", "route_completion", "steps", "events"]
    pd.testing.assert_frame_equal(episodes[columns].sort_values("seed").reset_index(drop=True),
                                  reference[columns].sort_values("seed").reset_index(drop=True))
    agent = BatchCapable()
    _run(suite, [agent], tmp_path / "k2", batch=2)
    assert agent.batch_calls[:2] == ["configure_batch", "act_batch"]  # K > 1 does use them


def test_one_episode_with_retries_keeps_its_env_in_the_callers_pool(tiny_suite):
    scenario = load_suite(tiny_suite).scenarios[0]
    envs = {}
    row, steps = run_episode_with_retries(envs, ExpertAgent(), scenario, 1, run_id="r", backoff_s=0)
    assert row["status"] != "failed" and len(steps) == row["steps"] > 0
    [env] = envs[scenario.name]
    again, _ = run_episode_with_retries(envs, ExpertAgent(), scenario, 1, run_id="r", backoff_s=0)
    assert envs[scenario.name] == [env] and again["driving_score"] == row["driving_score"]
    env.close()


def test_an_agents_action_is_checked_once(tiny_suite, monkeypatch):
    scenario = load_suite(tiny_suite).scenarios[0]
    checks = []
    original = env_module.checked_control
    monkeypatch.setattr(env_module, "checked_control", lambda *a, **k: checks.append(a) or original(*a, **k))
    env = default_make_env(scenario, False)
    _, steps = run_episode(env, ExpertAgent(), scenario, 1, max_steps=5)
    assert len(steps) == 5 and checks == []  # the runner checked them (naming the agent); the env did not again
    env.reset(seed=1)
    env.step(np.array([2.0, 0.0, 0.0]))  # a bare Gymnasium user's action is still checked (and clamped)
    env.step(Control(throttle=3.0))  # so is a Control that checked_control did not make
    assert len(checks) == 2
    env.close()


def test_info_carries_the_outcome_so_far_and_timings_only_when_asked(tiny_suite):
    scenario = load_suite(tiny_suite).scenarios[0]
    env = default_make_env(scenario, False)
    _, info = env.reset(seed=1)
    assert "outcome" not in info and info["ticks_per_step"] >= 1 and info["tick_s"] > 0
    _, _, terminated, _, info = env.step(Control(throttle=1.0))
    assert not terminated and "outcome" not in info and "sim_wall_s" not in info and info["infractions"] == 0
    _, info = env.reset(seed=1, options={"outcome_so_far": True, "timings": True})
    assert info["outcome"].steps == 0 and info["outcome"].events == []
    for step in (1, 2):
        _, _, _, _, info = env.step(Control(throttle=1.0))
        assert info["outcome"].steps == step and info["outcome"].sim_time_s == info["sim_time_s"]
        assert info["outcome"].route_completion == info["route_completion"] and info["sim_wall_s"] > 0
    env.close()


def test_the_agent_hooks_are_declared():
    assert HOOKS == {"act_batch", "configure_batch", "reset_batch", "last_compute", "last_compute_batch",
                     "batch_copies"}
    assert hook(BatchCapable(), "act_batch") is not None and hook(ExpertAgent(), "act_batch") is None
    with pytest.raises(ValueError, match="not a declared agent hook"):
        hook(ExpertAgent(), "act_batches")
