"""Issue 24, round three: every option is checked before anything runs (exit 2 naming the option and what is
allowed), exit 0 only when every planned episode was scored, and hostile agents (a factory that raises or
exits, os._exit inside act(), names that cannot name files) are messages or their episodes' own failures."""
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from prunedrive.app.cli import main
from prunedrive.app.run import exit_code
from prunedrive.harness.regress import RegressInputError, compare
from prunedrive.harness.results import RunDir, episode_key

HOSTILE = """
import os, sys
from prunedrive.harness.action import Control


class Agent:
    def __init__(self, name="hostile", on_act=None, on_reset=None):
        self.name, self.on_act, self.on_reset = name, on_act, on_reset

    def reset(self, scenario):
        if self.on_reset:
            self.on_reset()

    def act(self, observation):
        if self.on_act:
            self.on_act()
        return Control(throttle=0.5)


def exits_in_factory(): sys.exit(0)
def os_exits_in_factory(): os._exit(0)
def raises_in_factory(): raise RuntimeError("no licence for this driver")
def os_exits_in_act(): return Agent("osexit", on_act=lambda: os._exit(0))
def os_exits_in_reset(): return Agent("osexitreset", on_reset=lambda: os._exit(0))
def named_none(): return Agent(None)
def named_long(): return Agent("a" * 300)
def named_slash(): return Agent("../up")
def any_keywords(**kwargs): return Agent("anykw")
def needs_speed(speed): return Agent("needsspeed")
def out_of_memory(): raise MemoryError("8 GiB asked")
"""


@pytest.fixture
def one_suite(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("name: one\nscenarios:\n  - {name: short, kind: highway_cruise, seeds: [1], lanes: 2, vehicles: 4, "
                    "speed_limit_mps: 20, route_length_m: 60, duration_s: 12}\n")
    return path


@pytest.fixture
def hostile(importable):
    """A module of hostile agent factories, importable here (sys.path) and in a subprocess (PYTHONPATH)."""
    return importable("hostile_agents", HOSTILE)


def _run(suite, out, *extra):
    return main(["run", "--suite", str(suite), "--out", str(out), "--quiet", *extra])


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# -- 1. options ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, allowed", [
    ("--step-timeout", "-1", "(0, 1e+06]"), ("--step-timeout", "nan", "finite"), ("--step-timeout", "0", "(0, 1e+06]"),
    ("--step-timeout", "inf", "finite"), ("--episode-timeout", "-5", "(0, 1e+06]"),
    ("--episode-timeout", "0", "(0, 1e+06]"), ("--batch", "99999999999", "1..4096"), ("--batch", "0", "1..4096"),
    ("--workers", "100000", "1..1024"), ("--carla-port", "99999", "1..65535"), ("--carla-port", "0", "1..65535"),
    ("--retries", "1000", "0..10"),
])
def test_run_options_out_of_range_are_usage_errors_naming_option_and_range(one_suite, tmp_path, capsys, option,
                                                                          value, allowed):
    err = _usage_error(["run", "--suite", str(one_suite), "--agent", "constant", "--out", str(tmp_path / "out"),
                        "--quiet", option, value], capsys)
    assert option in err and allowed in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_timeouts_say_in_help_that_zero_is_not_no_limit():
    from prunedrive.app.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    helps = {a.option_strings[0]: a.help for a in run._actions if a.option_strings}
    assert "no 'no limit'" in helps["--step-timeout"] and "no 'no limit'" in helps["--episode-timeout"]


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_that_is_a_file_is_a_usage_error(one_suite, tmp_path, capsys, where):
    blocker = tmp_path / "results.txt"
    blocker.write_text("mine")
    out = blocker if where == "file" else blocker / "sub"
    err = _usage_error(["run", "--suite", str(one_suite), "--agent", "constant", "--out", str(out), "--quiet"], capsys)
    assert "--out" in err and "not a directory" in err and blocker.read_text() == "mine"


