"""prunedrive and the official CARLA Leaderboard 2.0 evaluator, both ways, on stand-ins (tests/leaderboard_standin.py).

1. `prunedrive import leaderboard`: results JSON (as statistics_manager.py writes it, and Bench2Drive's merged
   JSON) -> a run that summary, report and regress read.
2. agents/leaderboard_agent.py driven by a stand-in evaluator loop on the carla stand-in.
3. The CARLA backend's Leaderboard route timeout.
The last tests check the stand-ins and the adapter against the signatures of the real sources.
"""
import ast
import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import carla_standin
import leaderboard_standin as lb
from prunedrive.app.cli import main
from prunedrive.app.import_leaderboard import INFRACTIONS, import_leaderboard
from prunedrive.harness.action import Control
from prunedrive.harness.env import DriveEnv, EpisodeOutcome
from prunedrive.harness.events import EventKind
from prunedrive.harness.results import RunDir, RunError
from prunedrive.harness.rows import STEP_COLUMNS, episode_row
from prunedrive.scenarios.loader import Scenario

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "agents" / "leaderboard_agent.py"
_ports = itertools.count(3400)

# One message per infraction list, worded as scenario_runner's criteria word them.
MESSAGES = {
    "collisions_layout": "Agent collided against object with type=static.prop.box and id=201 at (x=1.0, y=2.0, z=0.0)",
    "collisions_pedestrian": "Agent collided against object with type=walker.pedestrian.0001 and id=202 at (x=1, y=2, z=0)",
    "collisions_vehicle": "Agent collided against object with type=vehicle.audi.a2 and id=203 at (x=1, y=2, z=0)",
    "red_light": "Agent ran a red light 301 at (x=10.0, y=2.0, z=0.0)",
    "stop_infraction": "Agent ran a stop with id=302 at (x=10.0, y=2.0, z=0.0)",
    "outside_route_lanes": "Agent went outside its route lanes for about 12.5 meters (2.5% of the completed route)",
    "min_speed_infractions": "Average speed is 60.0% of the surrounding traffic's one",
    "yield_emergency_vehicle_infractions": "Agent failed to yield to an emergency vehicle",
    "scenario_timeouts": "Agent timed out a scenario",
}


def leaderboard_records(scale: float = 1.0) -> list[dict]:
    """Seven routes: perfect, every penalty infraction once, deviated, blocked, timed out, agent and simulation
    crashes. `scale` multiplies the route completions (a worse candidate)."""
    every = {name: [text] for name, text in MESSAGES.items()}
    penalty = 0.5 * 0.6 * 0.65 * 0.7 * 0.8 * 0.7 * 0.7 * (1 - 0.3 * 0.4) * (1 - 0.025)
    rows = [
        (0, "Perfect", 100.0, 1.0, {}),
        (1, "Completed", 100.0, penalty, every),
        (2, "Failed - Agent deviated from the route", 40.0, 1.0, {"route_dev": ["Agent deviated from the route at (x=1, y=2, z=0)"]}),
        (3, "Failed - Agent got blocked", 55.0, 0.6, {"vehicle_blocked": ["Agent got blocked at (x=1, y=2, z=0)"],
                                                    "collisions_vehicle": [MESSAGES["collisions_vehicle"]]}),
        (4, "Failed - Agent timed out", 70.0, 0.7, {"route_timeout": ["Route timeout."],
                                                  "red_light": [MESSAGES["red_light"]]}),
        (5, "Failed - Agent crashed", 12.0, 1.0, {}),
        (6, "Failed - Simulation crashed", 0.0, 1.0, {}),
    ]
    return [lb.route_record(route, 0, i, status, min(completion * scale, 100.0), pen, infractions,
                            route_length=800.0 + 100 * route)
            for i, (route, status, completion, pen, infractions) in enumerate(rows)]


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def results_file(tmp_path) -> Path:
    return write(tmp_path / "simulation_results.json", lb.results_json(leaderboard_records(), entry_status="Crashed"))


