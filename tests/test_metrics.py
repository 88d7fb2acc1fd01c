"""The metric table: each metric computed as declared (per-km rates are sums over sums with the
Leaderboard's 0.001 km floor), and every consumer (summary, its terminal tables, report, bench,
regress, MLflow) reading its metrics from the table."""
import io
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from prunedrive.app.bench import HEADERS, comparison_table
from prunedrive.app.mlflow_log import summary_metrics
from prunedrive.harness import metrics
from prunedrive.harness.metrics import (BENCH, GATE, INFRACTIONS, KM_FLOOR, METRICS, OVERALL, REPORT, Aggregate,
                                        Metric, in_view, summary_columns)
from prunedrive.harness.regress import STATISTICS, compare
from prunedrive.report.data import load_series
from prunedrive.report.tables import comparison_table as report_table
from prunedrive.harness.results import RunDir
from prunedrive.harness.summary import print_tables, summarize
from test_regress import episodes, make_run


def frame(tmp_path, rows: list[dict]) -> pd.DataFrame:
    """Real episode rows (one per dict) with the given columns overridden."""
    run = make_run(tmp_path / "run", "expert", {(f"scn{i}", 1): 80.0 for i in range(len(rows))})
    table = RunDir(run).episodes().sort_values("scenario").reset_index(drop=True)
    for i, row in enumerate(rows):
        for column, value in row.items():
            table.loc[i, column] = value
    return table


def overall(table: pd.DataFrame) -> pd.Series:
    return summarize(table, ["agent"]).iloc[0]


def test_per_km_rates_are_a_total_over_a_total_not_a_mean_of_episode_rates(tmp_path):
    # A 50 m episode with 2 collisions and a 2 km one with none: 2 / 2.05 km, not mean(40, 0) = 20 per km.
    table = frame(tmp_path, [{"km_driven": 0.05, "collisions": 2, "n_collision_vehicle": 2, "n_red_light": 1},
                             {"km_driven": 2.0, "collisions": 0, "n_collision_vehicle": 0, "n_red_light": 0}])
    row = overall(table)
    assert row.collisions_per_km == pytest.approx(2 / 2.05)
    assert row.collision_vehicle_per_km == pytest.approx(2 / 2.05)
    assert row.red_light_per_km == pytest.approx(1 / 2.05)
    assert row.infractions_per_km == pytest.approx(3 / 2.05)  # every kind counted per km, summed


def test_per_km_rates_floor_the_distance_at_a_metre(tmp_path):
    # A car that never moved but collided: the Leaderboard divides by 0.001 km, not by zero.
    table = frame(tmp_path, [{"km_driven": 0.0, "collisions": 1, "n_collision_static": 1},
                             {"km_driven": 0.0002, "collisions": 1, "n_collision_static": 1}])
    row = overall(table)
    assert KM_FLOOR == 0.001
    assert row.collisions_per_km == pytest.approx(2 / 0.001)
    assert row.collision_static_per_km == pytest.approx(2 / 0.001)
    moving = frame(tmp_path / "moving", [{"km_driven": 0.0005, "collisions": 1}, {"km_driven": 0.0015, "collisions": 0}])
    assert overall(moving).collisions_per_km == pytest.approx(1 / 0.002)  # the floor applies to the total only


def test_scores_are_mean_and_sample_std_and_times_are_median_and_worst_in_ms(tmp_path):
    table = frame(tmp_path, [
        {"driving_score": 20.0, "agent_wall_s_p50": 0.001, "agent_wall_s_p95": 0.004, "efficiency": np.nan},
        {"driving_score": 50.0, "agent_wall_s_p50": 0.002, "agent_wall_s_p95": 0.009, "efficiency": 60.0},
        {"driving_score": 80.0, "agent_wall_s_p50": np.nan, "agent_wall_s_p95": np.nan, "efficiency": 80.0}])
    row = overall(table)
    assert row.driving_score_mean == pytest.approx(50.0) and row.driving_score_std == pytest.approx(30.0)  # ddof=1
    assert row.agent_wall_ms_p50 == pytest.approx(1.5)   # median over the episodes that have a time
    assert row.agent_wall_ms_p95 == pytest.approx(9.0)   # the worst episode's p95
    assert row.efficiency == pytest.approx(70.0)          # episodes without a value are left out
    one = overall(table.iloc[:1])
    assert np.isnan(one.driving_score_std)                # one episode: no spread


def test_model_compute_is_summarized_only_where_the_episodes_have_it(tmp_path):
    table = frame(tmp_path, [{}, {}])
    assert "effective_flops_mean" not in summarize(table.drop(columns=["effective_flops_mean"]), ["agent"])
    table["effective_flops_mean"] = [1e9, 3e9]
    assert overall(table).effective_flops_mean == pytest.approx(2e9)


