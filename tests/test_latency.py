"""Latency in the loop (harness.latency, `--latency`): a slow agent drives late, deterministically.

The semantics checked here, tick by tick: the agent reads the observation at a policy step's time t (when it is
free); its control takes effect at the first simulator tick at or after t + latency; until then the previous
control holds (before the first answer: full brake); it reads again at the first policy step at or after
t + latency. At `none` (and `fixed:0`) nothing changes.
"""
import json
import math

import numpy as np
import pandas as pd
import pytest

from prunedrive.agents.expert import ExpertAgent
from prunedrive.app.cli import main
from prunedrive.harness.action import BRAKE, Control
from prunedrive.harness.latency import (LatencyClock, LatencyError, execution_path, load_profile, parse_latency,
                                        run_id_suffix)
from prunedrive.harness.results import RunDir, episode_key
from prunedrive.harness.env_pool import default_make_env
from prunedrive.harness.episode import run_episode
from prunedrive.harness.runner import run_suite
from prunedrive.scenarios.loader import Scenario, load_suite

SIM_HZ = 15  # the embedded simulator's ticks (harness.backends.highway.SIMULATION_HZ)
STOPPED = Scenario("stopped", "stopped_vehicle", seeds=(0,), lanes=3, vehicles=0, speed_limit_mps=20,
                   route_length_m=200, duration_s=20)
DRIVING_COLUMNS = ["step", "sim_time_s", "throttle", "brake", "steer", "speed_mps", "route_completion"]
# Episode columns that depend on the machine's timing, not on the driving.
TIMING = ("wall_s", "agent_wall_s", "agent_cpu_s", "sim_wall_s", "device_time_s", "peak_mem")


class BrakeWhenClose:
    """Cruises at 20 m/s; brakes fully only when a vehicle ahead in its lane is closer than `gap_m`."""

    name = "brake-when-close"

    def __init__(self, gap_m: float = 40.0):
        self.gap_m = gap_m

    def reset(self, scenario):
        pass

    def act(self, observation):
        vehicles = observation["vehicles"][observation["vehicles_mask"] > 0]
        ahead = vehicles[(vehicles[:, 0] > 0) & (np.abs(vehicles[:, 1]) < 2.0)]
        if len(ahead) and ahead[:, 0].min() < self.gap_m:
            return Control(brake=1.0)
        return Control(throttle=0.3 if observation["ego"][0] < 20 else 0.0)


def recorder_throttle(decision: int) -> float:
    """The Recorder's answer to its decision number `decision` (0-based): 0.1 .. 0.5, consecutive ones differ."""
    return round(0.1 * (1 + decision % 5), 3)


class Recorder:
    """Answers throttle 0.1, 0.2, ..., 0.5, 0.1, ... (one value per decision) and records the ego's last applied control that
    each observation reports, so the test can see which control held at the end of every step."""

    name = "recorder"

    def __init__(self):
        self.decisions, self.seen = 0, []

    def reset(self, scenario):
        self.decisions, self.seen = 0, []

    def act(self, observation):
        self.seen.append((float(observation["ego"][4]), float(observation["ego"][5])))  # throttle, brake
        self.decisions += 1
        return Control(throttle=recorder_throttle(self.decisions - 1))


@pytest.fixture
def mixed_suite(tmp_path):
    """Short episodes of four kinds (highway, merge, roundabout, intersection): the `none` path must not move."""
    path = tmp_path / "mixed.yaml"
    path.write_text(
        "name: mixed\ndefaults: {duration_s: 5, policy_hz: 5}\nscenarios:\n"
        "  - {name: cruise, kind: highway_cruise, seeds: [1, 2], lanes: 2, vehicles: 4, route_length_m: 80}\n"
        "  - {name: merge, kind: onramp_merge, seeds: [1], lanes: 2, vehicles: 4}\n"
        "  - {name: round, kind: roundabout, seeds: [2], vehicles: 4, speed_limit_mps: 10}\n"
        "  - {name: cross, kind: intersection, seeds: [2], vehicles: 4}\n")
    return path


