"""Nothing invented, nothing lost: every row is its episode's own, bad input is a message, limits hold."""
import json
import sys
import time

import numpy as np
import pandas as pd
import pytest

from prunedrive.agents.baselines import ConstantAgent
from prunedrive.agents.expert import ExpertAgent
from prunedrive.app.cli import main
from prunedrive.harness.action import Control
from prunedrive.harness.results import RunDir, RunError, episode_key, parse_episode_key
from prunedrive.harness.runner import run_suite
from prunedrive.scenarios.loader import ScenarioError, load_suite


def _run(suite_path, agents, tmp_path, name="run", **options):
    run_dir = RunDir(tmp_path / name)
    run_dir.create({}, [])
    return run_suite(load_suite(suite_path), agents, run_dir, progress=False, **options).sort_values("seed")


class FailsInResetOnSeed(ConstantAgent):
    """Drives like the constant agent; its reset() raises in the episode after `seed`'s."""

    name = "resetfail"

    def __init__(self):
        super().__init__()
        self.resets = 0

    def reset(self, scenario):
        self.resets += 1
        if self.resets == 2:
            raise RuntimeError("reset exploded")


def test_a_failure_before_reset_is_not_credited_with_the_previous_episode(tiny_suite, tmp_path):
    episodes = _run(tiny_suite, [FailsInResetOnSeed()], tmp_path).set_index("seed")
    failed = episodes.loc[2]
    assert failed.status == "failed" and failed.failed_phase == "agent reset" and failed.failure == "agent"
    # Before the fix these were seed 1's: its steps, km, events and collisions.
    assert failed.steps == 0 and failed.km_driven == 0 and failed.collisions == 0 and failed.events == ""
    assert failed.driving_score == 0 and episodes.loc[1].steps > 0
    assert episodes.loc[3].status != "failed"


def test_episode_keys_are_injective_and_invertible():
    pairs = [("a b", "x"), ("a_b", "x"), ("a", "b__x"), ("a__b", "x"), ("llm-owl-0.7", "dense-highway")]
    keys = {episode_key(agent, scenario, 3) for agent, scenario in pairs}
    assert len(keys) == len(pairs)
    for agent, scenario in pairs:
        assert parse_episode_key(episode_key(agent, scenario, 3)) == (agent, scenario, 3)
    assert episode_key("llm-owl-0.7", "dense-highway", 3) == "llm-owl-0.7__dense-highway__3"  # readable as before


class ScriptedAgent:
    def __init__(self, name, action):
        self.name, self.action = name, action

    def reset(self, scenario):
        pass

    def act(self, observation):
        if callable(self.action):
            return self.action()
        return self.action


def test_out_of_range_controls_are_clamped_and_counted(tiny_suite, tmp_path):
    wild = _run(tiny_suite, [ScriptedAgent("wild", Control(throttle=5.0, brake=-3.0))], tmp_path, "w")
    legal = _run(tiny_suite, [ScriptedAgent("legal", Control(throttle=1.0, brake=0.0))], tmp_path, "l")
    assert (wild.clamped_actions == wild.steps).all() and (legal.clamped_actions == 0).all()
    # Clamped to exactly the legal control: no score for throttle beyond 1.
    assert wild.driving_score.tolist() == legal.driving_score.tolist()
    steps = pd.read_parquet(tmp_path / "w" / "steps.parquet")
    assert steps.throttle.max() == 1.0 and steps.brake.min() == 0.0


@pytest.mark.parametrize("action, message", [
    (Control(throttle=float("nan")), "throttle must be finite"),
    (None, "must be a Control or"),
    ("full throttle", "must be a Control or"),
    ((0.5, "0", 0.0), "brake must be a number"),
])
def test_bad_actions_fail_the_episode_with_agent_step_and_value(tiny_suite, tmp_path, action, message):
    episodes = _run(tiny_suite, [ScriptedAgent("bad", action), ExpertAgent()], tmp_path)
    bad = episodes[episodes.agent == "bad"]
    assert (bad.status == "failed").all() and (bad.failed_phase == "action").all()
    assert bad.error.str.contains(message).all() and bad.error.str.contains("agent 'bad', step 1").all()
    assert (episodes[episodes.agent == "expert"].status != "failed").all()  # the run went on


def test_sys_exit_in_an_agent_fails_its_episode_not_the_run(tiny_suite, tmp_path):
    episodes = _run(tiny_suite, [ScriptedAgent("quitter", lambda: sys.exit(3)), ExpertAgent()], tmp_path)
    assert (episodes[episodes.agent == "quitter"].status == "failed").all()
    assert (episodes[episodes.agent == "expert"].status != "failed").all()


def test_a_hung_agent_times_out_and_the_run_goes_on(tiny_suite, tmp_path):
    def hang():
        time.sleep(30)

    started = time.monotonic()
    episodes = _run(tiny_suite, [ScriptedAgent("hung", hang), ExpertAgent()], tmp_path, step_timeout_s=0.3)
    assert time.monotonic() - started < 20
    hung = episodes[episodes.agent == "hung"]
    assert (hung.status == "failed").all() and hung.error.str.contains("agent timeout").all()
    assert (hung.failure == "infrastructure").all()  # a harness limit: --resume runs it again
    assert (episodes[episodes.agent == "expert"].status != "failed").all()


