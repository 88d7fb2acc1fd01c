"""`prunedrive latency-sweep` (app.latency_sweep), its report sections (app.latency_report), the declared device
profile shipped in harness/profiles/ and its scaling by a variant's step-time ratio (app.latency_profile)."""
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prunedrive.app.cli import main
from prunedrive.app.latency_profile import SHIPPED, scale_profile
from prunedrive.app.latency_report import pareto_front, realtime_payload, realtime_section, sweep_section
from prunedrive.app.latency_sweep import (ATTACHMENT, SECTION, agent_specs, check_latencies, latency_run_id,
                                          run_latency_sweep)
from prunedrive.harness.latency import LatencyError, load_profile, parse_latency
from prunedrive.harness.paired import paired_bootstrap_ci
from prunedrive.harness.results import RunDir, RunError
from prunedrive.plugins.registry import load_reference
from prunedrive.scenarios.loader import load_suite


@pytest.fixture
def brake_when_close(monkeypatch):
    """An agent where delay matters (tests/test_latency.py's), by module reference as a user's own agent would be."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return "test_latency:BrakeWhenClose"


@pytest.fixture
def stopped_suite(tmp_path):
    """A stopped car ahead in the ego's lane (the stopped-vehicle kind of tests/test_latency.py), two seeds."""
    path = tmp_path / "stopped.yaml"
    path.write_text(textwrap.dedent("""\
        name: stopped
        scenarios:
          - {name: stopped, kind: stopped_vehicle, seeds: [0, 1], lanes: 3, vehicles: 0, speed_limit_mps: 20,
             route_length_m: 200, duration_s: 20}
        """))
    return load_suite(path)


def _say(_text):
    pass


def test_the_sweep_is_paired_across_latencies_and_a_large_delay_crashes_a_late_braker(
        stopped_suite, brake_when_close, tmp_path):
    specs = agent_specs([brake_when_close], None, ())
    sweep, table, code = run_latency_sweep(stopped_suite, specs, [800, 0], tmp_path, run_id="s", progress=False,
                                           say=_say)
    assert code == 0
    assert table["latency_ms"].tolist() == [0.0, 800.0] and (table["reference_ms"] == 0).all()
    runs = {ms: RunDir(sweep.path / "latency" / latency_run_id(ms)) for ms in (0.0, 800.0)}
    episodes = {ms: run.episodes().sort_values("seed").reset_index(drop=True) for ms, run in runs.items()}
    # Paired: the same scenarios and seeds at every latency, each run under its own latency model.
    assert episodes[0.0][["scenario", "seed"]].equals(episodes[800.0][["scenario", "seed"]])
    assert [run.manifest()["identity"]["latency"] for run in runs.values()] == ["fixed:0", "fixed:800"]
    # The delay matters: prompt, it stops behind the car; 800 ms late, it hits it on every seed.
    assert (episodes[0.0]["collisions"] == 0).all() and (episodes[800.0]["collisions"] > 0).all()
    late = table.set_index("latency_ms").loc[800.0]
    assert late["driving_score"] < table.set_index("latency_ms").loc[0.0, "driving_score"]
    # ΔDS is the mean of the per-seed differences, its CI the paired bootstrap's (not two unpaired means').
    differences = (episodes[800.0]["driving_score"] - episodes[0.0]["driving_score"]).to_numpy()
    assert late["ds_diff"] == pytest.approx(differences.mean())
    assert (late["ds_ci_low"], late["ds_ci_high"]) == pytest.approx(paired_bootstrap_ci(differences))
    assert late["verdict"] == "n too small"  # 2 pairs: no verdict
    assert late["stale_share"] > 0 and late["deadline_miss_share"] == 1.0 and late["decisions"] > 0
    reference = table.set_index("latency_ms").loc[0.0]
    assert np.isnan(reference["ds_diff"]) and reference["stale_share"] == 0