def _gym_loop(scenario, seed, agent, max_steps=None):
    """The plain Gymnasium loop, no harness episode code: what today's synchronous loop must equal."""
    env = default_make_env(scenario, False)
    agent.reset(scenario)
    observation, _ = env.reset(seed=seed)
    rows = []
    while True:
        control = agent.act(observation)
        observation, _, terminated, truncated, info = env.step(control)
        rows.append((info["sim_time_s"], float(observation["ego"][0]), info["route_completion"]))
        if terminated or truncated or (max_steps and len(rows) >= max_steps):
            return rows


def _run(suite, agents, path, latency=None, batch=1):
    run_dir = RunDir(path)
    run_dir.create({}, [])
    episodes = run_suite(suite, agents, run_dir, progress=False, batch=batch, latency=latency)
    steps = pd.read_parquet(path / "steps.parquet").sort_values(["episode", "step"]).reset_index(drop=True)
    return episodes.sort_values(["agent", "scenario", "seed"]).reset_index(drop=True), steps


def _driving(episodes: pd.DataFrame) -> pd.DataFrame:
    return episodes[[c for c in episodes.columns if not c.startswith(TIMING) and c != "run_id"]]


# -- none and fixed:0 change nothing ----------------------------------------------------------------------
def test_none_and_fixed_0_give_todays_episodes_bit_for_bit(mixed_suite, tmp_path):
    suite = load_suite(mixed_suite)
    none, none_steps = _run(suite, [ExpertAgent()], tmp_path / "none")
    zero, zero_steps = _run(suite, [ExpertAgent()], tmp_path / "zero", latency=parse_latency("fixed:0"))
    assert "decided" not in none_steps and "decisions" not in none  # none: no latency columns at all
    pd.testing.assert_frame_equal(_driving(none), _driving(zero)[_driving(none).columns])
    pd.testing.assert_frame_equal(none_steps[["episode", *DRIVING_COLUMNS]], zero_steps[["episode", *DRIVING_COLUMNS]])
    # fixed:0: every step decided, effective at its own first tick, never stale, at the policy rate.
    assert zero_steps.decided.all() and (zero_steps.latency_s == 0).all() and (zero_steps.stale_ticks == 0).all()
    assert ((zero_steps.step - 1) * 3 == zero_steps.effect_tick).all()
    assert (zero.deadline_misses == 0).all() and (zero.stale_share == 0).all()
    np.testing.assert_allclose(zero.control_hz, 5.0)
    # ... and both are the plain Gymnasium loop's trajectories (the unchanged code path).
    for scenario, seed in suite.episodes():
        got = none_steps[none_steps.episode == episode_key("expert", scenario.name, seed)]
        assert len(got) and list(zip(got.sim_time_s, got.speed_mps, got.route_completion)) == _gym_loop(
            scenario, seed, ExpertAgent())


# -- the delay matters ------------------------------------------------------------------------------------
def test_a_late_brake_hits_the_stopped_car_a_prompt_one_avoids():
    kinds = {}
    for spec in ("none", "fixed:0", "fixed:100", "fixed:800"):
        outcome, steps = run_episode(default_make_env(STOPPED, False), BrakeWhenClose(), STOPPED, 0,
                                     latency=parse_latency(spec))
        kinds[spec] = [e.kind.value for e in outcome.events]
    assert "collision_vehicle" not in kinds["none"] and "collision_vehicle" not in kinds["fixed:0"]
    assert "collision_vehicle" not in kinds["fixed:100"]
    assert "collision_vehicle" in kinds["fixed:800"]
    # The stopped car is really there and really stopped: at latency 0 the ego ends stopped behind it.
    assert steps.speed_mps.iloc[0] < 20.5


