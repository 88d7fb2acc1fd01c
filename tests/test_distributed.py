"""The Ray runner: same numbers as in-process, a dead worker loses nothing, resume skips what is done.

The first test lets run_suite_distributed start and stop its own local Ray, as the CLI does; the others
share one local Ray (2 CPUs) started for the module (run_suite_distributed leaves an already-initialised
Ray running), so the Ray start-up (~5-10 s on 2 cores) is paid twice, not once per test.
"""
import functools
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from prunedrive.agents.expert import ExpertAgent
from prunedrive.harness.results import RunDir
from prunedrive.harness.runner import run_suite
from prunedrive.scenarios.loader import load_suite

from prunedrive.harness.backends.base import SimulatorError
from prunedrive.agents.registry import AgentError, AgentSpec
from prunedrive.harness.distributed import run_suite_distributed
from prunedrive.harness.env_pool import default_make_env
from prunedrive.harness.lockstep import run_episode_with_retries

try:
    import ray
except ImportError:  # the Ray tests skip; the shared retry logic is still tested
    ray = None
else:
    # The test agents below live in this module, which Ray's worker processes cannot import: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


SCORE_COLUMNS = ["agent", "scenario", "seed", "status", "driving_score", "route_completion", "infraction_penalty",
                 "steps", "events", "collisions"]
ROOT = Path(__file__).resolve().parents[1]


class CrashingAgent(ExpertAgent):
    """The expert, except that it kills its own process at step 3 (os._exit: no exception, no cleanup, as an
    OOM kill or a segfault would): in every episode of scenario `only`, or else in the first episode that
    reaches step 3 in any process (claimed by creating `marker` exclusively), once."""

    name = "expert"

    def __init__(self, marker: str, only: str | None = None):
        super().__init__()
        self.marker, self.only, self.calls, self.scenario = Path(marker), only, 0, None

    def reset(self, scenario):
        super().reset(scenario)
        self.calls, self.scenario = 0, scenario.name

    def act(self, observation):
        self.calls += 1
        if self.calls == 3 and self._crash_now():
            os._exit(1)
        return super().act(observation)

    def _crash_now(self) -> bool:
        if self.only is not None:
            return self.scenario == self.only
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "tiny.yaml"
    path.write_text("name: tiny\nscenarios:\n  - name: short-cruise\n    kind: highway_cruise\n    seeds: [1, 2, 3]\n"
                    "    lanes: 2\n    vehicles: 4\n    speed_limit_mps: 20\n    route_length_m: 60\n"
                    "    duration_s: 12\n")
    return load_suite(path)


@pytest.fixture(scope="module")
def in_process(suite, tmp_path_factory):
    run_dir = RunDir(tmp_path_factory.mktemp("inproc") / "run")
    run_dir.create({}, [])
    return _scores(run_suite(suite, [ExpertAgent()], run_dir, progress=False))


def _scores(episodes: pd.DataFrame) -> pd.DataFrame:
    return episodes.sort_values(["agent", "scenario", "seed"])[SCORE_COLUMNS].reset_index(drop=True)


def _new_run(path: Path) -> RunDir:
    run_dir = RunDir(path)
    run_dir.create({}, [])
    return run_dir


@pytest.mark.ray
@pytest.mark.skipif(ray is None, reason="ray is not installed (pip install ray)")
def test_two_workers_give_the_in_process_numbers(suite, in_process, tmp_path):
    """Also the path the CLI takes: a local Ray started for the run and shut down after it."""
    assert not ray.is_initialized()
    run_dir = _new_run(tmp_path / "run")
    episodes = run_suite_distributed(suite, [AgentSpec("expert")], run_dir, workers=2, progress=False)
    assert not ray.is_initialized()
    pd.testing.assert_frame_equal(_scores(episodes), in_process)
    assert (tmp_path / "run" / "episodes.parquet").is_file() and (tmp_path / "run" / "steps.parquet").is_file()
    steps = pd.read_parquet(tmp_path / "run" / "steps.parquet")
    assert len(steps) == episodes.steps.sum()


@pytest.mark.ray
@pytest.mark.skipif(ray is None, reason="ray is not installed (pip install ray)")
def test_a_killed_worker_loses_nothing_and_its_episode_is_rerun(local_ray, suite, in_process, tmp_path):
    marker = tmp_path / "crashed"
    spec = functools.partial(CrashingAgent, str(marker))
    run_dir = _new_run(tmp_path / "run")
    episodes = run_suite_distributed(suite, [spec], run_dir, workers=2, progress=False, retries=1)
    assert marker.is_file(), "the worker should have killed itself once"
    assert int(marker.read_text()) != os.getpid()
    assert sorted(episodes.seed) == [1, 2, 3]  # none lost, none repeated
    pd.testing.assert_frame_equal(_scores(episodes), in_process)  # the re-run episode is whole and the same
    assert not list((tmp_path / "run").rglob(".*.tmp"))


