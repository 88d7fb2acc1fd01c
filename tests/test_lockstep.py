"""Lockstep batches (`--batch K`): K episodes side by side give each episode what K = 1 gives it.

The LLM agent here is the `tiny` preset with random weights (fast, and enough to check the batching): on it
the greedy tokens of batch 4 equal those of batch 1, so its episodes must be identical; where a model's
batched arithmetic does change a token, the documented rule is that a given K is deterministic (checked
with the same observations in different batch company). benchmarks/throughput.py --tokens measures
how often tokens differ on a trained model.
"""
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from prunedrive.agents.expert import ExpertAgent
from prunedrive.agents.llm import LLMAgent
from prunedrive.app.cli import main
from prunedrive.app.train import untrained_model
from prunedrive.harness.action import Control
from prunedrive.harness.results import RunDir, episode_key
from prunedrive.harness.executors import InProcessExecutor
from prunedrive.harness.lockstep import EpisodeJob
from prunedrive.harness.runner import run_suite
from prunedrive.models.data import synthetic_split
from prunedrive.models.driving_llm import collate
from prunedrive.models.presets import PRESETS
from prunedrive.scenarios.loader import load_suite

SCORE_COLUMNS = ["agent", "scenario", "seed", "status", "driving_score", "route_completion", "infraction_penalty",
                 "steps", "events", "collisions", "error"]
STEP_COLUMNS = ["episode", "step", "sim_time_s", "throttle", "brake", "steer", "speed_mps", "route_completion"]


def _run(suite, agents, path, batch, **options) -> tuple[pd.DataFrame, pd.DataFrame]:
    run_dir = RunDir(path)
    run_dir.create({}, [])
    episodes = run_suite(suite, agents, run_dir, progress=False, batch=batch, **options)
    steps = pd.read_parquet(path / "steps.parquet").sort_values(["episode", "step"]).reset_index(drop=True)
    return episodes.sort_values(["agent", "scenario", "seed"])[SCORE_COLUMNS].reset_index(drop=True), steps


class BatchedExpert(ExpertAgent):
    """The (stateless) expert answering a whole batch at once; in episode number `fail` (1-based, in start
    order) at its 3rd step it raises from act_batch (mode "raise": the harness falls back to act() per
    episode, and act() raises for that episode) or answers a bad control for that row (mode "bad")."""

    name = "batched"

    def __init__(self, fail: int | None = None, mode: str = "raise"):
        super().__init__()
        self.fail, self.mode = fail, mode
        self.started, self.episode_of, self.calls, self.poison = 0, {}, {}, None
        self.batch_calls, self.capacity = [], None

    def configure_batch(self, capacity):
        self.capacity = capacity

    def reset(self, scenario):
        self.started += 1

    def reset_batch(self, slot, scenario):
        self.episode_of[slot], self.calls[slot] = self.started, 0

    def act_batch(self, observations, slots):
        self.batch_calls.append(len(observations))
        bad = None
        for i, slot in enumerate(slots):
            self.calls[slot] += 1
            if self.episode_of[slot] == self.fail and self.calls[slot] == 3:
                bad = i
        controls = [ExpertAgent.act(self, o) for o in observations]
        if bad is not None and self.mode == "raise":
            self.poison = id(observations[bad])
            raise RuntimeError("the batch exploded")
        if bad is not None:
            controls[bad] = Control(throttle=float("nan"))
        return controls

    def act(self, observation):
        if id(observation) == self.poison:
            raise RuntimeError("model exploded")
        return super().act(observation)