# -- tick by tick -----------------------------------------------------------------------------------------
def _expected_schedule(latency_s, period_s, ticks_per_step, steps):
    """The semantics written out independently of LatencyClock: per decision (its step, its effect tick)."""
    tick_s, decisions, free_at = period_s / ticks_per_step, [], 0.0
    for step in range(steps):
        t = step * period_s
        if free_at <= t + 1e-9:
            decisions.append((step, step * ticks_per_step + math.ceil(latency_s / tick_s - 1e-9)))
            free_at = t + latency_s
    return decisions


@pytest.mark.parametrize("latency_ms", [0, 50, 100, 200, 300, 450, 1000])
def test_the_clock_holds_controls_tick_by_tick(latency_ms):
    clock = LatencyClock(parse_latency(f"fixed:{latency_ms}"), 0.2, 3)
    schedule = _expected_schedule(latency_ms / 1000, 0.2, 3, 40)
    controls_by_tick, stale, decided = [], [], []
    for step in range(40):
        if clock.free():
            decision = clock.decide(Control(throttle=round(0.01 * (step + 1), 3)), {}, 0.0)
            decided.append((step, decision.effect_tick))
        ticks, n_stale = clock.tick_controls()
        controls_by_tick += ticks
        stale.append(n_stale)
    assert decided == schedule
    for tick, control in enumerate(controls_by_tick):
        effective = [step for step, effect in schedule if effect <= tick]
        expected = BRAKE if not effective else Control(throttle=round(0.01 * (effective[-1] + 1), 3))
        assert control == expected, (latency_ms, tick)
    # Stale: brake placeholder ticks, and ticks whose control comes from an observation > one period old.
    expected_stale = 0
    for tick in range(len(controls_by_tick)):
        effective = [step for step, effect in schedule if effect <= tick]
        expected_stale += int(not effective or (tick - 3 * effective[-1]) / 15 > 0.2 + 1e-9)
    assert sum(stale) == expected_stale
    if latency_ms == 0:
        assert sum(stale) == 0


def test_the_held_control_and_the_control_rate_follow_the_semantics_in_the_loop():
    agent = Recorder()
    empty = Scenario("empty", "highway_cruise", seeds=(0,), lanes=2, vehicles=0, route_length_m=400, duration_s=20)
    outcome, steps = run_episode(default_make_env(empty, False), agent, empty, 0,
                                 latency=parse_latency("fixed:300"), max_steps=30)
    assert outcome.steps == 30 and not outcome.events
    schedule = _expected_schedule(0.3, 0.2, 3, 30)  # read every 2nd step, effective 5 ticks (333 ms) later
    assert [s for s, _ in schedule] == list(range(0, 30, 2))
    assert list(steps.index[steps.decided]) == [s for s, _ in schedule]
    assert list(steps.effect_tick[steps.decided]) == [e for _, e in schedule]
    assert agent.decisions == len(schedule)

    def control_at(tick):
        effective = [i for i, (_, effect) in enumerate(schedule) if effect <= tick]
        return (0.0, 1.0) if not effective else (recorder_throttle(effective[-1]), 0.0)

    # Each observation reports the control applied at the last tick of the step before it.
    for i, (step, _) in enumerate(schedule[1:], start=1):
        throttle, brake = agent.seen[i]
        assert (round(throttle, 3), brake) == control_at(3 * step - 1)
    # The step rows record the control in effect at each step's end.
    for step in range(len(steps)):
        assert (round(steps.throttle[step], 3), steps.brake[step]) == control_at(3 * step + 2)
    from prunedrive.harness.latency import latency_metrics
    metrics = latency_metrics({c: steps[c].to_numpy() for c in steps.columns}, 0.2, outcome.sim_time_s)
    assert metrics["decisions"] == 15 and metrics["control_hz"] == pytest.approx(15 / 6.0)
    assert metrics["deadline_misses"] == 15 and metrics["decision_latency_ms_mean"] == pytest.approx(300)


# -- determinism --------------------------------------------------------------------------------------------
def _profile(tmp_path, **fields):
    values = {"name": "test-device", "source": "declared for a test", "measured": False, "overhead_ms": 120,
              "prefill_ms_per_token": 0.5, "decode_ms_per_token": 4.0, "ms_per_gflop": 10.0,
              "speed_factors": {"dense": 1.0, "sparse_kernel": 0.6}, **fields}
    path = tmp_path / "device.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    return path