@pytest.mark.parametrize("argv, option", [
    (["bench", "--batch", "99999999999"], "--batch"), (["bench", "--workers", "0"], "--workers"),
    (["bench", "--sparsities", "0.5", "nan"], "--sparsities"), (["bench", "--sparsities", "1.5"], "--sparsities"),
    (["claims", "--batch", "5000"], "--batch"), (["claims", "--workers", "99999"], "--workers"),
    (["regress", "a", "b", "--max-drop", "nan"], "--max-drop"),
    (["regress", "a", "b", "--max-drop", "-1"], "--max-drop"),
    (["regress", "a", "b", "--alpha", "nan"], "--alpha"), (["regress", "a", "b", "--alpha", "1"], "--alpha"),
    (["regress", "a", "b", "--max-collision-increase", "inf"], "--max-collision-increase"),
    (["regress", "a", "b", "--max-slowdown", "nan"], "--max-slowdown"),
    (["regress", "a", "b", "--max-slowdown", "0"], "--max-slowdown"),
    (["regress", "a", "b", "--n-boot", "10000000000"], "--n-boot"),
])
def test_bench_claims_and_regress_options_are_checked_before_anything_runs(tmp_path, capsys, argv, option):
    err = _usage_error([*argv, "--out", str(tmp_path / "out")], capsys)
    assert option in err and "allowed" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [
    ("--sparsity", "nan"), ("--sparsity", "1"), ("--sparsity", "-0.5"), ("--encoder-sparsity", "inf"),
    ("--owl-m", "nan"), ("--owl-m", "0"), ("--owl-lambda", "-0.1"), ("--owl-lambda", "nan"),
])
def test_prune_numbers_are_checked_before_anything_runs(tmp_path, capsys, option, value):
    err = _usage_error(["prune", "--method", "owl", "--model", str(tmp_path), "--model-out", str(tmp_path / "out"),
                        *(["--sparsity", "0.5"] if option != "--sparsity" else []), option, value], capsys)
    assert option in err and "allowed" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("thresholds, message", [
    ({"max_drop": math.nan}, "max_drop"), ({"max_drop": -1.0}, "max_drop"),
    ({"max_collision_increase": math.inf}, "max_collision_increase"), ({"max_slowdown": math.nan}, "max_slowdown"),
    ({"max_slowdown": 0.0}, "max_slowdown"), ({"alpha": math.nan}, "alpha"),
])
def test_regress_refuses_non_finite_thresholds_through_the_api_too(thresholds, message):
    episodes = pd.DataFrame({"agent": ["a"] * 3, "scenario": ["s"] * 3, "seed": [1, 2, 3], "status": ["finished"] * 3,
                             "driving_score": [90.0, 80.0, 85.0], "collisions": [0] * 3, "km_driven": [1.0] * 3})
    worse = episodes.assign(driving_score=[10.0, 5.0, 0.0])
    # Before the fix NaN compared False everywhere: a 80-point drop passed the gate.
    with pytest.raises(RegressInputError, match=message):
        compare(episodes, worse, **thresholds)


def test_an_unknown_agent_arg_keyword_names_agent_keyword_and_what_it_accepts(one_suite, tmp_path, capsys):
    assert _run(one_suite, tmp_path / "out", "--agent", "constant", "--agent-arg", "throtle=0.2") == 2
    err = capsys.readouterr().err
    assert "constant" in err and "'throtle'" in err and "throttle" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_agent_arg_keywords_of_a_factory_with_kwargs_or_a_required_one(one_suite, tmp_path, capsys, hostile):
    assert _run(one_suite, tmp_path / "out", "--agent", "hostile_agents:any_keywords", "--agent-arg", "x=1") == 0
    assert _run(one_suite, tmp_path / "out2", "--agent", "hostile_agents:needs_speed") == 2
    err = capsys.readouterr().err
    assert "hostile_agents:needs_speed" in err and "speed" in err


# -- 2. exit codes: 0 only when every planned episode was scored --------------------------------------------

def test_exit_code_is_3_while_a_planned_episode_has_no_row_and_resume_runs_it(one_suite, tmp_path, capsys):
    assert _run(one_suite, tmp_path, "--agent", "constant", "--seeds", "1", "2", "--run-id", "r") == 0
    run = RunDir(tmp_path / "r")
    episodes = run.episodes()
    missing = episode_key("constant", "short", 2)
    capsys.readouterr()
    assert exit_code(episodes[episodes.seed == 1], run) == 3  # before the fix: 0, with seed 2 never scored
    err = capsys.readouterr().err
    assert "constant short seed=2" in err and "--resume" in err
    assert exit_code(episodes.iloc[0:0], run) == 3  # no rows at all: nothing scored is not success
    (run.path / "episodes" / f"{missing}.parquet").unlink()
    (run.path / "episodes.parquet").unlink()
    assert _run(one_suite, tmp_path, "--resume", "r") == 0
    assert sorted(run.episodes().seed) == [1, 2]