# -- 1. import -------------------------------------------------------------------------------------------
def test_a_statistics_manager_results_file_imports_one_episode_per_route(tmp_path, results_file):
    episodes = import_leaderboard([results_file], RunDir(tmp_path / "runs" / "lb"), "lb-agent")
    records = {r["route_id"]: r for r in json.loads(results_file.read_text())["_checkpoint"]["records"]}
    assert len(episodes) == 7
    for _, e in episodes.iterrows():
        record = records[f"{e.scenario}_rep{e.seed}"]
        assert e.driving_score == record["scores"]["score_composed"]
        assert e.route_completion == record["scores"]["score_route"]
        assert e.infraction_penalty == record["scores"]["score_penalty"]
        assert e.km_driven == pytest.approx(record["meta"]["route_length"] * e.route_completion / 100 / 1000)
        assert e.sim_time_s == record["meta"]["duration_game"] and e.wall_s == record["meta"]["duration_system"]
        assert e.agent == "lb-agent" and e.kind == "carla_route" and e.leaderboard_status == record["status"]
    by = episodes.set_index("scenario")
    assert list(by.status) == ["finished", "finished", "route_deviation", "agent_blocked", "timeout", "failed",
                               "failed"]
    assert list(by.failure) == ["", "", "", "", "", "agent", "infrastructure"]
    assert "Simulation crashed" in by.loc["RouteScenario_6", "error"]
    every = by.loc["RouteScenario_1"]
    for name, kind in INFRACTIONS.items():
        assert every[f"n_{kind.value}"] == (1 if name in MESSAGES else 0), name
    assert every.collisions == 3 and every.outside_lanes_m == 12.5 and not every.success
    assert by.loc["RouteScenario_0", "success"] and by.success.sum() == 1
    assert by.loc["RouteScenario_2", "n_route_deviation"] == 1 and by.loc["RouteScenario_3", "n_agent_blocked"] == 1
    assert by.loc["RouteScenario_4", "n_route_timeout"] == 1 and by.loc["RouteScenario_3", "collisions"] == 1
    # Every column the runner writes is there.
    outcome = EpisodeOutcome(50.0, 100.0, [], False, 1.0, np.nan, np.nan, 1)
    runner_columns = episode_row(outcome, pd.DataFrame({c: [0.0] for c in STEP_COLUMNS}), run_id="r", agent="a",
                                 scenario=Scenario(name="s", kind="k"), seed=0, wall_s=1.0)
    assert set(runner_columns) <= set(episodes.columns)
    manifest = RunDir(tmp_path / "runs" / "lb").manifest()
    assert manifest["config"]["imported_from"][0]["entry_status"] == "Crashed"
    assert manifest["config"]["imported_from"][0]["global"]["Avg. driving score"] == \
        lb.results_json(leaderboard_records())["values"][0]