@pytest.mark.parametrize("spec", ["fixed:300", "profile"])
def test_results_repeat_and_do_not_depend_on_batch(tiny_suite, tmp_path, spec):
    from test_lockstep import BatchedExpert

    if spec == "profile":
        spec = f"profile:{_profile(tmp_path)}"
    suite = load_suite(tiny_suite)
    latency = parse_latency(spec)
    one, one_steps = _run(suite, [ExpertAgent()], tmp_path / "a", latency)
    again, again_steps = _run(suite, [ExpertAgent()], tmp_path / "b", latency)
    eight, eight_steps = _run(suite, [ExpertAgent()], tmp_path / "c", latency, batch=8)
    batched, batched_steps = _run(suite, [BatchedExpert()], tmp_path / "d", latency, batch=8)
    columns = [*DRIVING_COLUMNS, "decided", "latency_s", "effect_tick", "stale_ticks"]
    for other, other_steps in ((again, again_steps), (eight, eight_steps), (batched, batched_steps)):
        pd.testing.assert_frame_equal(_driving(one).drop(columns="agent"), _driving(other).drop(columns="agent"))
        pd.testing.assert_frame_equal(one_steps[columns], other_steps[columns])
    if spec == "fixed:300":  # slower than the 200 ms policy period: fewer decisions than steps
        assert (one.decisions < one.steps).all() and (one.deadline_misses == one.decisions).all()
    else:  # the expert has no model: the profile's overhead only, within the period
        assert (one_steps.latency_s[one_steps.decided] == 0.12).all() and (one.decisions == one.steps).all()
    assert batched_steps.batch_size.max() == 3  # the three episodes did decide together


def test_an_llms_latency_comes_from_its_own_rows_compute_whatever_the_batch(tiny_suite, tmp_path, one_torch_thread):
    from prunedrive.agents.llm import LLMAgent
    from prunedrive.app.train import untrained_model
    from prunedrive.models.data import synthetic_split
    from prunedrive.models.presets import PRESETS

    model = untrained_model(PRESETS["tiny"], synthetic_split(8, seed=1))
    latency = parse_latency(f"profile:{_profile(tmp_path, overhead_ms=150)}")
    suite = load_suite(tiny_suite)
    one, one_steps = _run(suite, [LLMAgent(model, name="llm-tiny", max_new_tokens=8)], tmp_path / "k1", latency)
    four, four_steps = _run(suite, [LLMAgent(model, name="llm-tiny", max_new_tokens=8)], tmp_path / "k4", latency, 4)
    assert four_steps.batch_size.max() > 1  # the episodes did decide together
    columns = [*DRIVING_COLUMNS, "decided", "latency_s", "effect_tick", "stale_ticks", "tokens_in", "tokens_out"]
    pd.testing.assert_frame_equal(one_steps[columns], four_steps[columns])
    pd.testing.assert_frame_equal(_driving(one).drop(columns=[c for c in one if "flops" in c]),
                                  _driving(four).drop(columns=[c for c in one if "flops" in c]))
    decided = one_steps[one_steps.decided]
    expected = [round((150 + 0.5 * r.tokens_in + 4.0 * r.tokens_out
                       + 10.0 * 2 * r.nonzero_params * (r.tokens_in + r.tokens_out) / 1e9) / 1000, 6)
                for r in decided.itertuples()]
    assert list(decided.latency_s) == expected and (decided.latency_s > 0.2).any()