def test_the_table_declares_each_name_once_and_only_what_its_consumers_can_read():
    for name in ("column", "key", "label"):
        values = [getattr(m, name) for m in METRICS]
        assert len(values) == len(set(values)), f"duplicate {name}"
    assert len(summary_columns()) == len(set(summary_columns()))
    assert {f"{kind}_per_km" for kind in INFRACTIONS} <= set(summary_columns())
    for m in METRICS:
        assert m.views <= {metrics.OVERALL, metrics.PER_SCENARIO, REPORT, BENCH, metrics.LATENCY}, m.key
        assert m.gate in (None, metrics.GATE, metrics.OPT_IN), m.key
        if m.gate:  # regress compares runs on it as it aggregates: it must know how
            assert m.aggregate.how in STATISTICS and m.higher_is_better is not None, m.key


def test_summarize_columns_are_the_tables(tmp_path):
    table = frame(tmp_path, [{}, {}])
    # The latency metrics (harness.latency) exist only for runs under a latency model.
    latency = {column for m in in_view(metrics.LATENCY) for column in m.summary_columns}
    assert list(summarize(table, ["agent"]).columns) == ["agent", *(c for c in summary_columns() if c not in latency)]
    for column in latency:
        table[column] = [0.5, 1.5]
    assert list(summarize(table, ["agent"]).columns) == ["agent", *summary_columns()]


def test_the_consumers_show_the_same_numbers_under_the_tables_names(tmp_path):
    rng = np.random.default_rng(0)
    eps = episodes(2, (1, 2))
    run = make_run(tmp_path / "run", "llm-x", {e: float(rng.uniform(40, 90)) for e in eps}, wall_ms=3.0,
                   collisions={eps[0]: 1}, compute={"effective_flops": 2e9, "executed_flops": 4e9, "params": 1e6, "nonzero_params": 5e5,
                            "parse_failed": 0.0})
    table = RunDir(run).episodes()
    row = summarize(table, ["agent"]).iloc[0]
    logged = summary_metrics(row)
    assert set(logged) == {c for c in summary_columns() if c in row and np.isfinite(row[c])}  # latency: absent
    columns, [report_row] = report_table(load_series([run]))
    assert [c for c, _ in columns if c != "agent"] == [m.key for m in in_view(REPORT)]
    assert dict(columns)["driving_score"] == "driving score"
    assert report_row["collisions_per_km"] == f"{row.collisions_per_km:.2f}"
    assert report_row["effective_gflops"] == "2" and report_row["nonzero_params"] == "500.00k"
    assert report_row["parse_failure_rate"] == "0.00" and row.parse_failure_rate == 0.0
    bench = comparison_table(table, {}, {}).iloc[0]
    assert bench["driving_score"] == row.driving_score_mean and bench["step_ms_p50"] == row.agent_wall_ms_p50
    assert bench["effective_gflops"] == pytest.approx(2.0)
    assert HEADERS["driving_score"] == "DS" and HEADERS["step_ms_p50"] == metrics.metric("agent_ms_p50").short


@pytest.fixture
def with_steps_metric(monkeypatch):
    """The table plus one metric: mean and std of the steps an episode took, in the overall and report tables."""
    steps = Metric("steps_mean", "steps", "steps per episode", "steps", "steps", Aggregate("mean_std", ("steps",)),
                   digits=1, higher_is_better=None, views=frozenset({OVERALL, REPORT}))
    monkeypatch.setattr(metrics, "METRICS", METRICS + (steps,))
    return steps


def test_a_metric_added_to_the_table_appears_in_summary_tables_report_and_mlflow(tmp_path, with_steps_metric):
    run = make_run(tmp_path / "run", "expert", {e: 70.0 for e in episodes(2, (1, 2))})
    table = RunDir(run).episodes()
    table.loc[0, "steps"] = 20
    row = summarize(table, ["agent"]).iloc[0]
    assert row.steps_mean == pytest.approx(12.5) and row.steps_std == pytest.approx(5.0)
    out = io.StringIO()
    print_tables(table, Console(file=out, width=300))
    assert "steps" in out.getvalue() and "12.5 ± 5.0" in out.getvalue()
    assert summary_metrics(row)["steps_mean"] == pytest.approx(12.5)
    columns, [report_row] = report_table(load_series([run]))
    assert ("steps", "steps per episode") in columns and report_row["steps"] == "10.0 ± 0.0"  # the run as written


def test_a_metric_marked_gate_becomes_a_regression_check(monkeypatch):
    gated_rc = replace(metrics.metric("route_completion"), gate=GATE)
    monkeypatch.setattr(metrics, "METRICS", tuple(gated_rc if m.key == "route_completion" else m for m in METRICS))
    rows = [{"agent": "a", "scenario": f"s{i}", "seed": 1, "driving_score": 50.0, "route_completion": 90.0,
             "collisions": 0, "km_driven": 0.4, "agent_wall_s_p50": 0.001} for i in range(8)]
    base, cand = pd.DataFrame(rows), pd.DataFrame(rows).assign(route_completion=60.0)
    verdict = compare(base, cand, margins={"route_completion": 10})
    check = verdict.check("route completion")
    assert check.diff == pytest.approx(-30) and check.regressed and verdict.exit_code == 1
    assert [c.name for c in verdict.checks] == ["driving score", "route completion", "collisions/km",
                                                "agent ms/step (p50)"]
    assert not compare(base, cand, margins={"route_completion": 40}).regression
