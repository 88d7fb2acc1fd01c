"""The main job's table: n, mean ± SE, the paired CI to dense and a verdict; dense first; fits 100 columns."""
import io

import numpy as np
import pandas as pd
from rich.console import Console

from prunedrive.app.bench import comparison_table, print_comparison
from prunedrive.app.bench_model import BenchModel
from prunedrive.harness.results import RunDir
from test_regress import episodes, make_run

MODELS = {name: BenchModel(name, method, sparsity, None) for name, method, sparsity in (
    ("llm-dense", "dense", 0.0), ("llm-owl-0.7", "owl", 0.7), ("llm-wanda-0.5", "wanda", 0.5),
    ("llm-wanda-0.7", "wanda", 0.7))}


def _episodes(tmp_path, n_scenarios=4, seeds=(1, 2, 3)):
    rng = np.random.default_rng(0)
    eps = episodes(n_scenarios, seeds)
    dense = {e: float(rng.uniform(60, 95)) for e in eps}
    runs = {"llm-dense": dense,
            "llm-wanda-0.7": {e: s - 20 - float(rng.uniform(0, 2)) for e, s in dense.items()},  # clearly worse
            "llm-wanda-0.5": {e: s + float(rng.normal(0, 3)) for e, s in dense.items()},         # the same, noisily
            "llm-owl-0.7": {e: min(s + 4 + float(rng.uniform(0, 1)), 100.0) for e, s in dense.items()},
            "expert": {e: 95.0 for e in eps}}
    for agent, scores in runs.items():
        make_run(tmp_path / "run", agent, scores)
    return RunDir(tmp_path / "run").episodes(), dense


def test_rows_carry_n_se_paired_ci_and_verdict_dense_first(tmp_path):
    table, dense = _episodes(tmp_path)
    out = comparison_table(table, MODELS, {}).set_index("agent")
    assert list(out.index) == ["llm-dense", "llm-owl-0.7", "llm-wanda-0.5", "llm-wanda-0.7", "expert"]
    n = len(dense)
    assert (out["n"] == n).all()
    values = np.array(list(dense.values()))
    assert out.loc["llm-dense", "ds_se"] == np.std(values, ddof=1) / np.sqrt(n)  # the SE, not the std
    assert out.loc["llm-wanda-0.7", "verdict"] == "worse" and out.loc["llm-wanda-0.7", "ds_ci_high"] < 0
    assert out.loc["llm-owl-0.7", "verdict"] == "better" and out.loc["llm-owl-0.7", "ds_ci_low"] > 0
    assert out.loc["llm-wanda-0.5", "verdict"] == "no sig. diff"
    assert out.loc["llm-wanda-0.5", "ds_ci_low"] < out.loc["llm-wanda-0.5", "ds_diff"] < out.loc["llm-wanda-0.5", "ds_ci_high"]
    assert not np.isfinite(out.loc["llm-dense", "ds_diff"]) and out.loc["llm-dense", "verdict"] == ""


def test_few_episodes_say_so_instead_of_a_verdict(tmp_path, capsys):
    table, _ = _episodes(tmp_path, n_scenarios=2, seeds=(1, 2))
    out = comparison_table(table, MODELS, {})
    assert set(out[out.agent != "llm-dense"].verdict) == {"n too small"}


def test_the_printed_tables_fit_100_columns_and_say_what_does_not_apply(tmp_path):
    table, _ = _episodes(tmp_path)
    buffer = io.StringIO()
    print_comparison(comparison_table(table, MODELS, {}), console=Console(file=buffer, width=100))
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text and "nan" not in text and "e+06" not in text
    assert "–" in text and "worse" in text and "better" in text