def test_a_profile_maps_a_steps_own_compute_to_a_latency(tmp_path):
    model = parse_latency(f"profile:{_profile(tmp_path)}")
    report = {"tokens_in": 100.0, "tokens_out": 4.0, "params": 2e6, "nonzero_params": 1e6,
              "dense_flops": 4e8, "executed_flops": 4e8}
    gflops = 2 * 1e6 * 104 / 1e9  # effective parameters by default
    assert model.latency_s(report, agent_wall_s=99.0) == round((120 + 50 + 16 + 10 * gflops) / 1000, 6)
    sparse = {**report, "executed_flops": 2e8}
    assert execution_path(sparse) == "sparse_kernel"
    assert model.latency_s(sparse, 0.0) == round(0.6 * (120 + 50 + 16 + 10 * gflops) / 1000, 6)
    assert model.latency_s({}, 0.0) == 0.12  # an agent without a model: the overhead
    assert "declared" in model.label and model.reproducible
    measured = parse_latency("measured")
    assert measured.latency_s({}, 0.0421) == 0.0421 and not measured.reproducible
    assert "not reproducible" in measured.label


# -- bad input and identity -------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, named", [
    ({"measured": "yes"}, "'measured'"),
    ({"overhead_ms": -1}, "'overhead_ms'"),
    ({"speed_factors": {"dense": 1.0, "tpu": 2.0}}, "tpu"),
    ({"speed_factors": {"sparse_kernel": 0}}, "speed_factors.sparse_kernel"),
    ({"flops": "bytes"}, "'flops'"),
    ({"colour": "red"}, "colour"),
    ({"source": ""}, "'source'"),
])
def test_a_bad_profile_is_an_error_naming_file_and_field(tmp_path, fields, named):
    path = _profile(tmp_path, **fields)
    with pytest.raises(LatencyError, match=str(path)) as error:
        load_profile(path)
    assert named in str(error.value)


@pytest.mark.parametrize("value", ["fixed:-5", "fixed:abc", "slow", "profile:", "fixed:nan"])
def test_a_bad_latency_value_names_the_option_and_the_forms(value):
    with pytest.raises(LatencyError, match="--latency"):
        parse_latency(value)