def test_expert_batch_4_gives_batch_1_results(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    one, one_steps = _run(suite, [ExpertAgent()], tmp_path / "k1", 1)
    four, four_steps = _run(suite, [ExpertAgent()], tmp_path / "k4", 4)
    pd.testing.assert_frame_equal(one, four)
    pd.testing.assert_frame_equal(one_steps[STEP_COLUMNS], four_steps[STEP_COLUMNS])
    assert (one_steps.batch_size == 1).all() and (four_steps.batch_size == 1).all()  # no act_batch: one by one
    # The expert is also driven as a batched agent (act_batch): same numbers, steps decided 3 at a time.
    batched, batched_steps = _run(suite, [BatchedExpert()], tmp_path / "b4", 4)
    pd.testing.assert_frame_equal(one.drop(columns="agent"), batched.drop(columns="agent"))
    assert batched_steps.batch_size.iloc[0] == 3 and batched_steps.batch_size.max() == 3
    assert {"agent_wall_s", "agent_cpu_s", "sim_wall_s", "tokens_in", "effective_flops"} <= set(batched_steps.columns)
    assert (batched_steps.agent_wall_s > 0).all()


@pytest.mark.parametrize("mode, message, phase", [("raise", "model exploded", "act"),
                                                  ("bad", "throttle must be finite", "action")])
def test_one_failing_episode_in_a_batch_fails_alone(tiny_suite, tmp_path, mode, message, phase):
    suite = load_suite(tiny_suite)
    reference, _ = _run(suite, [ExpertAgent()], tmp_path / "ref", 1)
    agent = BatchedExpert(fail=2, mode=mode)
    episodes, steps = _run(suite, [agent], tmp_path / "run", 4)
    episodes = episodes.set_index("seed")
    assert agent.capacity == 4 and agent.batch_calls[0] == 3
    assert episodes.loc[2, "status"] == "failed" and message in episodes.loc[2, "error"]
    assert episodes.loc[2, "steps"] == 2  # its own progress before the failure is kept
    row = RunDir(tmp_path / "run").episodes().set_index("seed").loc[2]
    assert row.failed_phase == phase and row.failure == "agent"
    others = episodes.drop(index=2).reset_index()
    expected = reference.set_index("seed").drop(index=2).reset_index()
    pd.testing.assert_frame_equal(others.drop(columns="agent"), expected.drop(columns="agent"))


def test_episodes_are_yielded_and_written_as_each_ends(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    short = replace(suite.scenarios[0], name="short", duration_s=2.0, seeds=[7])
    suite = replace(suite, scenarios=[suite.scenarios[0], short])
    run_dir = RunDir(tmp_path / "run")
    run_dir.create({}, [])
    executor = InProcessExecutor([ExpertAgent()], batch=4)
    jobs = [EpisodeJob(0, s, seed) for s, seed in suite.episodes()]
    order = []
    try:
        for job, row, steps in executor.run(jobs, run_dir):
            running = len(executor.lockstep.running)
            run_dir.write_episode(episode_key("expert", job.scenario.name, job.seed), row, steps)
            order.append((job.scenario.name, running, len(run_dir.finished())))
        executor_instances = executor.lockstep.instances[0]
    finally:
        executor.close()
    assert order[0][0] == "short" and order[0][1] == 3  # written while the three long episodes still ran
    assert executor_instances == 4  # the expert (per-episode agent) was copied once per running episode
    assert [written for _, _, written in order] == [1, 2, 3, 4]


def test_resume_after_a_partial_batched_run(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)

    class Interrupted(InProcessExecutor):
        def run(self, jobs, run_dir):
            for item in super().run(jobs, run_dir):
                yield item
                return  # "killed" after the first episode of the batch was written

    run_dir = RunDir(tmp_path / "run")
    run_dir.create({}, [])
    partial = run_suite(suite, Interrupted([ExpertAgent()], batch=4), run_dir, progress=False)
    assert len(partial) == 1
    resumed = run_suite(suite, [ExpertAgent()], run_dir, progress=False, batch=4)
    assert sorted(resumed.seed) == [1, 2, 3]  # none lost, none repeated
    assert len(pd.read_parquet(run_dir.path / "steps.parquet")) == resumed.steps.sum()
    fresh, _ = _run(suite, [ExpertAgent()], tmp_path / "fresh", 1)
    pd.testing.assert_frame_equal(resumed.sort_values("seed")[SCORE_COLUMNS].reset_index(drop=True), fresh)


def test_cli_batch_is_in_the_manifest_and_a_resume_keeps_it(tiny_suite, tmp_path):
    assert main(["run", "--suite", str(tiny_suite), "--agent", "expert", "--batch", "2", "--out", str(tmp_path),
                 "--run-id", "b", "--quiet"]) == 0
    run = RunDir(tmp_path / "b")
    assert run.manifest()["config"]["batch"] == 2
    assert "batch" not in str(run.manifest().get("identity", ""))
    assert main(["run", "--resume", "b", "--out", str(tmp_path), "--quiet"]) == 0
    with pytest.raises(SystemExit) as usage:
        main(["run", "--suite", str(tiny_suite), "--batch", "0", "--out", str(tmp_path), "--quiet"])
    assert usage.value.code == 2


def test_bench_passes_batch_through_drive(tiny_suite, tmp_path, monkeypatch):
    from prunedrive.agents.registry import AgentSpec
    from prunedrive.app import bench
    from prunedrive.app.cli import main
    from prunedrive.app.run import drive

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda *args, **kwargs: seen.update(kwargs) or 0)
    assert main(["bench", "--batch", "3", "--quiet"]) == 0 and seen["batch"] == 3
    run_dir, episodes = drive(load_suite(tiny_suite), [AgentSpec("expert")], tmp_path, run_id="bench",
                              progress=False, batch=3)
    assert run_dir.manifest()["config"]["batch"] == 3 and len(episodes) == 3
    steps = pd.read_parquet(run_dir.path / "steps.parquet")
    assert (steps.batch_size == 1).all()


# -- the LLM agent ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split():
    return synthetic_split(8, seed=1)


@pytest.fixture
def tiny_llm(split, one_torch_thread):
    model = untrained_model(PRESETS["tiny"], split)
    return lambda: LLMAgent(model, name="llm-tiny", max_new_tokens=8)


def _no_mem(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "peak_mem_bytes"}


def test_act_batch_tokens_and_compute(split, tiny_llm):
    agent = tiny_llm()
    observations = [split.observation(i) for i in range(6)]
    alone = []
    for o in observations:
        control = agent.act(o)
        alone.append((control, agent.last_text, agent.last_compute()))
    # One row, no padding: act()'s tokens and act()'s accounting, exactly.
    [control] = agent.act_batch(observations[:1])
    [report] = agent.last_compute_batch()
    assert control == alone[0][0] and agent.last_text == alone[0][1]
    assert _no_mem(report) == _no_mem(alone[0][2])
    agent.configure_batch(4)
    for chunk, own in ((observations[:4], alone[:4]), (observations[4:], alone[4:])):
        controls = agent.act_batch(chunk)
        reports = agent.last_compute_batch()
        ids, stats = agent.model.generate(collate(chunk + [chunk[0]] * (4 - len(chunk))), agent.prompt,
                                          agent.max_new_tokens, agent.stop_text)
        texts = [agent.model.tokenizer.decode(row) for row in ids[:len(chunk)]]
        # On this model batch 4 gives batch 1's tokens; where they agree, so must controls and token counts.
        assert texts == [a[1] for a in own]
        assert controls == [a[0] for a in own]
        assert [r["tokens_out"] for r in reports] == [a[2]["tokens_out"] for a in own]
        assert [r["tokens_in"] for r in reports] == [a[2]["tokens_in"] for a in own]
        # The call's FLOPs: all 4 padded rows through the call's decode steps, split over the real rows.
        total = 4 * agent._compute(stats["tokens_in"], stats["decode_steps"], 0)["dense_flops"]
        assert math.isclose(sum(r["dense_flops"] for r in reports), total, rel_tol=1e-9)
    # The rule wherever tokens differ: at a given K a row's tokens do not depend on the rows beside it.
    agent.act_batch([observations[5], observations[0], observations[1]])
    in_company = agent.last_text
    agent.act_batch([observations[1]])
    assert agent.last_text == in_company


def test_llm_batch_4_gives_batch_1_results_where_tokens_agree(tiny_suite, tmp_path, tiny_llm):
    suite = load_suite(tiny_suite)
    one, one_steps = _run(suite, [tiny_llm()], tmp_path / "k1", 1)
    agent = tiny_llm()
    four, four_steps = _run(suite, [agent], tmp_path / "k4", 4)
    assert agent.batch_rows == 4
    assert four_steps.batch_size.iloc[0] == 3 and (one_steps.batch_size == 1).all()
    for column in ("tokens_in", "tokens_out", "dense_flops", "effective_flops", "agent_wall_s", "agent_cpu_s"):
        assert four_steps[column].notna().all(), column
    assert (four_steps.tokens_in == one_steps.tokens_in.iloc[0]).all()
    tokens_equal = four_steps[STEP_COLUMNS[:2] + ["tokens_out"]].equals(one_steps[STEP_COLUMNS[:2] + ["tokens_out"]])
    controls_equal = four_steps[STEP_COLUMNS].equals(one_steps[STEP_COLUMNS])
    if tokens_equal and controls_equal:
        pd.testing.assert_frame_equal(one, four)
    else:  # the documented rule: K = 4 is deterministic, whatever the batch company
        again, again_steps = _run(suite, [tiny_llm()], tmp_path / "k4-again", 4)
        pd.testing.assert_frame_equal(four, again)
    # A batched step costs its rows more FLOPs in all than one row alone (padding, shared decode).
    assert four_steps.groupby("step").dense_flops.sum().iloc[0] >= one_steps.dense_flops.iloc[0]


def test_llm_agent_failure_in_act_batch_falls_back_to_act(tiny_suite, tmp_path, tiny_llm, monkeypatch):
    suite = load_suite(tiny_suite)
    agent = tiny_llm()
    calls = {"batch": 0}
    original = LLMAgent.act_batch

    def flaky(self, observations):
        calls["batch"] += 1
        if calls["batch"] == 2:
            raise MemoryError("no room for the batch")
        return original(self, observations)

    monkeypatch.setattr(LLMAgent, "act_batch", flaky)
    episodes, steps = _run(suite, [agent], tmp_path / "run", 4)
    assert (episodes.status != "failed").all()
    second = steps[steps.step == 2]
    assert (second.batch_size == 1).all() and (steps[steps.step == 1].batch_size == 3).all()


def test_ray_workers_run_batches_with_the_same_results(tiny_suite, tmp_path):
    pytest.importorskip("ray")
    from prunedrive.agents.registry import AgentSpec
    from prunedrive.harness.distributed import run_suite_distributed

    suite = load_suite(tiny_suite)
    reference, _ = _run(suite, [ExpertAgent()], tmp_path / "ref", 1)
    run_dir = RunDir(tmp_path / "ray")
    run_dir.create({}, [])
    episodes = run_suite_distributed(suite, [AgentSpec("expert")], run_dir, workers=1, batch=2, progress=False)
    pd.testing.assert_frame_equal(episodes.sort_values("seed")[SCORE_COLUMNS].reset_index(drop=True), reference)
    steps = pd.read_parquet(run_dir.path / "steps.parquet")
    assert "batch_size" in steps and np.isfinite(steps.agent_wall_s).all()


class CrashOnce(ExpertAgent):
    """The expert, except that the first episode (in any process) to reach step 3 kills its process there
    (os._exit, as an OOM kill would), once: claimed by creating `marker` exclusively."""

    name = "expert"

    def __init__(self, marker: str):
        super().__init__()
        self.marker, self.calls = marker, 0

    def reset(self, scenario):
        self.calls = 0

    def act(self, observation):
        self.calls += 1
        if self.calls == 3:
            import os

            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return super().act(observation)


def test_a_worker_that_dies_mid_batch_loses_no_episode(tiny_suite, tmp_path):
    ray = pytest.importorskip("ray")
    import functools
    import sys

    from prunedrive.harness.distributed import run_suite_distributed

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    suite = load_suite(tiny_suite)
    reference, _ = _run(suite, [ExpertAgent()], tmp_path / "ref", 1)
    run_dir = RunDir(tmp_path / "ray")
    run_dir.create({}, [])
    episodes = run_suite_distributed(suite, [functools.partial(CrashOnce, str(tmp_path / "crashed"))], run_dir,
                                     workers=1, batch=2, progress=False)
    assert (tmp_path / "crashed").exists()  # a worker did die, with two episodes in its batch
    pd.testing.assert_frame_equal(episodes.sort_values("seed")[SCORE_COLUMNS].reset_index(drop=True), reference)
