"""--mlflow: one MLflow run per agent holding the summary's numbers; a resumed run updates it; no MLflow
import without the flag, and a clear message before any driving when it is asked for but missing.

MLflow is imported inside the tests, not at collection: under a running test (PYTEST_CURRENT_TEST) it
sends no usage telemetry.
"""
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest

from prunedrive.app.cli import main
from prunedrive.app.mlflow_log import AGENT_TAG, INSTALL_HINT, RUN_ID_TAG, log_run, tracking_uri
from prunedrive.harness.results import RunDir, episode_key
from prunedrive.harness.summary import summarize

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_METRICS = ("driving_score_mean", "route_completion_mean", "infraction_penalty_mean", "collisions_per_km",
                   "success_rate", "agent_wall_ms_p50", "agent_wall_ms_p95")


def logged_runs(uri: str, experiment: str) -> dict:
    """{agent: MLflow run} of an experiment, read back through MLflow's own client."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    by_agent = {run.data.tags[AGENT_TAG]: run for run in runs}
    assert len(by_agent) == len(runs), "one MLflow run per agent"
    return by_agent


def assert_logs_the_summary(run: RunDir, runs: dict) -> None:
    summary = summarize(run.episodes(), ["agent"]).set_index("agent")
    assert set(runs) == set(summary.index)
    for agent, logged in runs.items():
        for column in SUMMARY_METRICS + ("episodes",):
            assert logged.data.metrics[column] == pytest.approx(summary.loc[agent, column]), column


def test_a_run_logs_one_mlflow_run_per_agent(tiny_suite, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the default store goes beside the run, whatever the working directory
    out = tmp_path / "results"
    assert main(["run", "--suite", str(tiny_suite), "--agent", "expert", "--agent", "constant", "--seeds", "1",
                 "--out", str(out), "--run-id", "m", "--quiet", "--mlflow"]) == 0
    assert (out / "mlflow.db").is_file() and not list(elsewhere.iterdir())

    run = RunDir(out / "m")
    runs = logged_runs(tracking_uri("", out), "tiny")
    assert_logs_the_summary(run, runs)
    versions = run.manifest()["versions"]
    for agent, logged in runs.items():
        assert logged.info.run_name == f"m/{agent}" and logged.data.tags[RUN_ID_TAG] == "m"
        assert logged.info.status == "FINISHED"
        params = logged.data.params
        assert (params["suite"], params["agent"], params["seeds"]) == ("tiny", agent, "1")
        assert params["version.prunedrive"] == versions["prunedrive"]
        artifact = Path(urlparse(logged.info.artifact_uri).path) / "episodes.parquet"
        assert artifact.is_relative_to(out)
        pd.testing.assert_frame_equal(pd.read_parquet(artifact), pd.read_parquet(run.path / "episodes.parquet"))


def test_a_resumed_run_updates_its_mlflow_runs(tiny_suite, tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'store' / 'runs.db'}"
    command = ["run", "--suite", str(tiny_suite), "--agent", "expert", "--seeds", "1", "2", "--out", str(tmp_path),
               "--run-id", "r", "--quiet"]
    assert main(command) == 0
    run = RunDir(tmp_path / "r")
    (run.path / "episodes" / f"{episode_key('expert', 'short-cruise', 2)}.parquet").unlink()  # as if killed
    log_run(run, uri)  # the partial run
    [first] = logged_runs(uri, "tiny").values()
    assert first.data.metrics["episodes"] == 1

    assert main(command[:-3] + ["--resume", "r", "--quiet", "--mlflow", uri]) == 0
    runs = logged_runs(uri, "tiny")
    assert [r.info.run_id for r in runs.values()] == [first.info.run_id]  # updated, not duplicated
    assert_logs_the_summary(run, runs)
    assert runs["expert"].data.metrics["episodes"] == 2
    assert (tmp_path / "store" / "mlartifacts").is_dir()  # a given SQLite store keeps artifacts beside it


@pytest.mark.parametrize("missing", ["mlflow", "sqlalchemy"])
def test_missing_mlflow_is_a_message_before_any_driving(missing, tiny_suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now raises ImportError

    def never(*args, **kwargs):
        raise AssertionError("bench started without MLflow")

    monkeypatch.setattr("prunedrive.app.bench.run_bench", never)
    assert main(["run", "--suite", str(tiny_suite), "--out", str(tmp_path), "--run-id", "x", "--mlflow"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {INSTALL_HINT}"
    assert not (tmp_path / "x").exists()
    assert main(["bench", "--out", str(tmp_path), "--mlflow"]) == 2
    assert INSTALL_HINT in capsys.readouterr().err


def test_mlflow_is_not_imported_without_the_flag(tiny_suite, tmp_path):
    code = ("import sys, app.cli, app.bench; "
            f"assert app.cli.main(['run', '--suite', {str(tiny_suite)!r}, '--agent', 'constant', '--seeds', '1', "
            f"'--out', {str(tmp_path)!r}, '--quiet']) == 0; "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_extra_metrics_are_logged_beside_the_summary_and_non_numbers_are_left_out(tiny_suite, tmp_path):
    """What `bench` adds: each model's open-loop errors, under their own names, in the same MLflow run."""
    pytest.importorskip("mlflow")
    out = tmp_path / "results"
    assert main(["run", "--suite", str(tiny_suite), "--agent", "expert", "--seeds", "1",
                 "--out", str(out), "--run-id", "x", "--quiet"]) == 0
    extra = {"expert": {"open_loop.lon_control_error": 0.125, "open_loop.traffic_light_distance_error": float("nan"),
                        "open_loop.examples": {"action": ["Brake pedal 100%"]}}}
    log_run(RunDir(out / "x"), "", extra_metrics=extra)
    metrics = logged_runs(tracking_uri("", out), "tiny")["expert"].data.metrics
    assert metrics["open_loop.lon_control_error"] == 0.125
    assert "open_loop.traffic_light_distance_error" not in metrics and "open_loop.examples" not in metrics
    assert "driving_score_mean" in metrics