def test_the_cli_exits_2_on_a_bad_profile_naming_the_field(tiny_suite, tmp_path, capsys):
    path = _profile(tmp_path, decode_ms_per_token="fast")
    code = main(["run", "--suite", str(tiny_suite), "--out", str(tmp_path / "out"), "--quiet",
                 "--latency", f"profile:{path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "decode_ms_per_token" in err and str(path) in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_resume_and_regress_across_latency_settings_are_refused(tiny_suite, tmp_path, capsys):
    from prunedrive.harness.regress import RegressInputError, regress

    short = tmp_path / "short.yaml"
    short.write_text(tiny_suite.read_text().replace("seeds: [1, 2, 3]", "seeds: [1]"))
    out = tmp_path / "out"
    args = ["run", "--suite", str(short), "--out", str(out), "--quiet", "--agent", "expert"]
    assert main([*args, "--run-id", "late", "--latency", "fixed:200"]) == 0
    assert main([*args, "--run-id", "sync"]) == 0
    manifest = json.loads((out / "late" / "manifest.json").read_text())
    assert manifest["identity"]["latency"] == "fixed:200" and manifest["config"]["latency"] == "fixed:200"
    assert "latency" not in json.loads((out / "sync" / "manifest.json").read_text())["identity"]
    capsys.readouterr()
    assert main(["run", "--resume", str(out / "late"), "--out", str(out), "--quiet", "--latency", "fixed:100"]) == 2
    assert "latency" in capsys.readouterr().err
    assert main(["run", "--resume", str(out / "sync"), "--out", str(out), "--quiet", "--latency", "fixed:0"]) == 2
    assert "latency" in capsys.readouterr().err
    assert main(["run", "--resume", str(out / "late"), "--out", str(out), "--quiet"]) == 0  # its own setting
    with pytest.raises(RegressInputError, match="latency"):
        regress(out / "sync", out / "late")
    from prunedrive.harness.regress import check_same_latency
    manifest = json.loads((out / "late" / "manifest.json").read_text())
    check_same_latency(manifest, manifest, out / "late", out / "late")  # the same setting compares
    assert run_id_suffix(None) == "" and run_id_suffix("fixed:200") == "-latency-fixed=200"


@pytest.mark.ray
def test_two_workers_give_the_in_process_results_under_a_latency_model(tiny_suite, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    args = ["run", "--suite", str(tiny_suite), "--out", str(out), "--quiet", "--agent", "expert",
            "--latency", "fixed:300"]
    assert main([*args, "--run-id", "here"]) == 0
    assert main([*args, "--run-id", "ray", "--workers", "2"]) == 0
    here, ray_run = RunDir(out / "here"), RunDir(out / "ray")
    columns = ["agent", "scenario", "seed", "driving_score", "route_completion", "steps", "events", "decisions",
               "control_hz", "stale_share", "deadline_misses"]
    key = ["agent", "scenario", "seed"]
    pd.testing.assert_frame_equal(here.episodes().sort_values(key)[columns].reset_index(drop=True),
                                  ray_run.episodes().sort_values(key)[columns].reset_index(drop=True))
    step_columns = ["episode", *DRIVING_COLUMNS, "decided", "latency_s", "effect_tick", "stale_ticks"]
    steps = [pd.read_parquet(run.path / "steps.parquet").sort_values(["episode", "step"])[step_columns]
             .reset_index(drop=True) for run in (here, ray_run)]
    pd.testing.assert_frame_equal(*steps)


# -- prunedrive profile ---------------------------------------------------------------------------------------
def test_the_fit_recovers_known_terms_and_folds_what_never_varies():
    from prunedrive.app.profile import fit_terms

    tokens_in = np.array([80.0, 90, 100, 110, 120, 130])
    tokens_out = np.array([3.0, 7, 4, 9, 5, 6])
    ms = 12.0 + 0.25 * tokens_in + 2.0 * tokens_out
    terms, folded = fit_terms(tokens_in, tokens_out, ms)
    assert folded == []
    assert terms == pytest.approx({"overhead_ms": 12.0, "prefill_ms_per_token": 0.25, "decode_ms_per_token": 2.0})
    constant_in = np.full(6, 100.0)
    terms, folded = fit_terms(constant_in, tokens_out, 40.0 + 2.0 * tokens_out)
    assert folded == ["prefill_ms_per_token"] and terms["prefill_ms_per_token"] == 0.0
    assert terms["overhead_ms"] == pytest.approx(40.0) and terms["decode_ms_per_token"] == pytest.approx(2.0)
    # Never a negative term: time falling with more tokens is noise, not a speed-up.
    terms, _ = fit_terms(tokens_in, tokens_out, 50.0 - 0.1 * tokens_in + 2.0 * tokens_out)
    assert all(value >= 0 for value in terms.values())


def test_profile_writes_a_measured_profile_that_drives(tmp_path, capsys, one_torch_thread):
    from prunedrive.app.train import untrained_model
    from prunedrive.models.data import synthetic_split
    from prunedrive.models.presets import PRESETS

    model_dir = tmp_path / "tiny"
    untrained_model(PRESETS["tiny"], synthetic_split(8, seed=1)).save_pretrained(model_dir)
    assert main(["profile", "--model", str(model_dir), "--steps", "6", "--repeat", "1", "--out", str(tmp_path)]) == 0
    path = tmp_path / "profiles" / "tiny.yaml"
    printed = capsys.readouterr().out
    assert str(path.resolve()) in printed and "fit RMSE" in printed and "load average" in printed
    profile = load_profile(path)
    assert profile.measured and "measured by prunedrive profile" in profile.source
    assert profile.overhead_ms + profile.decode_ms_per_token > 0
    assert parse_latency(f"profile:{path}").label.endswith("(measured)")
    assert main(["profile", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2


# -- bench --budget ----------------------------------------------------------------------------------------------
def test_the_budget_table_marks_who_meets_a_per_decision_budget(tiny_suite, tmp_path, capsys):
    from prunedrive.app.bench import print_latency
    from prunedrive.harness.latency import budget_table

    suite = load_suite(tiny_suite)
    episodes, _ = _run(suite, [ExpertAgent(), BrakeWhenClose()], tmp_path / "run", parse_latency("fixed:300"))
    assert budget_table(episodes.drop(columns=["decisions"]), 100) is None  # no latency model: no table
    table = budget_table(episodes, 250).set_index("agent")
    assert (table.latency_ms_p95 == 300).all() and not table.meets_budget.any()
    assert (table.deadline_miss_share == 1).all() and (table.control_hz < 5).all()
    assert budget_table(episodes, 300).meets_budget.all()  # at the budget meets it
    run_dir = RunDir(tmp_path / "run")
    bench_table = pd.DataFrame({"agent": ["expert", "brake-when-close"], "driving_score": [90.0, 50.0],
                                "ds_se": [1.0, 2.0], "ds_diff": [np.nan, -40.0], "ds_ci_low": [np.nan, -45.0],
                                "ds_ci_high": [np.nan, -35.0], "verdict": ["", "worse"], "step_ms_p50": [0.1, 12.0],
                                "nonzero_params": [np.nan, 1e6]})  # as if brake-when-close were a model agent
    print_latency(episodes, "fixed:300", 400, run_dir, bench_table)
    out = capsys.readouterr().out
    assert "--latency fixed:300" in out and "<= 400 ms" in out and out.count("meets") == 2
    assert pd.read_csv(tmp_path / "run" / "latency.csv").meets_budget.all()
    attached = run_dir.attachments()["latency_realtime"]  # the report's real-time section: model agents only
    assert attached.section == "prunedrive.app.latency_report:realtime_section"
    payload = attached.load()
    assert payload.agent.tolist() == ["brake-when-close"] and payload.meets_budget.tolist() == [True]


def test_bench_refuses_a_budget_without_a_latency_model(tmp_path, capsys):
    assert main(["bench", "--suite", "smoke", "--budget", "100", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--budget needs a latency model" in capsys.readouterr().err


# -- CARLA: a control per 20 Hz tick ---------------------------------------------------------------------------
def test_the_carla_backend_applies_a_control_at_the_tick_it_takes_effect(tmp_path):
    from test_carla_backend import ROUTES, _ports, standin

    from prunedrive.harness.backends.carla import CarlaBackend

    routes = tmp_path / "routes.xml"
    routes.write_text(ROUTES)
    server = standin.StandinServer(port=next(_ports))
    try:
        scenario = Scenario(name="test-straight", kind="carla_route", policy_hz=5.0, vehicles=0, duration_s=120.0,
                            options={"route_file": str(routes), "route_id": "straight", "no_rendering": True})
        backend = CarlaBackend(scenario, port=server.port, api=standin)
        backend.reset(0)
        assert backend.ticks_per_step == 4
        (ego,) = [a for a in server.actors("vehicle.*") if a.attributes["role_name"] == "hero"]
        applied = []
        real_tick = server.world.tick

        def tick(*args, **kwargs):  # what the hero drives on at each tick
            applied.append((ego.get_control().throttle, ego.get_control().brake))
            return real_tick(*args, **kwargs)

        server.world.tick = tick
        before = server.ticks
        late = Control(throttle=0.6)
        backend.step_ticks([BRAKE, BRAKE, late, late])
        assert server.ticks - before == 4
        assert applied == [(0.0, 1.0), (0.0, 1.0), (0.6, 0.0), (0.6, 0.0)]
        with pytest.raises(ValueError, match="4 controls"):
            backend.step_ticks([late] * 3)
        backend.close()
    finally:
        server.shutdown()


def test_measured_latency_is_the_decisions_cuda_time_on_a_gpu_else_its_wall_time():
    model = parse_latency("measured")
    assert not model.reproducible and "not reproducible" in model.label
    assert model.latency_s({"device_time_s": 0.05}, agent_wall_s=0.2) == 0.05  # CUDA events (a GPU agent's report)
    assert model.latency_s({"device_time_s": float("nan")}, agent_wall_s=0.2) == 0.2  # CPU: no device time
    assert model.latency_s({}, agent_wall_s=0.0123456789) == 0.012346  # rounded to the microsecond