def test_steps_carry_their_episode_and_failed_episodes_keep_theirs(tiny_suite, tmp_path):
    calls = {"n": 0}

    def third_step_fails():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return Control(throttle=0.3)

    episodes = _run(tiny_suite, [ScriptedAgent("flaky", third_step_fails)], tmp_path)
    steps = pd.read_parquet(tmp_path / "run" / "steps.parquet")
    assert {"episode", "agent", "scenario", "seed", "failed"} <= set(steps.columns)
    failed = steps[steps.failed]
    assert len(failed) == 2 and set(failed.seed) == {1}  # the two steps driven before the failure
    for row in episodes.itertuples():
        assert (steps.seed == row.seed).sum() == row.steps


def _cli(tiny_suite, tmp_path, *extra):
    return main(["run", "--suite", str(tiny_suite), "--out", str(tmp_path), "--quiet", *extra])


def test_resume_quarantines_a_torn_episode_file_and_reruns_it(tiny_suite, tmp_path):
    assert _cli(tiny_suite, tmp_path, "--agent", "constant", "--run-id", "r") == 0
    torn = tmp_path / "r" / "episodes" / f"{episode_key('constant', 'short-cruise', 2)}.parquet"
    torn.write_bytes(torn.read_bytes()[:40])
    with pytest.warns(UserWarning, match="unreadable"):
        assert _cli(tiny_suite, tmp_path, "--resume", "r") == 0
    assert sorted(RunDir(tmp_path / "r").episodes().seed) == [1, 2, 3]
    assert list((tmp_path / "r" / "quarantine").glob("*.parquet"))


def test_resume_refuses_other_seeds_or_other_suite_contents(tiny_suite, tmp_path, capsys):
    assert _cli(tiny_suite, tmp_path, "--agent", "constant", "--run-id", "r", "--seeds", "1") == 0
    assert _cli(tiny_suite, tmp_path, "--agent", "constant", "--resume", "r", "--seeds", "1", "2") == 2
    assert "suite_hash" in capsys.readouterr().err
    tiny_suite.write_text(tiny_suite.read_text().replace("vehicles: 4", "vehicles: 5"))  # same name, other content
    assert _cli(tiny_suite, tmp_path, "--agent", "constant", "--resume", "r", "--seeds", "1") == 2
    assert "cannot be resumed with different settings" in capsys.readouterr().err


def test_infrastructure_failures_rerun_on_resume_agent_failures_stay(tiny_suite, tmp_path):
    run = RunDir(tmp_path / "r")
    run.create({}, [])
    suite = load_suite(tiny_suite)
    episodes = run_suite(suite, [ScriptedAgent("bad", None)], run, progress=False)
    assert (episodes.failure == "agent").all()
    assert run.finished() == {episode_key("bad", "short-cruise", s) for s in (1, 2, 3)}  # results: kept
    assert run.finished(retry_failed=True) == set()
    row = pd.read_parquet(next((tmp_path / "r" / "quarantine").glob("episodes-*.parquet")))
    assert row.error.iloc[0]


def test_one_writer_per_run_directory(tmp_path):
    first, second = RunDir(tmp_path / "r"), RunDir(tmp_path / "r")
    first.lock()
    with pytest.raises(RunError, match="being written by another prunedrive process"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1", "1"], "repeats a seed"),
    (["--seeds", "-1"], "outside"),
    (["--run-id", "../escape"], "run id"),
    (["--run-id", "/tmp/abs"], "run id"),
])
def test_bad_run_options_are_refused_before_a_run_directory_exists(tiny_suite, tmp_path, capsys, argv, message):
    assert _cli(tiny_suite, tmp_path / "out", "--agent", "constant", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [["--retries", "-1"], ["--workers", "0"]])
def test_negative_retries_and_zero_workers_are_usage_errors(tiny_suite, tmp_path, option):
    with pytest.raises(SystemExit) as exit_info:
        _cli(tiny_suite, tmp_path, *option)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("text, message", [
    ("name: ../../x\nscenarios:\n  - {name: a, kind: highway_cruise}\n", "field 'name'"),
    ("name: t\nscenarios:\n  - {name: ../a, kind: highway_cruise}\n", "field 'name'"),
    ("name: t\nscenarios:\n  - {name: a, kind: [highway_cruise]}\n", "field 'kind'"),
    ("name: t\nscenarios:\n  - {name: a, kind: highway_cruise}\n  - {name: A, kind: highway_cruise}\n", "ignoring case"),
    ("name: t\nx: &a [1, 2]\nscenarios: *a\n", "aliases"),
])
def test_hostile_suite_files_are_refused_with_a_message(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=message):
        load_suite(path)


def test_an_alias_bomb_is_refused_fast(tmp_path):
    lines = ["name: t", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    lines += ["description: *a11", "scenarios:", "  - {name: a, kind: highway_cruise}"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines))
    started = time.monotonic()
    with pytest.raises(ScenarioError, match="aliases"):
        load_suite(path)
    assert time.monotonic() - started < 2