def test_a_rerun_resumes_without_driving_again_and_other_settings_are_refused(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    specs = agent_specs(["expert", "constant"], None, ())
    sweep, first, _ = run_latency_sweep(suite, specs, [0, 300], tmp_path, run_id="s", progress=False, say=_say)
    files = sorted((sweep.path / "latency").glob("*/episodes/*.parquet"))
    assert len(files) == 2 * 2 * 3  # latencies x agents x seeds
    stamps = {path: path.stat().st_mtime_ns for path in files}
    dropped = files[0]
    dropped.unlink()  # as if the sweep had been killed before this episode finished
    _, again, code = run_latency_sweep(suite, specs, [0, 300], tmp_path, run_id="s", progress=False, say=_say)
    assert code == 0 and dropped.is_file()
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items() if path != dropped)
    pd.testing.assert_frame_equal(first, again)
    with pytest.raises(RunError, match="latencies_ms"):
        run_latency_sweep(suite, specs, [0, 100], tmp_path, run_id="s", progress=False, say=_say)


def test_the_sweep_table_is_attached_with_its_section_and_renders(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    sweep, table, _ = run_latency_sweep(suite, agent_specs(["expert"], None, ()), [0, 200], tmp_path, run_id="s",
                                        progress=False, say=_say)
    attachment = RunDir(sweep.path / "latency" / latency_run_id(0)).attachments()[ATTACHMENT]
    assert attachment.section == SECTION and attachment.producer == "prunedrive.app.latency_sweep"
    pd.testing.assert_frame_equal(attachment.load(), table)
    assert load_reference(SECTION, "report section") is sweep_section  # what the report will call
    section = sweep_section(attachment.load(), None)
    assert len(section.tables) == 1 and len(section.tables[0].rows) == len(table) == 2
    assert [row["latency_ms"] for row in section.tables[0].rows] == ["0", "200"]
    assert section.tables[0].rows[0]["ds_diff"] == "–"  # the reference has no difference to itself
    plot = section.plots[0]
    assert plot.png.startswith(b"\x89PNG") and "95% CI" in plot.caption


def test_the_cli_sweeps_and_refuses_bad_latencies(tiny_suite, tmp_path, capsys):
    args = ["latency-sweep", "--suite", str(tiny_suite), "--out", str(tmp_path), "--quiet", "--seeds", "1"]
    assert main([*args, "--latencies", "0", "100"]) == 0
    out = capsys.readouterr().out
    assert "expert" in out and "ΔDS" in out and "results:" in out
    assert main([*args, "--latencies", "100", "100"]) == 2
    assert "repeats" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: not a finite number >= 0
        main([*args, "--latencies", "-5"])
    assert exited.value.code == 2


@pytest.mark.parametrize("values, message", [([], "at least one"), ([0, float("inf")], "inf"),
                                              ([5, 5], "repeats")])
def test_bad_latencies_are_messages_naming_the_option(values, message):
    with pytest.raises(ValueError, match=message) as raised:
        check_latencies(values)
    assert "--latencies" in str(raised.value)


def test_a_model_goes_only_to_the_agents_that_take_one(tmp_path):
    specs = agent_specs(["expert", "llm"], str(tmp_path), ())
    assert [spec.model for spec in specs] == [None, str(tmp_path)]


# -- a bench under a latency model: driving vs speed -------------------------------------------------------
def test_the_pareto_front_keeps_only_undominated_models():
    ds = [80, 70, 70, 60, np.nan]
    ms = [40, 20, 30, 10, 5]
    # 70 @ 30 ms is dominated by 70 @ 20 ms (as good, faster); the NaN is never on it.
    assert pareto_front(ds, ms).tolist() == [True, True, False, True, False]


def _bench_table():
    return pd.DataFrame({
        "agent": ["llm-dense", "llm-width-0.5", "llm-owl-0.7", "expert"],
        "driving_score": [70.0, 62.0, 55.0, 90.0], "ds_se": [3.0, 3.5, 4.0, 1.0],
        "ds_diff": [np.nan, -8.0, -15.0, np.nan], "ds_ci_low": [np.nan, -12.0, -20.0, np.nan],
        "ds_ci_high": [np.nan, -3.0, -9.0, np.nan], "verdict": ["", "worse", "worse", ""],
        "step_ms_p50": [40.0, 25.0, 41.0, 2.0], "nonzero_params": [1e6, 5e5, 3e5, np.nan]})


def _attached(payload, tmp_path):
    """The payload as the report gets it: attached to a run and loaded back (parquet)."""
    run = RunDir(tmp_path / "bench")
    run.create({}, [])
    run.attach("latency_realtime", payload, producer="prunedrive.app.bench",
               section="prunedrive.app.latency_report:realtime_section")
    return run.attachments()["latency_realtime"].load()


def test_the_realtime_section_marks_the_front_and_the_budget(tmp_path):
    budget = pd.DataFrame({"agent": ["llm-dense", "llm-width-0.5", "llm-owl-0.7", "expert"],
                           "latency_ms_p95": [320.0, 190.0, 330.0, 0.0], "meets_budget": [False, True, False, True]})
    payload = realtime_payload(_bench_table(), budget, 200.0, "profile orin (declared)")
    assert payload["agent"].tolist() == ["llm-dense", "llm-width-0.5", "llm-owl-0.7"]  # the expert has no model
    section = realtime_section(_attached(payload, tmp_path), None)
    rows = {row["agent"]: row for row in section.tables[0].rows}
    assert rows["llm-dense"]["front"] == rows["llm-width-0.5"]["front"] == "yes"
    assert rows["llm-owl-0.7"]["front"] == ""  # drives worse and runs slower than dense
    assert [rows[a]["budget"] for a in rows] == ["misses", "meets", "misses"]
    assert "declared" in section.tables[0].caption + " ".join(section.notes)
    assert section.plots[0].png.startswith(b"\x89PNG")
    unbudgeted = realtime_section(_attached(realtime_payload(_bench_table(), budget, None, "fixed 100 ms"),
                                            tmp_path / "unbudgeted"), None)
    assert {row["budget"] for row in unbudgeted.tables[0].rows} == {"–"}


# -- the declared profile and its scaling ----------------------------------------------------------------
def test_the_shipped_profile_is_declared_and_drives(tiny_suite, tmp_path):
    path = SHIPPED / "llama2-7b-jetson-agx-orin.yaml"
    model = parse_latency(f"profile:{path}")
    assert not model.profile.measured and "declared" in model.label
    assert model.profile.latency_ms({"tokens_in": 100, "tokens_out": 8}) == pytest.approx(15 + 80 + 8 * 25.6)
    args = ["run", "--suite", str(tiny_suite), "--out", str(tmp_path), "--quiet", "--seeds", "1", "--run-id", "r"]
    assert main([*args, "--latency", f"profile:{path}"]) == 0  # the expert computes no tokens: the overhead only
    assert RunDir(tmp_path / "r").episodes()["decision_latency_ms_mean"].tolist() == pytest.approx([15.0])


def test_a_profile_scaled_by_a_step_time_ratio_scales_every_decision(tmp_path):
    path = SHIPPED / "llama2-7b-jetson-agx-orin.yaml"
    scaled = load_profile(scale_profile(path, 0.5, tmp_path / "half.yaml", "llm-width-0.5: step_ratio 0.5"))
    report = {"tokens_in": 120, "tokens_out": 6, "nonzero_params": 1e6}
    assert scaled.latency_ms(report) == pytest.approx(0.5 * load_profile(path).latency_ms(report))
    assert not scaled.measured and "x0.5" in scaled.name and "step_ratio 0.5" in scaled.source
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(LatencyError, match="step-time ratio"):
            scale_profile(path, bad, tmp_path / "bad.yaml", "x")