def test_an_agents_own_failures_count_as_zero_and_infrastructure_failures_drop_out():
    from prunedrive.harness.paired import compare_to_baseline

    rows = []
    for seed in range(12):
        rows.append({"agent": "dense", "scenario": "s", "seed": seed, "status": "finished", "failure": "",
                     "driving_score": 80.0})
        failed = seed < 4
        rows.append({"agent": "pruned", "scenario": "s", "seed": seed, "status": "failed" if failed else "finished",
                     "failure": ("agent" if seed < 2 else "infrastructure") if failed else "",
                     "driving_score": 0.0 if failed else 80.0})
    [row] = compare_to_baseline(pd.DataFrame(rows), "dense").to_dict("records")
    assert row["n_pairs"] == 10  # the two infrastructure failures say nothing about the model
    assert row["diff"] == -16.0  # two crashes of its own code at DS 0 among 10 pairs


def test_cost_table_gives_stored_params_and_the_step_time_ratio_to_dense(tmp_path):
    """x dense is each model's measured p50 step time over the dense model's in the same run; stored parameters
    tell a structured variant (fewer stored) from an unstructured one (as many stored, fewer non-zero)."""
    eps = episodes(4, (1, 2, 3))
    models = {name: BenchModel(name, method, sparsity, None) for name, method, sparsity in (
        ("llm-dense", "dense", 0.0), ("llm-wanda-0.5", "wanda", 0.5), ("llm-width-0.5", "width", 0.5))}
    runs = {"llm-dense": (40.0, 2_000_000, 2_000_000), "llm-wanda-0.5": (40.0, 2_000_000, 1_100_000),
            "llm-width-0.5": (25.0, 1_150_000, 1_150_000), "expert": (2.0, np.nan, np.nan)}
    for agent, (ms, params, nonzero) in runs.items():
        make_run(tmp_path / "run", agent, {e: 80.0 for e in eps}, wall_ms=ms,
                 compute={"params": params, "nonzero_params": nonzero})
    out = comparison_table(RunDir(tmp_path / "run").episodes(), models, {}).set_index("agent")
    assert out.loc["llm-dense", "step_ratio"] == 1.0
    assert out.loc["llm-wanda-0.5", "step_ratio"] == 1.0
    assert abs(out.loc["llm-width-0.5", "step_ratio"] - 25 / 40) < 1e-9  # the ratio, not the reciprocal
    assert not np.isfinite(out.loc["expert", "step_ratio"])  # no model: its step is not a model's
    assert out.loc["llm-width-0.5", "params"] == 1_150_000 and out.loc["llm-wanda-0.5", "params"] == 2_000_000
    buffer = io.StringIO()
    print_comparison(out.reset_index(), console=Console(file=buffer, width=100))
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 100 and "…" not in text
    width_row = next(line for line in text.splitlines() if line.startswith("llm-width-0.5") and "M" in line)
    assert "1.15M" in width_row and "0.62" in width_row  # stored params and x dense, printed
    assert "x dense is it over the dense model's in this run" in " ".join(text.split())


def test_the_widest_cells_a_bench_prints_are_not_cut(tmp_path):
    """The closed-loop table of a real first bench: the longest agent name, two-digit SEs, three-digit CIs and the
    longest verdict (a 100-column console, as in a log, cut them with '…' before)."""
    table, _ = _episodes(tmp_path)
    out = comparison_table(table, MODELS, {})
    out["agent"] = ["llm-magnitude-0.85", "llm-owl-width-0.85", "llm-dg2pf-0.85", "llm-sparsegpt-0.85", "expert"]
    out["driving_score"], out["ds_se"], out["route_completion"] = 100.0, 17.5, 100.0
    out.loc[out.index[1:], ["ds_diff", "ds_ci_low", "ds_ci_high"]] = (-42.2, -100.0, -27.5)
    out.loc[out.index[1:], "verdict"] = ["n too small", "no sig. diff", "worse", "better"]
    out["collisions_per_km"], out["success_rate"], out["parse_failure_rate"] = 11.79, 100.0, 0.84
    buffer = io.StringIO()
    print_comparison(out, console=Console(file=buffer, width=100))
    text = buffer.getvalue()
    assert "…" not in text and "-42.2 [-100.0, -27.5]" in text and "no sig. diff" in text
    assert max(len(line) for line in text.splitlines()) <= 100
