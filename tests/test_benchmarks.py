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


# The line each script prints once its measurement is done: proof that it ran to its table, not only started.
TABLE_MARKERS = {
    "agent_step": "Amdahl",
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
    assert TABLE_MARKERS[script] in done.stdout, f"{script} printed no table:\n{done.stdout[-2000:]}"