@pytest.mark.ray
@pytest.mark.skipif(ray is None, reason="ray is not installed (pip install ray)")
def test_a_worker_that_always_dies_ends_as_a_failed_episode(local_ray, suite, tmp_path):
    doomed = replace(suite.scenarios[0], name="doomed", seeds=(1,))
    two = replace(suite, scenarios=(replace(suite.scenarios[0], seeds=(1,)), doomed))
    spec = functools.partial(CrashingAgent, str(tmp_path / "m"), "doomed")
    episodes = run_suite_distributed(two, [spec], _new_run(tmp_path / "run"), workers=2, progress=False,
                                     retries=1).set_index("scenario")
    assert episodes.loc["short-cruise", "status"] != "failed"
    assert episodes.loc["doomed", "status"] == "failed" and "worker died 2 times" in episodes.loc["doomed", "error"]


@pytest.mark.ray
@pytest.mark.skipif(ray is None, reason="ray is not installed (pip install ray)")
def test_resume_runs_only_the_missing_episodes(local_ray, suite, in_process, tmp_path):
    run_dir = _new_run(tmp_path / "run")
    first = replace(suite, scenarios=(replace(suite.scenarios[0], seeds=(2,)),))
    run_suite(first, [ExpertAgent()], run_dir, progress=False)
    [done] = (tmp_path / "run" / "episodes").glob("*.parquet")
    before = done.stat().st_mtime_ns
    episodes = run_suite_distributed(suite, [AgentSpec("expert")], run_dir, workers=2, progress=False)
    assert done.stat().st_mtime_ns == before  # the finished episode was not run again
    pd.testing.assert_frame_equal(_scores(episodes), in_process)


def test_bad_specs_and_options_are_messages(suite, tmp_path):
    run_dir = _new_run(tmp_path / "run")
    with pytest.raises(AgentError, match="needs --model"):  # checked in the driver, before any worker starts
        AgentSpec("llm").check()
    with pytest.raises(AgentError, match="unknown agent"):
        AgentSpec("nope").check()
    with pytest.raises(ValueError, match="as many simulator servers"):
        run_suite_distributed(suite, [AgentSpec("expert")], run_dir, workers=3, servers=["a:2000", "b:2000"])
    with pytest.raises(ValueError, match="host:port"):
        run_suite_distributed(suite, [AgentSpec("expert")], run_dir, workers=1, servers=["a"])


def test_cli_checks_worker_options_before_any_ray(tmp_path, capsys, monkeypatch):
    from prunedrive.app.cli import main

    if ray is not None:  # another test's module-scoped Ray may be up; what matters is that this CLI starts none
        monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("ray.init was called"))

    common = ["run", "--suite", "smoke", "--out", str(tmp_path), "--quiet"]
    assert main(common + ["--carla-servers", "a:2000"]) == 2
    assert "--carla-servers needs --workers" in capsys.readouterr().err
    carla = ["run", "--suite", "carla-devtest", "--out", str(tmp_path), "--quiet", "--workers", "2"]
    assert main(carla + ["--carla-servers", "a:2000"]) == 2  # named by its flag, not as "simulator servers"
    assert "--workers 2 needs as many servers in --carla-servers (one per worker), got 1" in capsys.readouterr().err
    assert main(carla + ["--carla-servers", "a:2000", "b"]) == 2
    assert "--carla-servers 'b': expected HOST:PORT" in capsys.readouterr().err
    assert main(common + ["--workers", "2", "--agent", "llm"]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert main(common + ["--workers", "2", "--agent", "llm", "--model", str(tmp_path / "missing")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was started, no run directory left behind


def test_ray_is_not_imported_without_workers():
    code = ("import sys, prunedrive.app.cli, prunedrive.harness.distributed, prunedrive.harness.runner, "
            "prunedrive.report.write, prunedrive.harness.regress; prunedrive.app.cli.build_parser(); assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


class FlakySimulator:
    """make_env whose env fails (SimulatorError, as a dead CARLA server) on the first `failures` resets."""

    def __init__(self, failures: int):
        self.failures, self.made = failures, 0

    def __call__(self, scenario, record, **options):
        self.made += 1
        env = default_make_env(scenario, record, **options)
        if self.failures > 0:
            self.failures -= 1

            def reset(**kwargs):
                raise SimulatorError("server went away")

            env.reset = reset
        return env


def test_a_simulator_failure_reconnects_and_retries_then_fails_cleanly(suite):
    scenario, make_env = suite.scenarios[0], FlakySimulator(failures=1)
    envs = {}
    row, steps = run_episode_with_retries(envs, ExpertAgent(), scenario, 1, run_id="r", make_env=make_env,
                                          retries=2, backoff_s=0)
    assert make_env.made == 2 and row["status"] != "failed" and len(steps) == row["steps"] > 0
    assert set(envs) == {scenario.name}  # the working env is kept for the next episode
    envs, make_env = {}, FlakySimulator(failures=5)
    row, steps = run_episode_with_retries(envs, ExpertAgent(), scenario, 1, run_id="r", make_env=make_env,
                                          retries=2, backoff_s=0)
    assert make_env.made == 3 and row["status"] == "failed" and row["error"] == "simulator: server went away"
    assert not envs
