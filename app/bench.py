"""`prunedrive bench`: the main job. Build or reuse the dense driving LLM, prune it with OWL and DG2PF
and the Wanda and magnitude baselines at each sparsity, drive every model closed-loop on a suite, and
print one comparison table with the open-loop errors beside the closed-loop scores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.harness.metrics import BENCH, in_view


def pruned_models(dense_dir: Path, methods, sparsities, progress: bool) -> dict[str, tuple[str, float, Path]]:
    """{agent name: (method, sparsity, model dir)}, pruning only what is not there yet. A pruned model is
    cached under a hash of its full recipe and of the dense weights, so changed settings or a retrained
    dense model never reuse a stale one."""
    from prunedrive.app.compress import prune_model_dir, recipe
    from prunedrive.app.drive import weights_hash
    from prunedrive.harness.results import content_hash

    dense_hash = weights_hash(dense_dir)
    models = {"llm-dense": ("dense", 0.0, dense_dir)}
    for method in methods:
        for sparsity in sparsities:
            key = content_hash({"recipe": recipe(method, sparsity), "dense": dense_hash})[:10]
            out = dense_dir / "pruned" / f"{method}-{sparsity:g}-{key}"
            if not (out / "sparsity.json").is_file():
                prune_model_dir(dense_dir, method, sparsity, out, progress=progress)
            models[f"llm-{method}-{sparsity:g}"] = (method, sparsity, out)
    return models


# The open-loop errors `evaluate_open_loop` reports: {bench column: (its key there, terminal header)}.
OPEN_LOOP_COLUMNS = {"lon_error": ("lon_control_error", "lon err"), "lat_error": ("lat_control_error", "lat err"),
                     "vehicle_count_error": ("vehicle_count_error", "veh count err"),
                     "parse_rate": ("action_parse_rate", "parse")}
# bench.csv predates harness.metrics: its readers know the per-step time by this name.
CSV_NAMES = {"agent_ms_p50": "step_ms_p50"}
# Closed-loop driving metrics first, open-loop errors in between, what the model costs last.
DRIVING = [m for m in in_view(BENCH) if not m.cost]
COMPUTE = [m for m in in_view(BENCH) if m.cost]


def comparison_table(episodes: pd.DataFrame, models: dict, open_loop: dict) -> pd.DataFrame:
    """One row per agent: method and sparsity, the closed-loop metrics of harness.metrics' bench view
    (means), the open-loop errors, then the compute metrics."""
    from prunedrive.harness.summary import summarize

    table = summarize(episodes, ["agent"]).set_index("agent")
    rows = []
    for agent, row in table.iterrows():
        method, sparsity, _ = models.get(agent, (agent, 0.0, None))
        errors = open_loop.get(agent, {})
        rows.append({
            "agent": agent, "method": method, "sparsity": sparsity,
            **{CSV_NAMES.get(m.key, m.key): m.value(row) for m in DRIVING},
            **{column: errors.get(key, np.nan) for column, (key, _) in OPEN_LOOP_COLUMNS.items()},
            **{CSV_NAMES.get(m.key, m.key): m.value(row) for m in COMPUTE},
        })
    return pd.DataFrame(rows)


# Short headers so the table fits a terminal; bench.csv keeps the full column names.
HEADERS = {"sparsity": "sparsity", **{CSV_NAMES.get(m.key, m.key): m.short for m in DRIVING + COMPUTE},
           **{column: header for column, (_, header) in OPEN_LOOP_COLUMNS.items()}}


def print_comparison(table: pd.DataFrame) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=200)
    out = Table(title="prunedrive bench: closed-loop (Leaderboard 2.0) and open-loop, per model")
    for column in table.columns:
        out.add_column(HEADERS.get(column, column), justify="left" if column in ("agent", "method") else "right",
                       no_wrap=column == "agent")
    for _, row in table.iterrows():
        out.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    console.print(out)


def run_bench(suite_name: str, preset: str, methods, sparsities, out: Path, run_id: str | None,
              progress: bool = True, with_expert: bool = True, workers: int | None = None,
              mlflow: str | None = None) -> int:
    """The main job; returns the exit code (app.drive.exit_code)."""
    from prunedrive.agents.registry import AgentSpec
    from prunedrive.app.compress import training_data_dir
    from prunedrive.app.drive import drive, exit_code
    from prunedrive.app.eval_open import evaluate_open_loop
    from prunedrive.app.train import ensure_default_model
    from prunedrive.models.data import load_split
    from prunedrive.models.driving_llm import DrivingLLM
    from prunedrive.scenarios.loader import load_suite

    suite = load_suite(suite_name)
    dense_dir = ensure_default_model(preset, progress=progress)
    models = pruned_models(dense_dir, methods, sparsities, progress)
    specs = ([AgentSpec("expert")] if with_expert else []) + [
        AgentSpec("llm", str(path), label=name) for name, (_, _, path) in models.items()]
    # Per agent: its model, method and target sparsity (of the LM), which `prunedrive report` plots.
    config = {"model": str(dense_dir), "methods": list(methods), "sparsities": list(sparsities),
              "models": {name: str(path) for name, (_, _, path) in models.items()},
              "method": {name: method for name, (method, _, _) in models.items()},
              "sparsity": {name: sparsity for name, (_, sparsity, _) in models.items()}}
    run_dir, episodes = drive(suite, specs, out, run_id=run_id, default_run_id=f"bench-{suite.name}-{preset}",
                              workers=workers, progress=progress, config=config)

    split = load_split(training_data_dir(dense_dir), "val")
    open_loop = {name: evaluate_open_loop(DrivingLLM.from_pretrained(path), split, 200)
                 for name, (_, _, path) in models.items()}
    (run_dir.path / "open_loop.json").write_text(json.dumps(open_loop, indent=2, default=float))
    table = comparison_table(episodes, models, open_loop)
    table.to_csv(run_dir.path / "bench.csv", index=False)
    print_comparison(table)
    print(f"results: {run_dir.path.resolve()}")
    if mlflow is not None:  # `--mlflow [URI]`: "" is the default store beside the run
        from prunedrive.app.mlflow_log import log_run

        log_run(run_dir, mlflow, extra_metrics={name: {f"open_loop.{k}": v for k, v in metrics.items()}
                                                 for name, metrics in open_loop.items()})
    return exit_code(episodes, run_dir)
