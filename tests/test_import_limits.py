"""Nothing lost, round three: `import leaderboard` within limits and consistent, resume checks step files, unknown
scenario options refused. Hostile inputs are small generated files in tmp_path."""
import json
import time
from pathlib import Path

import pandas as pd
import pytest

import leaderboard_standin as lb
from prunedrive.app import import_leaderboard as importer
from prunedrive.app.cli import main
from prunedrive.app.import_leaderboard import STATUSES, import_leaderboard
from prunedrive.harness.results import RunDir, RunError, episode_key
from prunedrive.harness.summary import summarize
from prunedrive.harness.backends import check_suite
from prunedrive.scenarios.loader import Scenario, ScenarioError, load_suite


def results(records, **kwargs) -> dict:
    return lb.results_json(records, **kwargs)


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def record(route: int, status: str = "Perfect", score_route: float = 100.0, penalty: float = 1.0, rep: int = 0,
           **changes) -> dict:
    out = lb.route_record(route, rep, route, status, score_route, penalty)
    out.update(changes)
    return out


def cli_import(path: Path, out: Path, run_id: str = "lb") -> int:
    return main(["import", "leaderboard", str(path), "--run-id", run_id, "--out", str(out)])


# -- limits: refused before anything is made, naming the file and the field ------------------------------
def test_a_file_over_the_size_cap_is_refused_by_its_size_before_it_is_read(tmp_path, capsys):
    big = tmp_path / "huge.json"
    with open(big, "wb") as handle:  # sparse: no disk used; reading it would take the cap in memory
        handle.truncate(importer.MAX_RESULTS_BYTES + 1)
    assert cli_import(big, tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert str(big) in err and "a results file may have at most" in err
    assert not (tmp_path / "runs" / "lb").exists()


@pytest.mark.parametrize("depth", [200_000, 40])
def test_deep_nesting_is_a_message_not_a_recursion_error(tmp_path, capsys, depth):
    data = results([record(0)])
    data["extra"] = json.loads("[" * 40 + "]" * 40) if depth == 40 else None
    text = json.dumps(data) if depth == 40 else json.dumps(data)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    path = write(tmp_path / "deep.json", text)
    assert cli_import(path, tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "nested deeper than" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "lb").exists()


@pytest.mark.parametrize("route_id, message", [
    ("RouteScenario_" + "9" * 100_000 + "_rep0", "a route id may have at most 128"),
    ("RouteScenario_1_rep99999999999999999999999", "repetition 99999999999999999999999 is outside"),
    ("RouteScenario_1_rep4294967296", "is outside [0, 4294967295]"),
], ids=["100000-characters", "rep-1e22", "rep-2**32"])
def test_bad_route_ids_are_refused_and_leave_no_run_directory(tmp_path, capsys, route_id, message):
    path = write(tmp_path / "ids.json", results([record(0), record(1, route_id=route_id)]))
    assert cli_import(path, tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "_checkpoint.records[1].route_id" in err and message in err
    assert len(err) < 2000  # the 100,000-character id is not echoed whole
    assert not (tmp_path / "runs" / "lb").exists()
    # The run id is not blocked: a good file imports under it.
    good = write(tmp_path / "good.json", results([record(0), record(1)]))
    assert cli_import(good, tmp_path / "runs") == 0


def test_a_route_whose_escaped_episode_key_cannot_name_a_file_is_refused_before_the_run_exists(tmp_path):
    path = write(tmp_path / "pct.json", results([record(0, route_id="%" * 120 + "_rep0")]))  # 120 -> 360 escaped
    with pytest.raises(RunError, match=r"pct\.json: route %+_rep0 of agent 'leaderboard'.*at most 200"):
        import_leaderboard([path], RunDir(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_failure_while_writing_removes_what_the_import_made(tmp_path, monkeypatch):
    path = write(tmp_path / "r.json", results([record(0), record(1)]))

    def disk_full(self, episodes, steps):
        (self.path / "episodes.parquet").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunDir, "write_batch", disk_full)
    with pytest.raises(OSError, match="No space"):
        import_leaderboard([path], RunDir(tmp_path / "fresh"), progress=False)
    assert not (tmp_path / "fresh").exists()
    # Into a directory that was there before (say, made by hand): only what the import made goes.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OSError):
        import_leaderboard([path], RunDir(tmp_path / "mine"), progress=False)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    assert len(import_leaderboard([path], RunDir(tmp_path / "fresh"), progress=False)) == 2


# -- many routes: one batch, with progress -----------------------------------------------------------------
def test_ten_thousand_routes_import_in_one_batch_with_progress(tmp_path, monkeypatch, capsys):
    n = 10_000
    path = write(tmp_path / "many.json", results([record(i, rep=i % 3) for i in range(n)]))
    monkeypatch.setattr(importer, "PROGRESS_EVERY_S", 0.0)
    started = time.perf_counter()
    episodes = import_leaderboard([path], RunDir(tmp_path / "many"))
    took = time.perf_counter() - started
    assert len(episodes) == n and episodes.driving_score.eq(100.0).all()
    assert took < 60, f"{took:.1f} s"  # measured ~8 s on the shared 2-core machine; per-route fsyncs: > 10 min
    err = capsys.readouterr().err
    assert f"import leaderboard: {n}/{n} routes read" in err and err.count("routes read") > 1
    run = tmp_path / "many"
    # Two data files, not two per route.
    assert not list((run / "episodes").glob("*.parquet")) and not list((run / "steps").glob("*.parquet"))
    assert len(pd.read_parquet(run / "episodes.parquet")) == n
    steps = pd.read_parquet(run / "steps.parquet")
    assert len(steps) == 0 and {"episode", "agent", "scenario", "seed", "failed"} <= set(steps.columns)
    assert len(RunDir(run).manifest()["planned"]) == n


# -- consistency -----------------------------------------------------------------------------------------
def test_a_driving_score_above_the_route_completion_is_refused(tmp_path, capsys):
    bad = record(3, score_route=10.0)
    bad["scores"]["score_composed"] = 100.0
    path = write(tmp_path / "c.json", results([record(0), bad]))
    assert cli_import(path, tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert "_checkpoint.records[1].scores.score_composed" in err and "RouteScenario_3_rep0" in err
    assert "above its score_route 10" in err
    assert not (tmp_path / "runs" / "lb").exists()
    # Rounding to the evaluator's 6 digits is not an inconsistency.
    close = record(4, score_route=33.333333)
    close["scores"]["score_composed"] = 33.333334
    assert cli_import(write(tmp_path / "ok.json", results([close])), tmp_path / "runs") == 0


def test_an_unknown_status_is_refused_naming_the_route_and_the_allowed_ones(tmp_path, capsys):
    path = write(tmp_path / "s.json", results([record(0), record(7, status="Failed - Cosmic rays")]))
    assert cli_import(path, tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert "_checkpoint.records[1].status" in err and "RouteScenario_7_rep0" in err and "Cosmic rays" in err
    assert "'Failed - Agent got blocked'" in err and "'Started'" in err and "'Perfect'" in err
    assert not (tmp_path / "runs" / "lb").exists()


def test_every_status_the_evaluators_write_is_known():
    # leaderboard/utils/statistics_manager.py (master, leaderboard-2.0/2.1) and Bench2Drive's TickRuntime.
    for status in ("Perfect", "Completed", "Failed", "Failed - Agent deviated from the route",
                   "Failed - Agent got blocked", "Failed - Agent timed out", "Failed - Simulation crashed",
                   "Failed - Agent crashed", "Failed - Agent couldn't be set up",
                   "Failed - Agent's sensors were invalid", "Failed - TickRuntime", "Started"):
        assert status in STATUSES, status


def test_bench2drive_tick_runtime_is_a_scored_timeout(tmp_path):
    path = write(tmp_path / "t.json", results([record(0), record(1, status="Failed - TickRuntime",
                                                                 score_route=40.0, penalty=0.5)]))
    episodes = import_leaderboard([path], RunDir(tmp_path / "run"), progress=False).set_index("scenario")
    assert episodes.loc["RouteScenario_1", "status"] == "timeout"
    assert episodes.loc["RouteScenario_1", "driving_score"] == 20.0


def test_an_unscored_started_route_is_in_no_mean_and_the_import_exits_3(tmp_path, capsys):
    started = record(2, status="Started", score_route=100.0)  # as the hostile file had it: DS 100
    path = write(tmp_path / "st.json", results([record(0, score_route=50.0, penalty=1.0, status="Failed"),
                                                record(1, score_route=30.0, status="Failed"), started]))
    assert cli_import(path, tmp_path / "runs") == 3
    err = capsys.readouterr().err
    assert "1 route(s) were never finished" in err and "RouteScenario_2_rep0" in err
    run = RunDir(tmp_path / "runs" / "lb")
    episodes = run.episodes()
    assert sorted(episodes.scenario) == ["RouteScenario_0", "RouteScenario_1"]
    assert summarize(episodes, ["agent"]).iloc[0]["driving_score_mean"] == pytest.approx(40.0)  # not (50+30+100)/3
    manifest = run.manifest()
    assert episode_key("leaderboard", "RouteScenario_2", 0) in manifest["planned"]
    assert manifest["config"]["unscored"] == [{"route_id": "RouteScenario_2_rep0", "status": "Started",
                                               "file": str(path)}]
    # Only unscored routes: nothing to import.
    only = write(tmp_path / "only.json", results([started]))
    assert cli_import(only, tmp_path / "runs", "only") == 2
    assert "no scored route" in capsys.readouterr().err and not (tmp_path / "runs" / "only").exists()


# -- resume checks the steps files -------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["delete", "tear"])
def test_resume_reruns_an_episode_whose_steps_file_is_missing_or_torn(tiny_suite, tmp_path, damage):
    run_cli = ["run", "--suite", str(tiny_suite), "--out", str(tmp_path), "--quiet"]
    assert main([*run_cli, "--agent", "constant", "--run-id", "r"]) == 0
    run = tmp_path / "r"
    before = pd.read_parquet(run / "steps.parquet")
    lost = run / "steps" / f"{episode_key('constant', 'short-cruise', 2)}.parquet"
    if damage == "delete":
        lost.unlink()
    else:
        lost.write_bytes(lost.read_bytes()[:50])
    with pytest.warns(UserWarning, match="steps file"):
        assert main([*run_cli, "--resume", "r"]) == 0
    episodes = RunDir(run).episodes()
    assert sorted(episodes.seed) == [1, 2, 3]  # no episode twice
    after = pd.read_parquet(run / "steps.parquet")
    assert len(after) == len(before) and (after.seed == 2).sum() == (before.seed == 2).sum() > 0
    for row in episodes.itertuples():
        assert (after.seed == row.seed).sum() == row.steps


# -- scenario options --------------------------------------------------------------------------------------
def test_an_unknown_option_on_a_highway_scenario_is_refused_before_the_suite_runs(tiny_suite, tmp_path, capsys):
    tiny_suite.write_text(tiny_suite.read_text() + "    options: {foo: bar}\n")
    with pytest.raises(ScenarioError, match=r"tiny\.yaml: scenarios\[0\] \('short-cruise'\): unknown option 'foo'"
                                            r".*highway backend; allowed: none"):
        check_suite(load_suite(tiny_suite))
    assert main(["run", "--suite", str(tiny_suite), "--out", str(tmp_path), "--agent", "constant", "--quiet"]) == 2
    assert "unknown option 'foo'" in capsys.readouterr().err
    from prunedrive.harness.backends.highway import HighwayBackend

    with pytest.raises(ScenarioError, match="unknown option.*foo"):  # a Scenario made in code
        HighwayBackend(Scenario(name="x", kind="highway_cruise", options={"foo": 1}))


def test_an_unknown_carla_option_is_refused_and_the_shipped_carla_suite_loads(tmp_path):
    from prunedrive.harness.backends.carla import DEFAULT_OPTIONS, CarlaBackend

    assert CarlaBackend.OPTIONS == tuple(DEFAULT_OPTIONS)  # what it declares is what it reads
    assert all(s.options for s in check_suite(load_suite("carla-devtest")).scenarios)
    suite = tmp_path / "c.yaml"
    suite.write_text("name: c\nscenarios:\n  - name: r0\n    kind: carla_route\n"
                     "    options: {route_file: x.xml, route_id: '0', hots: 1.2.3.4}\n")
    with pytest.raises(ScenarioError, match=r"c\.yaml: scenarios\[0\] \('r0'\): unknown option 'hots'.*carla backend; "
                                            r"allowed: route_file, route_id, host"):
        check_suite(load_suite(suite))