def test_summary_report_and_regress_work_on_imported_runs(tmp_path, results_file, capsys):
    out = str(tmp_path / "runs")
    worse = write(tmp_path / "worse.json", lb.results_json(leaderboard_records(scale=0.4)))
    same = write(tmp_path / "same.json", lb.results_json(leaderboard_records()))
    assert main(["import", "leaderboard", str(results_file), "--run-id", "base", "--out", out]) == 0
    assert main(["import", "leaderboard", str(worse), "--run-id", "worse", "--out", out, "--agent", "pruned"]) == 0
    assert main(["import", "leaderboard", str(same), "--run-id", "same", "--out", out]) == 0
    assert "imported 7 route(s)" in capsys.readouterr().out
    assert main(["summary", "base", "--out", out]) == 0
    assert main(["regress", "base", "same", "--out", out, "--n-boot", "500"]) == 0
    assert main(["regress", "base", "worse", "--out", out, "--n-boot", "500",
                 "--baseline-agent", "leaderboard", "--candidate-agent", "pruned"]) == 1
    assert "REGRESSION" in capsys.readouterr().out.upper()
    assert main(["report", "base", "worse", "--out", out, "--report-dir", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report").is_dir() and any((tmp_path / "report").glob("*.html"))


def test_bench2drive_merged_json_and_per_route_files_import(tmp_path):
    records = []
    for i, record in enumerate(leaderboard_records()[:3]):
        record = dict(record, scenario_name=["Accident", "ParkingExit", "HardBreakRoute"][i], town_name="Town12",
                      weather_id=i, save_name=f"Route{i}_Town12")
        record.pop("index")  # merge_route_json.py drops it
        records.append(record)
    merged = write(tmp_path / "merged.json", {"_checkpoint": {"records": records}, "driving score": 0.5,
                                              "success rate": 0.1, "eval num": 3})
    episodes = import_leaderboard([merged], RunDir(tmp_path / "b2d"))
    assert len(episodes) == 3 and set(episodes.agent) == {"leaderboard"}
    extra = json.loads(episodes.set_index("scenario").loc["RouteScenario_1", "leaderboard_extra"])
    assert extra["scenario_name"] == "ParkingExit" and extra["town_name"] == "Town12"
    assert RunDir(tmp_path / "b2d").manifest()["config"]["imported_from"][0]["format"] == "bench2drive"
    # Bench2Drive writes one results file per route: several files make one run.
    files = [write(tmp_path / f"r{i}.json", lb.results_json([r])) for i, r in enumerate(leaderboard_records()[:3])]
    assert len(import_leaderboard(files, RunDir(tmp_path / "per-route"))) == 3
    with pytest.raises(RunError, match="RouteScenario_0_rep0 is also in"):
        import_leaderboard([files[0], files[0]], RunDir(tmp_path / "twice"))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not readable JSON"),
    ({"entry_status": "Finished"}, "field '_checkpoint'"),
    ({"_checkpoint": {"records": {}}, "entry_status": "Finished"}, "field '_checkpoint.records'"),
    ({"_checkpoint": {"records": []}, "entry_status": "Finished"}, "no route records"),
    ({"_checkpoint": {"records": [{"route_id": "RouteScenario_1_rep0"}]}}, "field 'entry_status'"),
])
def test_bad_files_are_refused_naming_the_file_and_the_field(tmp_path, capsys, content, message):
    path = write(tmp_path / "bad.json", content)
    assert main(["import", "leaderboard", str(path), "--run-id", "bad", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("field, value", [("scores.score_composed", "abc"), ("scores.score_route", 140.0),
                                          ("meta.route_length", None), ("infractions.red_light", "x"),
                                          ("route_id", 3), ("status", None)])
def test_a_bad_record_field_is_named(tmp_path, field, value):
    records = leaderboard_records()
    target = records[2]
    *parents, last = field.split(".")
    for part in parents:
        target = target[part]
    target[last] = value
    path = write(tmp_path / "r.json", _raw_results(records))
    with pytest.raises(RunError, match=rf"r\.json: field '_checkpoint\.records\[2\]\.{field.replace('.', '[.]')}'"):
        import_leaderboard([path], RunDir(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _raw_results(records):
    return {"_checkpoint": {"global_record": {}, "progress": [len(records), len(records)], "records": records},
            "entry_status": "Finished", "eligible": True, "sensors": [], "values": [], "labels": []}


def test_an_existing_run_is_not_overwritten(tmp_path, results_file):
    import_leaderboard([results_file], RunDir(tmp_path / "r"))
    with pytest.raises(RunError, match="already holds a run"):
        import_leaderboard([results_file], RunDir(tmp_path / "r"))


# -- 2. the adapter in the evaluator --------------------------------------------------------------------
@pytest.fixture
def server():
    s = carla_standin.StandinServer(port=next(_ports))
    yield s
    s.shutdown()


@pytest.fixture
def evaluator(server, monkeypatch):
    lb.install(monkeypatch)
    monkeypatch.delitem(sys.modules, "leaderboard_agent", raising=False)
    yield lb.StandinEvaluator(server)
    sys.modules.pop("leaderboard_agent", None)


def agent_config(tmp_path, **config) -> Path:
    import yaml

    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"out": "steps", **config}))
    return path


def test_the_adapter_drives_the_expert_through_the_evaluator_loop(tmp_path, evaluator):
    hero = evaluator.spawn_hero(20.0, 1.75)
    route = lb.dense_route(evaluator.world.get_map(), (20.0, 1.75, 0.0), 250.0)
    agent = evaluator.run(ADAPTER, agent_config(tmp_path, agent="expert"), route, ticks=200)
    assert isinstance(agent, sys.modules["leaderboard.autoagents.autonomous_agent"].AutonomousAgent)
    assert agent.sensors() == [{"type": "sensor.speedometer", "reading_frequency": 20, "id": "speed"}]
    controls = evaluator.controls
    assert len(controls) == 200 and all(isinstance(c, carla_standin.VehicleControl) for c in controls)
    # One decision every 4 ticks (5 Hz at 0.05 s), held in between.
    for k in range(0, 200, 4):
        assert {(c.throttle, c.brake, c.steer) for c in controls[k:k + 4]} == {
            (controls[k].throttle, controls[k].brake, controls[k].steer)}
    assert hero.get_location().x > 60.0 and abs(hero.get_location().y - 1.75) < 0.5  # drove along its lane
    steps = pd.read_parquet(tmp_path / "steps" / "prunedrive_steps_000.parquet")
    assert len(steps) == 50 and set(STEP_COLUMNS) <= set(steps.columns)
    assert steps.step.tolist() == list(range(1, 51)) and steps.route_completion.is_monotonic_increasing
    assert np.allclose(steps.sim_time_s, np.arange(50) * 0.2, atol=1e-6)
    assert (steps.agent_wall_s > 0).all() and steps.tokens_in.isna().all() and steps.text.isna().all()
    assert np.allclose(steps.speedometer_mps[1:], steps.speed_mps[1:], atol=1e-6)
    # A second route of the same evaluator run gets the next file.
    evaluator.controls.clear()
    evaluator.run(ADAPTER, agent_config(tmp_path, agent="expert"), route, ticks=8)
    assert (tmp_path / "steps" / "prunedrive_steps_001.parquet").is_file()


SEEN: list = []


class Spy:
    """An agent that keeps what it is shown and brakes."""

    name = "spy"

    def reset(self, scenario):
        pass

    def act(self, observation):
        SEEN.append(observation)
        return Control(brake=1.0)


def make_spy() -> Spy:
    return Spy()


def test_the_adapter_sees_what_the_carla_backend_sees(tmp_path, evaluator, server):
    """One observation code path: the adapter's first observation equals the backend's at the same pose."""
    seen = SEEN
    seen.clear()
    other = server.spawn("vehicle.audi.a2", 45.0, 5.25)
    evaluator.spawn_hero(20.0, 1.75)
    route = lb.dense_route(evaluator.world.get_map(), (20.0, 1.75, 0.0), 250.0)
    evaluator.run(ADAPTER, agent_config(tmp_path, agent=f"{__name__}:make_spy"), route, ticks=1)
    routes = tmp_path / "routes.xml"
    routes.write_text('<routes><route id="r" town="StandinTown"><waypoints><position x="20" y="1.75" z="0"/>'
                      '<position x="270" y="1.75" z="0"/></waypoints></route></routes>')
    backend_server = carla_standin.StandinServer(port=next(_ports))
    try:
        backend_server.spawn("vehicle.audi.a2", 45.0, 5.25)
        scenario = Scenario(name="same", kind="carla_route", vehicles=0, pedestrians=0,
                            options={"route_file": str(routes), "route_id": "r"})
        env = DriveEnv(scenario, port=backend_server.port, api=carla_standin)
        observation, _ = env.reset(seed=0)
        env.close()
    finally:
        backend_server.shutdown()
    assert other.id and seen
    for key, value in observation.items():
        assert np.allclose(seen[0][key], value, atol=0.05), key
    assert seen[0]["vehicles_mask"].sum() == 1


def test_the_adapter_records_an_llm_agents_compute_and_text(tmp_path, evaluator, one_torch_thread):
    from prunedrive.app.train import untrained_model
    from prunedrive.models.data import synthetic_split
    from prunedrive.models.presets import PRESETS

    untrained_model(PRESETS["tiny"], synthetic_split(8, seed=1)).save_pretrained(tmp_path / "model")
    evaluator.spawn_hero(20.0, 1.75)
    route = lb.dense_route(evaluator.world.get_map(), (20.0, 1.75, 0.0), 100.0)
    config = agent_config(tmp_path, agent="llm", model="model", args={"max_new_tokens": 4}, out="lb/steps.parquet")
    evaluator.run(ADAPTER, config, route, ticks=12)
    steps = pd.read_parquet(tmp_path / "lb" / "steps.parquet")
    assert len(steps) == 3 and set(steps.agent) == {"llm-model"}
    assert (steps.tokens_in > 0).all() and (steps.effective_flops > 0).all() and (steps.params > 0).all()
    assert steps.text.map(lambda t: isinstance(t, str)).all()


def test_a_bad_agent_config_is_a_clear_error(tmp_path, evaluator):
    from prunedrive.agents.registry import AgentError

    evaluator.spawn_hero(20.0, 1.75)
    route = lb.dense_route(evaluator.world.get_map(), (20.0, 1.75, 0.0), 50.0)
    with pytest.raises(AgentError, match="unknown key.*speed"):
        evaluator.run(ADAPTER, agent_config(tmp_path, agent="expert", speed=3), route, ticks=1)
    with pytest.raises(lb.SensorConfigurationInvalid, match="wrong track"):
        evaluator.run(ADAPTER, agent_config(tmp_path, agent="expert", track="MAP"), route, ticks=1)


def test_the_adapter_module_imports_without_the_leaderboard_or_carla():
    code = ("import sys; import prunedrive.agents.leaderboard_agent as m; "
            "assert 'carla' not in sys.modules and 'leaderboard' not in sys.modules; "
            "assert m.PrunedriveAgent.__mro__[1] is m.LocalAutonomousAgent; print(m.get_entry_point())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "PrunedriveAgent"
    path = subprocess.run([sys.executable, "-m", "prunedrive.agents.leaderboard_agent"], capture_output=True,
                          text=True, timeout=120)
    assert Path(path.stdout.strip()) == ADAPTER.resolve()


# -- 3. the backend's route timeout ---------------------------------------------------------------------
def test_the_carla_backend_times_out_a_route_as_the_leaderboard_does(tmp_path, server):
    from prunedrive.harness.backends.carla_infractions import ROUTE_TIMEOUT_MIN_S
    from prunedrive.harness.scoring import score_episode

    routes = tmp_path / "routes.xml"
    routes.write_text('<routes><route id="r" town="StandinTown"><waypoints><position x="20" y="1.75" z="0"/>'
                      '<position x="300" y="1.75" z="0"/></waypoints></route></routes>')
    scenario = Scenario(name="t", kind="carla_route", policy_hz=0.5, vehicles=0, pedestrians=0, duration_s=3600,
                        blocked_s=3600, options={"route_file": str(routes), "route_id": "r", "fixed_delta_s": 0.1})
    env = DriveEnv(scenario, port=server.port, api=carla_standin)
    backend = env.backend
    env.reset(seed=0)
    assert backend.route_timeout_s == ROUTE_TIMEOUT_MIN_S
    steps, truncated = 0, False
    while not truncated:  # standing still: 300 s and no more, not the suite's 3600 s
        _, _, terminated, truncated, info = env.step(Control(brake=1.0))
        steps += 1
        assert not terminated and steps <= 151
    assert steps == 151  # 151 * 2 s > 300 s
    outcome = info["outcome"]
    assert [e.kind for e in outcome.events] == [EventKind.ROUTE_TIMEOUT]
    assert score_episode(outcome.route_completion, outcome.events).status == "timeout"
    env.reset(seed=1)
    state = None
    for _ in range(5):
        state, _ = backend.step(Control(throttle=0.6))
    driven = backend._arc
    assert driven > 20.0  # each metre is worth the time it takes at 10% of the speed limit
    assert backend.route_timeout_s == pytest.approx(ROUTE_TIMEOUT_MIN_S + driven / (0.1 * state.ego.speed_limit),
                                                    rel=0.05)
    env.close()


# -- the stand-ins and the adapter cannot drift from the real Leaderboard -------------------------------
def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _public(cls) -> dict[str, list[str]]:
    out = {}
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        if isinstance(value, staticmethod):
            out[name] = _params(value.__func__)
        elif inspect.isfunction(value):
            out[name] = _params(value)
    return out


def test_the_stand_ins_have_the_real_signatures():
    assert _public(lb.AutonomousAgent) == lb.REAL[("leaderboard/autoagents/autonomous_agent.py", "AutonomousAgent")]
    assert _public(lb.CarlaDataProvider) == lb.REAL[("srunner/scenariomanager/carla_data_provider.py",
                                                     "CarlaDataProvider")]
    assert [t.name for t in lb.Track] == lb.REAL_TRACKS


def test_the_adapter_overrides_only_real_methods_with_their_parameters():
    from prunedrive.agents import leaderboard_agent as adapter

    real = lb.REAL[("leaderboard/autoagents/autonomous_agent.py", "AutonomousAgent")]
    for cls in (adapter.PrunedriveAgent, adapter.LocalAutonomousAgent):
        for name, params in _public(cls).items():
            if name in real:
                assert params == real[name], (cls.__name__, name)
    fallback = _public(adapter.LocalAutonomousAgent)
    assert {k: v for k, v in real.items() if k != "__call__"} == fallback
    assert [t.name for t in adapter.LocalTrack] == lb.REAL_TRACKS


def _source_signatures(path: Path, class_name: str) -> dict[str, list[str]]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            out = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[item.name] = [a.arg for a in item.args.args]
            return out
    raise AssertionError(f"{path} has no class {class_name}")


@pytest.mark.parametrize("key", list(lb.REAL))
def test_the_recorded_signatures_match_a_real_checkout(key):
    """With LEADERBOARD_ROOT / SCENARIO_RUNNER_ROOT (the evaluator's own variables) set, read the real files."""
    relative, class_name = key
    root = os.environ.get("LEADERBOARD_ROOT" if relative.startswith("leaderboard/") else "SCENARIO_RUNNER_ROOT")
    if not root or not (Path(root) / relative).is_file():
        pytest.skip(f"no checkout with {relative} (set LEADERBOARD_ROOT and SCENARIO_RUNNER_ROOT)")
    found = _source_signatures(Path(root) / relative, class_name)
    for name, params in lb.REAL[key].items():
        assert name in found, f"{class_name}.{name} is gone from {relative}"
        assert found[name] == params, f"{class_name}.{name}{tuple(params)}: the real one has {found[name]}"


def test_the_drift_check_catches_a_wrong_parameter(tmp_path):
    source = tmp_path / "autonomous_agent.py"
    source.write_text("class AutonomousAgent(object):\n    def run_step(self, input_data, time_stamp):\n        pass\n")
    found = _source_signatures(source, "AutonomousAgent")
    assert found["run_step"] != lb.REAL[("leaderboard/autoagents/autonomous_agent.py", "AutonomousAgent")]["run_step"]
