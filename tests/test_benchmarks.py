"""Every script under benchmarks/ starts, runs and prints its table on a tiny configuration, so none can break
unseen (two had died at import for weeks). The figures themselves are not checked here: they are timings,
and timings belong in the scripts, not in tests."""
import subprocess
import sys
from pathlib import Path

import pytest

from prunedrive.app.train import train

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-tiny") / "model"
    train("tiny", out_dir=out, data_dir=out / "data", progress=False)
    return out


def tiny_arguments(script: str, suite: Path, model: Path, tmp: Path) -> list[str]:
    """The smallest run of each script that still goes through all of its code paths."""
    return {
        "agent_step": ["--repeats", "2", "--tokens", "2", "--no-rss", "--csv", str(tmp / "agent_step.csv")],
        "closed_loop_llm": ["--model", str(model), "--suite", str(suite), "--seeds", "1"],
        "harness_overhead": ["--suite", str(suite), "--repeats", "1"],
        "llm_presets": ["--repeats", "1"],
        "sim_step": ["--suite", str(suite), "--episodes", "1"],
        "throughput": ["--model", str(model), "--suite", str(suite), "--seeds", "1", "--batches", "1", "2"],
    }[script]


# The line each script prints once its measurement is done: proof that it ran to its table, not only started
# (a tuple: every one of them).
TABLE_MARKERS = {
    # issue 28's accounting: stored and non-zero params, K = 1 and 16, the path, what it buys, the targets
    "agent_step": ("Amdahl", " K params nonzero prunable", "width50  dense    16", "depth25  dense     1",
                   "dense kernels: no speed-up (zeros multiplied)", "dense kernels, 3 of 4 blocks",
                   "width50 K=16:", "device: cpu"),
    "closed_loop_llm": "mean driving score",
    "harness_overhead": "(target < 5%)",
    "llm_presets": "ms/step",
    "sim_step": "short-cruise",
    "throughput": "ratios to K=1",
}


def test_every_script_has_a_tiny_configuration():
    assert set(SCRIPTS) == set(TABLE_MARKERS), "add a tiny configuration for each new benchmark script"


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_runs_on_a_tiny_configuration(script, tiny_suite, tiny_model, tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"),
               *tiny_arguments(script, tiny_suite, tiny_model, tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, f"{script}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    markers = TABLE_MARKERS[script]
    for marker in (markers,) if isinstance(markers, str) else markers:
        assert marker in done.stdout, f"{script} printed no {marker!r}:\n{done.stdout[-2000:]}"
    if script == "agent_step":
        check_agent_step_accounting(tmp_path / "agent_step.csv")


def check_agent_step_accounting(csv_path: Path) -> None:
    """Structured variants store fewer parameters (width 50%: half the LM's prunable ones; depth 25%: a quarter of
    the blocks), unstructured ones store as many with fewer non-zeros; ratios are to dense at the same K."""
    import pandas as pd

    rows = pd.read_csv(csv_path).set_index(["variant", "execution", "batch"])
    dense = rows.loc[("dense", "masked", 16)]
    width, depth = rows.loc[("width50", "dense", 16)], rows.loc[("depth25", "dense", 1)]
    assert abs(width.prunable_params / dense.prunable_params - 0.5) < 0.02
    assert abs(depth.prunable_params / dense.prunable_params - 0.75) < 1e-9  # 3 of the 4 blocks
    assert width.params < dense.params and depth.params < dense.params
    u70 = rows.loc[("u70", "masked", 1)]
    assert u70.params == dense.params and abs(u70.prunable_nonzero / u70.prunable_params - 0.3) < 0.01
    assert u70.speedup == "no speed-up" and "zeros multiplied" in u70.path
    assert rows.loc[("dense", "masked", 1), "p50_ms_ratio"] == 1.0 and dense.p50_ms_ratio == 1.0
    assert dense.paired_ratio == 1.0 and dense.min_ratio == 1.0
    assert set(rows.index.get_level_values("batch")) == {1, 16}