@pytest.mark.parametrize("factory, error", [
    ("exits_in_factory", "SystemExit"), ("raises_in_factory", "no licence for this driver"),
    ("os_exits_in_factory", "os._exit(0)"),
])
def test_a_factory_that_raises_or_exits_is_exit_2_naming_the_agent(one_suite, tmp_path, capsys, hostile, factory,
                                                                   error):
    assert _run(one_suite, tmp_path / "out", "--agent", f"hostile_agents:{factory}") == 2
    err = capsys.readouterr().err
    assert f"cannot build agent hostile_agents:{factory}" in err and error in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_factory_out_of_memory_is_infrastructure_exit_3(one_suite, tmp_path, capsys, hostile):
    assert _run(one_suite, tmp_path / "out", "--agent", "hostile_agents:out_of_memory") == 3
    assert "out of memory: 8 GiB asked" in capsys.readouterr().err


@pytest.mark.parametrize("limits", [{"step_timeout_s": math.nan}, {"episode_timeout_s": -5.0},
                                    {"step_timeout_s": 0.0}])
def test_drive_refuses_bad_time_limits_from_api_callers_too(one_suite, tmp_path, limits):
    from prunedrive.agents.registry import AgentSpec
    from prunedrive.app.run import drive
    from prunedrive.harness.results import RunError
    from prunedrive.scenarios.loader import load_suite

    with pytest.raises(RunError, match="timeout must be a finite number of seconds > 0"):
        drive(load_suite(one_suite), [AgentSpec("constant")], tmp_path / "out", progress=False, **limits)
    assert not (tmp_path / "out").exists()


def _cli_subprocess(hostile, *argv):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hostile), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "prunedrive.app.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("factory, batch, phase", [
    ("os_exits_in_act", "1", "act"), ("os_exits_in_reset", "1", "agent reset"), ("os_exits_in_act", "2", "act"),
])
def test_os_exit_inside_an_in_process_agent_fails_its_episode_not_the_run(one_suite, tmp_path, hostile, factory,
                                                                         batch, phase):
    # A subprocess: before the fix os._exit(0) ended the test process itself, with nothing written.
    done = _cli_subprocess(hostile, "run", "--suite", str(one_suite), "--out", str(tmp_path), "--run-id", "r",
                           "--agent", f"hostile_agents:{factory}", "expert", "--seeds", "1", "2", "--batch", batch,
                           "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]  # every planned episode scored: the agent's failure is a score
    episodes = pd.read_parquet(tmp_path / "r" / "episodes.parquet")
    assert len(episodes) == 4
    own = episodes[episodes.agent != "expert"]
    assert (own.status == "failed").all() and (own.failure == "agent").all() and (own.failed_phase == phase).all()
    assert own.error.str.contains(r"os\._exit\(0\)").all()
    assert (episodes[episodes.agent == "expert"].status != "failed").all()  # the run went on


def test_the_exit_guard_restores_os_exit_and_leaves_other_threads_alone():
    import threading

    from prunedrive.harness.limits import AgentExit, exits_raise

    real = os._exit
    with pytest.raises(AgentExit, match=r"x\.act\(\) called os\._exit\(7\)"):
        with exits_raise("x.act()"):
            assert os._exit is not real
            os._exit(7)
    assert os._exit is real
    seen = []
    with exits_raise("x.act()"):
        # Another thread's os._exit is its own: real (not tried here); the guard only answers its own thread.
        worker = threading.Thread(target=lambda: seen.append(os._exit.__name__))
        worker.start()
        worker.join()
    assert seen and os._exit is real


# -- 3. agent names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory, shown", [("named_none", "None"), ("named_long", "a" * 20),
                                            ("named_slash", "../up")])
def test_an_agent_name_that_cannot_name_files_is_exit_2(one_suite, tmp_path, capsys, hostile, factory, shown):
    assert _run(one_suite, tmp_path / "out", "--agent", f"hostile_agents:{factory}") == 2
    err = capsys.readouterr().err
    assert shown in err and "letters, digits and _.=+-" in err and "128" in err
    assert not (tmp_path / "out").exists()