def test_many_scenarios_load_in_linear_time(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: big\nscenarios:\n" + "".join(f"  - {{name: s{i}, kind: highway_cruise}}\n"
                                                         for i in range(5000)))
    started = time.monotonic()
    assert len(load_suite(path).scenarios) == 5000
    assert time.monotonic() - started < 10


def test_exit_code_3_lists_infrastructure_failures(tiny_suite, tmp_path, capsys, monkeypatch):
    from prunedrive.harness import env
    from prunedrive.harness.backends.base import SimulatorError

    def dead_simulator(scenario, render=False, **options):
        raise SimulatorError("no server at localhost:2000")

    monkeypatch.setattr(env, "make_backend", dead_simulator)
    assert _cli(tiny_suite, tmp_path, "--agent", "constant", "--run-id", "x", "--retries", "0") == 3
    err = capsys.readouterr().err
    assert "3 episode(s) failed for infrastructure reasons" in err and "--resume" in err
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["identity"]["suite_hash"]
    assert np.isfinite(RunDir(tmp_path / "x").episodes().driving_score).all()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from prunedrive.app.train import untrained_model
    from prunedrive.models.data import synthetic_split
    from prunedrive.models.presets import PRESETS

    path = tmp_path_factory.mktemp("m") / "model"
    untrained_model(PRESETS["tiny"], synthetic_split(8, seed=1)).save_pretrained(path)
    return path


def _broken_copy(model_dir, tmp_path, name, mutate):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(model_dir, copy)
    mutate(copy / name)
    return copy


@pytest.mark.parametrize("name, mutate, message", [
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:200]), "model.safetensors: not a readable safetensors"),
    ("model.safetensors", lambda p: p.write_bytes(b"not safetensors at all"), "model.safetensors: not a readable"),
    ("config.json", lambda p: p.write_text("{not json"), "config.json: not valid JSON"),
    ("tokenizer.json", lambda p: p.write_text("[]"), "tokenizer.json: not a readable tokenizer"),
    ("config.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "hidden_size": 30000})),
     "does not match .*config.json"),
])
def test_model_directory_errors_name_the_file(model_dir, tmp_path, name, mutate, message):
    from prunedrive.models.driving_llm import DrivingLLM

    broken = _broken_copy(model_dir, tmp_path, name, mutate)
    started = time.monotonic()
    with pytest.raises(ValueError, match=message):
        DrivingLLM.from_pretrained(broken)
    assert time.monotonic() - started < 5  # the shape check happens before any allocation


def test_prune_refuses_to_overwrite_its_input_or_a_non_empty_directory(model_dir, tmp_path, capsys):
    assert main(["prune", "--method", "magnitude", "--sparsity", "0.5", "--model", str(model_dir),
                 "--model-out", str(model_dir)]) == 2
    assert "input model directory" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["prune", "--method", "magnitude", "--sparsity", "0.5", "--model", str(model_dir),
                 "--model-out", str(busy)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (busy / "notes.txt").read_text() == "mine"
    assert main(["prune", "--method", "magnitude", "--sparsity", "0.5", "--model", str(model_dir),
                 "--model-out", str(busy), "--overwrite"]) == 0
    assert (busy / "sparsity.json").is_file() and not (busy / "notes.txt").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_a_missing_carla_server_fails_fast_naming_host_and_port():
    pytest.importorskip("carla")
    from prunedrive.app.run import probe_simulators
    from prunedrive.harness.backends.base import SimulatorError

    suite = load_suite("carla-devtest")
    started = time.monotonic()
    with pytest.raises(SimulatorError, match="no CARLA server answered at 127.0.0.1:1 within 1 s"):
        probe_simulators(suite, {"host": "127.0.0.1", "port": 1, "timeout_s": 1.0}, None)  # the real client
    assert time.monotonic() - started < 10
    with pytest.raises(SimulatorError, match="127.0.0.1:3"):
        probe_simulators(suite, {"timeout_s": 1.0}, ["127.0.0.1:3", "127.0.0.1:4"])  # each Ray worker's server


def test_the_cli_exits_3_before_any_run_directory_when_the_simulator_is_not_there(tmp_path, capsys, monkeypatch):
    from prunedrive.harness.backends.base import SimulatorError
    from prunedrive.harness.backends.carla import CarlaBackend

    def absent(cls, scenario, **options):
        raise SimulatorError(f"no CARLA server answered at {options.get('host')}:{options.get('port')}")

    monkeypatch.setattr(CarlaBackend, "probe", classmethod(absent))
    assert main(["run", "--suite", "carla-devtest", "--carla-host", "h", "--carla-port", "7", "--out",
                 str(tmp_path), "--quiet"]) == 3
    assert "h:7" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_writers_leftover_temporary_files_are_removed_by_the_next_writer(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create({}, [])
    leftover = tmp_path / "r" / "steps" / ".expert__s__1.parquet.x1y2z3.tmp"  # as a kill -9 mid-write leaves
    leftover.write_bytes(b"half a parquet")
    run.lock()
    try:
        assert not leftover.exists() and run.finished() == set()
    finally:
        run.unlock()
