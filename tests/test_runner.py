"""The runner: results on disk, failures recorded, killed runs resumed without loss or repeats."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from prunedrive.agents.expert import ExpertAgent
from prunedrive.app.cli import main
from prunedrive.harness.results import RunDir
from prunedrive.harness.runner import run_suite
from prunedrive.scenarios.loader import load_suite

SCORE_COLUMNS = ["agent", "scenario", "seed", "status", "driving_score", "route_completion", "infraction_penalty",
                 "steps", "events"]


class FailingAgent(ExpertAgent):
    name = "failing"

    def __init__(self, fail_seed):
        super().__init__()
        self.fail_seed, self.calls, self.seed = fail_seed, 0, None

    def reset(self, scenario):
        self.calls = 0

    def act(self, observation):
        self.calls += 1
        if self.fail_on_this_episode and self.calls == 3:
            raise RuntimeError("model exploded")
        return super().act(observation)


def test_a_failing_episode_is_recorded_and_the_run_goes_on(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    agent = FailingAgent(fail_seed=2)
    episodes_seen = iter(seed for _, seed in suite.episodes())

    original_reset = agent.reset

    def reset(scenario):
        original_reset(scenario)
        agent.fail_on_this_episode = next(episodes_seen) == 2

    agent.reset = reset
    run_dir = RunDir(tmp_path / "run")
    run_dir.create({}, [])
    episodes = run_suite(suite, [agent], run_dir, progress=False).set_index("seed")
    assert len(episodes) == 3
    assert episodes.loc[2, "status"] == "failed"
    assert "model exploded" in episodes.loc[2, "error"] and "Traceback" in episodes.loc[2, "error"]
    assert episodes.loc[2, "steps"] == 2  # the progress before the failure is kept
    assert (episodes.drop(index=2)["status"] != "failed").all()


def test_same_seeds_same_numbers(tiny_suite, tmp_path):
    suite = tiny_suite.parent / "curvy.yaml"
    suite.write_text(tiny_suite.read_text() + "  - name: roundabout\n    kind: roundabout\n    seeds: [4]\n"
                     "    vehicles: 3\n    speed_limit_mps: 10\n    duration_s: 30\n")

    def run(name):
        code = main(["run", "--suite", str(suite), "--agent", "expert", "--agent", "constant",
                     "--out", str(tmp_path), "--run-id", name, "--quiet"])
        assert code == 0
        return RunDir(tmp_path / name).episodes().sort_values(["agent", "seed"])[SCORE_COLUMNS].reset_index(drop=True)

    first, second = run("a"), run("b")
    pd.testing.assert_frame_equal(first, second)
    roundabout = first[first.scenario == "roundabout"].set_index("agent").driving_score
    assert roundabout["expert"] > roundabout["constant"] + 20  # the constant agent cannot take a curve


def test_killed_run_resumes_without_loss_or_repeats(tiny_suite, tmp_path):
    command = [sys.executable, "-m", "prunedrive.app.cli", "run", "--suite", str(tiny_suite), "--agent", "expert",
               "--out", str(tmp_path), "--run-id", "killed", "--quiet"]
    process = subprocess.Popen(command, start_new_session=True)
    episodes_dir = tmp_path / "killed" / "episodes"
    deadline = time.time() + 120
    while time.time() < deadline and not (episodes_dir.is_dir() and any(episodes_dir.glob("*.parquet"))):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = RunDir(tmp_path / "killed").finished()
    assert 1 <= len(finished_before) < 3, "the run should have been killed mid-way"

    assert main(["run", "--suite", str(tiny_suite), "--agent", "expert", "--out", str(tmp_path),
                 "--resume", "killed", "--quiet"]) == 0
    run = RunDir(tmp_path / "killed")
    episodes = pd.read_parquet(tmp_path / "killed" / "episodes.parquet")
    assert sorted(episodes.seed) == [1, 2, 3]  # none lost, none repeated
    steps = pd.read_parquet(tmp_path / "killed" / "steps.parquet")
    assert len(steps) == episodes.steps.sum()
    assert not list((tmp_path / "killed").rglob(".*.tmp"))
    assert run.finished() >= finished_before

    reference = tmp_path / "ref"
    assert main(["run", "--suite", str(tiny_suite), "--agent", "expert", "--out", str(tmp_path), "--run-id", "ref",
                 "--quiet"]) == 0
    resumed = episodes.sort_values("seed")[SCORE_COLUMNS].reset_index(drop=True)
    fresh = RunDir(reference).episodes().sort_values("seed")[SCORE_COLUMNS].reset_index(drop=True)
    pd.testing.assert_frame_equal(resumed, fresh)


def test_resume_with_other_options_is_refused(tiny_suite, tmp_path, capsys):
    assert main(["run", "--suite", str(tiny_suite), "--agent", "constant", "--out", str(tmp_path), "--run-id", "x",
                 "--quiet"]) == 0
    assert main(["run", "--suite", str(tiny_suite), "--agent", "expert", "--out", str(tmp_path), "--resume", "x",
                 "--quiet"]) == 2
    assert "cannot be resumed with different settings" in capsys.readouterr().err


def test_episode_rows_hold_scores_infractions_and_compute(tiny_suite, tmp_path):
    assert main(["run", "--suite", str(tiny_suite), "--agent", "expert", "--out", str(tmp_path), "--run-id", "c",
                 "--quiet"]) == 0
    episodes = RunDir(tmp_path / "c").episodes()
    for column in ("agent_wall_s_mean", "agent_wall_s_p50", "agent_wall_s_p95", "agent_cpu_s_mean",
                   "sim_wall_s_p95", "n_collision_vehicle", "efficiency", "comfort", "success"):
        assert column in episodes
    assert (episodes.agent_wall_s_p95 >= episodes.agent_wall_s_p50).all()
    assert (episodes.sim_wall_s_mean > 0).all()
    steps = pd.read_parquet(tmp_path / "c" / "steps.parquet")
    assert {"agent_wall_s", "agent_cpu_s", "sim_wall_s", "tokens_in", "effective_flops"} <= set(steps.columns)
    manifest = RunDir(tmp_path / "c").manifest()
    assert manifest["versions"]["highway-env"] and manifest["config"]["agents"] == ["expert"]


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["run", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
    assert main(["summary", "missing-run", "--out", str(tmp_path)]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert main(["run", "--agent", "llm", "--out", str(tmp_path)]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_record_writes_a_webm_video(tiny_suite, tmp_path):
    pytest.importorskip("cv2")
    assert main(["run", "--suite", str(tiny_suite), "--agent", "constant", "--seeds", "1", "--out", str(tmp_path),
                 "--run-id", "v", "--record", "--quiet"]) == 0
    [video] = (tmp_path / "v" / "videos").glob("*.webm")
    import cv2

    capture = cv2.VideoCapture(str(video))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) > 3
