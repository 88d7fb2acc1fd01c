"""`prunedrive bench`: the main job. Build or reuse the dense driving LLM, prune it with OWL and DG2PF
and the Wanda and magnitude baselines at each sparsity, drive every model closed-loop on a suite, and
print one comparison table with the open-loop errors beside the closed-loop scores."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.harness.latency import parse_latency, run_id_suffix
from prunedrive.harness.metrics import BENCH, in_view
from prunedrive.app.bench_model import BenchModel
from prunedrive.harness.paired import MIN_PAIRS_FOR_VERDICT
from prunedrive.models.card import DENSE as DENSE_METHOD
from prunedrive.models.card import has_model_card
from prunedrive.app.cells import mean_se, missing, number, paired_diff


def prune_variants(dense_dir: Path, variants: dict[str, dict], progress: bool, say=None,
                   device: str = "cpu") -> dict[str, BenchModel]:
    """{agent name: BenchModel} for `variants` ({agent name: prune_model_dir keyword
    arguments, `method` and `sparsity` included}), pruning only what is not there yet. A pruned model is
    cached under a hash of its full recipe and of the dense weights, so changed settings or a retrained
    dense model never reuse a stale one. Benches of one model at once share the cache: a recipe another
    process is pruning is waited for and then reused (prune_model_dir's `reuse`: a lock per recipe)."""
    from prunedrive.app.prune import prune_model_dir, recipe
    from prunedrive.app.run import weights_hash
    from prunedrive.harness.results import content_hash

    dense_hash = weights_hash(dense_dir)
    models = {DENSE_AGENT: BenchModel(DENSE_AGENT, DENSE_METHOD, 0.0, dense_dir)}
    for i, (name, options) in enumerate(variants.items(), 1):
        options = dict(options)
        if device != "cpu":  # pruned on that device, in float32 (DG2PF trains in float32); in the recipe's key
            options["device"] = device
        method, sparsity = options.pop("method"), options.pop("sparsity")
        key = content_hash({"recipe": recipe(method, sparsity, **options), "dense": dense_hash})[:10]
        out = dense_dir / "pruned" / f"{method}-{sparsity:g}-{key}"
        if not has_model_card(out):
            if say:
                say(f"  pruning {i}/{len(variants)}: {name} ({prune_estimate(method, options)})")
            prune_model_dir(dense_dir, method, sparsity, out, progress=progress, reuse=True, **options)
        models[name] = BenchModel(name, method, sparsity, out)
    return models


def pruned_models(dense_dir: Path, methods, sparsities, progress: bool, say=None,
                  device: str = "cpu") -> dict[str, BenchModel]:
    """The bench's variants: every method at every sparsity, default settings."""
    return prune_variants(dense_dir, {f"llm-{m}-{s:g}": {"method": m, "sparsity": s} for m in methods
                                      for s in sparsities}, progress, say, device)


# The open-loop errors `evaluate_open_loop` reports: {bench column: (its key there, terminal header)}.
OPEN_LOOP_COLUMNS = {"lon_error": ("lon_control_error", "lon err"), "lat_error": ("lat_control_error", "lat err"),
                     "vehicle_count_error": ("vehicle_count_error", "veh err"),
                     "parse_rate": ("action_parse_rate", "parse")}
OPEN_LOOP_LEGEND = ("open loop, on held-out expert data: lon/lat err = mean absolute error of the "
                    "longitudinal (throttle - brake, [-1, 1]) and lateral (steer, [-1, 1]) control; veh err = "
                    "vehicle count error (vehicles); parse = share of answers that parse as an action")
# bench.csv predates harness.metrics: its readers know the per-step time by this name.
CSV_NAMES = {"agent_ms_p50": "step_ms_p50"}
# Closed-loop driving metrics first, open-loop errors in between, what the model costs last.
DRIVING = [m for m in in_view(BENCH) if not m.cost]
COMPUTE = [m for m in in_view(BENCH) if m.cost]
DENSE_AGENT = "llm-dense"  # the agent label of the dense model (its method is models.card.DENSE)


def _order(agent: str, models: dict[str, BenchModel], methods: list[str]) -> tuple:
    """Dense first, then by method (in the order asked) and sparsity; reference agents (the expert) last."""
    if agent not in models:
        return (2, 0, 0.0, agent)
    model = models[agent]
    return (0 if model.method == DENSE_METHOD else 1,
            methods.index(model.method) if model.method in methods else len(methods), model.sparsity, agent)


def comparison_table(episodes: pd.DataFrame, models: dict[str, BenchModel], open_loop: dict) -> pd.DataFrame:
    """One row per agent, dense first: n, mean DS and its standard error, the paired DS difference to the
    dense model with its 95% bootstrap CI and a verdict (harness.paired.compare_to_baseline), the
    closed-loop metrics of harness.metrics' bench view, the open-loop errors, then the compute metrics."""
    from prunedrive.harness.paired import compare_to_baseline
    from prunedrive.harness.summary import summarize

    table = summarize(episodes, ["agent"]).set_index("agent")
    versus = (compare_to_baseline(episodes, DENSE_AGENT).set_index("agent") if DENSE_AGENT in table.index
              else pd.DataFrame(columns=["n_pairs", "diff", "ci_low", "ci_high", "verdict"]))
    methods = list(dict.fromkeys(model.method for model in models.values()))
    rows = []
    for agent in sorted(table.index, key=lambda a: _order(a, models, methods)):
        row, errors = table.loc[agent], open_loop.get(agent, {})
        model = models.get(agent)
        method, sparsity = (model.method, model.sparsity) if model is not None else (agent, np.nan)
        n = int(row["episodes"])
        paired = versus.loc[agent] if agent in versus.index else {}
        rows.append({
            "agent": agent, "method": method, "sparsity": sparsity, "n": n,
            "ds_se": float(row["driving_score_std"]) / np.sqrt(n) if n > 1 else np.nan,
            "ds_diff": paired.get("diff", np.nan), "ds_ci_low": paired.get("ci_low", np.nan),
            "ds_ci_high": paired.get("ci_high", np.nan), "verdict": paired.get("verdict", ""),
            **{CSV_NAMES.get(m.key, m.key): m.value(row) for m in DRIVING},
            **{column: errors.get(key, np.nan) for column, (key, _) in OPEN_LOOP_COLUMNS.items()},
            **{CSV_NAMES.get(m.key, m.key): m.value(row) for m in COMPUTE},
            "params": _stored_params(episodes, agent),
        })
    return with_step_ratio(pd.DataFrame(rows))


def _stored_params(episodes: pd.DataFrame, agent: str) -> float:
    """Parameters the agent's model stores (zeros included; a structured variant stores fewer), NaN without a model."""
    if "params" not in episodes:
        return np.nan
    values = pd.to_numeric(episodes.loc[episodes["agent"] == agent, "params"], errors="coerce").dropna()
    return float(values.max()) if len(values) else np.nan


def with_step_ratio(table: pd.DataFrame) -> pd.DataFrame:
    """`step_ratio`: each model's measured per-step time (p50) over the dense model's, from this same run (same
    machine, same load, the same episodes): what pruning bought in time, where FLOPs only say what it could.
    NaN without a dense row or a time; agents without a model get NaN too (their step is not a model's)."""
    table = table.copy()
    dense = (table.loc[table["agent"] == DENSE_AGENT, "step_ms_p50"] if "step_ms_p50" in table
             else pd.Series(dtype=float))
    reference = float(dense.iloc[0]) if len(dense) else np.nan
    sizes = table["nonzero_params"] if "nonzero_params" in table else pd.Series(np.nan, index=table.index)
    has_model = np.isfinite(pd.to_numeric(sizes, errors="coerce").astype(float))
    ratio = table["step_ms_p50"] / reference if np.isfinite(reference) and reference > 0 else np.nan
    table["step_ratio"] = np.where(has_model, ratio, np.nan)
    return table


# Short headers so the tables fit 100 columns; bench.csv keeps the full column names.
HEADERS = {"sparsity": "sparsity", **{CSV_NAMES.get(m.key, m.key): m.short for m in DRIVING + COMPUTE},
           **{column: header for column, (_, header) in OPEN_LOOP_COLUMNS.items()}}
TABLE_WIDTH = 100


def _cell(value, fmt: str = "{:.2f}") -> str:
    """A number for people ("params": 2.14M, 998k: narrower than harness.metrics.human_count); "–" where it does
    not apply."""
    if fmt != "params" or missing(value):
        return number(value, fmt)
    value = float(value)
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}k" if value >= 1e3 else f"{value:.0f}"


def print_comparison(table: pd.DataFrame, load_note: str = "", console=None) -> None:
    """Two tables that fit 100 columns: how the models drive (with the paired comparison to dense), and
    what they cost with their open-loop errors; then a legend."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=min(Console().width, TABLE_WIDTH) if Console().is_terminal else TABLE_WIDTH)
    # One space of padding, not two: nine columns with the widest cells a bench prints (a two-digit SE, a
    # three-digit CI, "no sig. diff") fit 100 characters only so.
    style = {"box": box.SIMPLE_HEAD, "pad_edge": False, "show_edge": False, "title_justify": "left",
             "padding": (0, 0, 0, 1)}
    driving = Table(title="Closed loop (Leaderboard 2.0); ΔDS: paired with dense by scenario and seed", **style)
    for header in ("agent", "n", "DS ± SE", "ΔDS [95% CI]", "verdict", "RC", "coll/\nkm", "succ", "parse\nfail"):
        driving.add_column(header, justify="left" if header in ("agent", "verdict") else "right", no_wrap=True)
    for r in table.itertuples():
        driving.add_row(r.agent, str(r.n), mean_se(r.driving_score, r.ds_se),
                        paired_diff(r.ds_diff, r.ds_ci_low, r.ds_ci_high), r.verdict or "–",
                        _cell(r.route_completion, "{:.1f}"), _cell(r.collisions_per_km),
                        _cell(r.success_rate, "{:.0f}"), _cell(getattr(r, "parse_failure_rate", np.nan)))
    console.print(driving)
    cost = Table(title="Cost and open loop", **style)  # twelve columns of numbers, structured names too
    for header in ("agent", "spar-\nsity", "params", "non-\nzero", "eff\nGFLOP", "exec\nGFLOP", "ms/\nstep", "x\ndense",
                   "lon\nerr", "lat\nerr", "veh\nerr", "parse"):
        cost.add_column(header, justify="left" if header == "agent" else "right", no_wrap=True)
    for r in table.itertuples():
        cost.add_row(r.agent, _cell(r.sparsity, "{:.2f}"), _cell(getattr(r, "params", np.nan), "params"),
                     _cell(r.nonzero_params, "params"),
                     _cell(r.effective_gflops, "{:.3f}"), _cell(getattr(r, "executed_gflops", np.nan), "{:.3f}"),
                     _cell(r.step_ms_p50, "{:.1f}"), _cell(getattr(r, "step_ratio", np.nan), "{:.2f}"),
                     _cell(r.lon_error, "{:.3f}"), _cell(r.lat_error, "{:.3f}"),
                     _cell(r.vehicle_count_error), _cell(r.parse_rate))
    console.print(cost)
    if "execution" in table:  # app.bench_variants.with_checkpoints: what each model's checkpoint costs to store
        print_checkpoints(table, console)
    n_min = int(table["n"].min()) if len(table) else 0
    legend = [
        "DS: driving score (0-100), mean ± standard error over n episodes. ΔDS: mean paired difference to dense "
        "with its 95% percentile-bootstrap CI; verdict better/worse when the CI excludes 0. RC: route completion %; "
        "succ: % of episodes finished without infraction. parse fail: share of the model's closed-loop answers that "
        "did not parse (it braked instead; – for agents without a model).",
        f"GFLOP per agent step: eff counts non-zero weights, exec what the kernels multiply (deterministic); "
        "ms/step is wall time (p50), which depends on the machine and its load; x dense is it over the dense "
        "model's in this run (unstructured zeros run on dense kernels: about 1.00, no speed-up; structured "
        "variants store fewer params). sparsity: share of weights zeroed, or of width (width, owl-width) or of "
        "blocks (depth) removed.",
        OPEN_LOOP_LEGEND + ".",
    ]
    if n_min < MIN_PAIRS_FOR_VERDICT:
        legend.insert(0, f"n = {n_min} episodes per agent is too few to conclude (verdicts need >= "
                         f"{MIN_PAIRS_FOR_VERDICT} pairs): run a larger suite, e.g. --suite standard.")
    if load_note:
        legend.append(load_note)
    for line in legend:
        console.print(line, style="dim", overflow="fold")


def print_checkpoints(table: pd.DataFrame, console) -> None:
    """The checkpoint table (fits 100 columns): bytes on disk, ratio to dense, parameters stored, non-zeros,
    compression scheme and how it runs here."""
    from rich import box
    from rich.table import Table

    checkpoints = Table(title="Checkpoints", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                        title_justify="left")
    for header in ("agent", "MB on\ndisk", "x dense\nbytes", "params\nstored", "non-\nzero", "scheme", "execution"):
        checkpoints.add_column(header, justify="left" if header in ("agent", "scheme", "execution") else "right",
                               no_wrap=True)
    for r in table.itertuples():
        if not isinstance(r.execution, str) or not r.execution:
            continue  # no model (the expert)
        checkpoints.add_row(r.agent, _cell(r.bytes_on_disk / 1e6, "{:.2f}"), _cell(r.ratio_to_dense, "{:.3f}"),
                            _cell(r.parameters_stored, "params"), _cell(r.nonzero_params, "params"), r.scheme,
                            r.execution)
    console.print(checkpoints)
    console.print("MB on disk: the weight files (safetensors) only; x dense bytes: over llm-dense's; params stored: "
                  "the dense shapes of the stored weights (zeros included); non-zero: measured while driving; "
                  "execution: \"decompressed: no kernel\" = the compressed weights are decompressed to float at "
                  "load and run on dense kernels (no sparse or integer kernel; FLOPs and ms/step above).",
                  style="dim", overflow="fold")


def attach_open_loop(run_dir, open_loop: dict) -> None:
    """The open-loop errors ({agent: evaluate_open_loop's dict}) as the run's `open_loop` attachment, rendered in the
    report by app.bench_report.open_loop_section."""
    run_dir.attach("open_loop", open_loop, producer=__name__, section="prunedrive.app.bench_report:open_loop_section")


def attach_checkpoints(run_dir, checkpoints: dict[str, dict]) -> None:
    """What each model's checkpoint costs (app.bench_variants.checkpoint_records) as the run's `checkpoints`
    attachment: the report's cost columns, by app.bench_report.checkpoints_section."""
    run_dir.attach("checkpoints", checkpoints, producer=__name__,
                   section="prunedrive.app.bench_report:checkpoints_section")


OPEN_LOOP_SAMPLES = 200  # held-out expert samples per model; `prunedrive eval-open` defaults to 400


# Seconds with `small` on a 2-core machine at load 1.4 (nearly idle), with the CLI's OMP_WAIT_POLICY=PASSIVE, from
# one `prunedrive bench --sparsities 0.7` (its phase lines and episodes.parquet): training the default model (expert
# data, training, DAgger; 422 s idle, README), pruning one variant by method (DG2PF trains: 80 s at 0.7; SparseGPT
# is not in the default bench, a guess), one closed-loop step (simulator + agent, batch 1: 7 ms expert, 40 ms LLM)
# and the open-loop eval of one model (200 samples: 2 s). harness.progress.estimate scales them with the load.
IDLE_TRAIN_SECONDS = {"small": 422.0}
IDLE_PRUNE_SECONDS = {"magnitude": 1.0, "wanda": 2.0, "owl": 3.0, "sparsegpt": 10.0, "dg2pf": 80.0,
                      # structured, at 0.5: OWL's 3 s scaled by their time relative to OWL's, timed one after the
                      # other in one process at load 6 (owl 33 s, width 7 s, owl-width 28 s, depth 26 s)
                      "width": 1.0, "owl-width": 3.0, "depth": 3.0}
IDLE_STEP_SECONDS = {"expert": 0.007, "llm": 0.04}
IDLE_OPEN_LOOP_SECONDS = 2.0


def prune_estimate(method: str, options: dict) -> str:
    """How long pruning one variant will take; one-shot methods fine-tuned under their mask (`finetune`) take
    about DG2PF's time."""
    from prunedrive.harness.progress import estimate

    seconds = IDLE_PRUNE_SECONDS.get(method)
    if options.get("finetune"):
        seconds = (seconds or 0.0) + IDLE_PRUNE_SECONDS["dg2pf"]
    return estimate(seconds) if seconds is not None else "no measured time for this method"


def driving_estimate(specs, suite) -> str:
    """How long driving will take at most: every episode to its time limit, at the measured time per step."""
    from prunedrive.harness.progress import estimate

    steps = sum(scenario.duration_s * scenario.policy_hz for scenario, _ in suite.episodes())
    seconds = sum(steps * IDLE_STEP_SECONDS["expert" if spec.name == "expert" else "llm"] for spec in specs)
    return "at most " + estimate(seconds)


class Phases:
    """Phase lines with the elapsed time, flushed at once: readable in a terminal and in a log file. As a context
    manager it keeps a harness.progress.Heartbeat: with the output going to a log, a `still <phase>` line when
    nothing else was printed for a minute."""

    def __init__(self, enabled: bool = True, heartbeat: bool = True):
        from prunedrive.harness.progress import Heartbeat

        self.enabled, self.started = enabled, time.monotonic()
        self.heartbeat = Heartbeat(enabled and heartbeat, prefix=self.stamp)

    def stamp(self) -> str:
        elapsed = int(time.monotonic() - self.started)
        return f"[{elapsed // 60:3d}:{elapsed % 60:02d}] "

    def __call__(self, text: str) -> None:
        from prunedrive.harness.progress import say

        if self.enabled:
            self.heartbeat.set_phase(text.strip().split(" (")[0])
            say(self.stamp() + text)

    def __enter__(self):
        self.heartbeat.__enter__()
        return self

    def __exit__(self, *exc):
        self.heartbeat.__exit__(*exc)


def load_note(loads: list[float]) -> str:
    """A warning when the machine was busier than its cores during the run: per-step wall times then say
    more about the load than about the models."""
    cores = os.cpu_count() or 1
    worst = max(loads)
    if worst <= cores:
        return f"machine load during the run: up to {worst:.1f} on {cores} cores (per-step times comparable)."
    return (f"WARNING: machine load reached {worst:.1f} on {cores} cores during the run: per-step times are "
            "unreliable. Compare the GFLOP columns, or time models with benchmarks/agent_step.py on an idle machine.")


def print_latency(episodes: pd.DataFrame, latency: str | None, budget_ms: float | None, run_dir,
                  bench_table: pd.DataFrame) -> None:
    """Under a latency model: what the DS above was driven under, and per agent its decision latency, deadline
    misses and (`--budget`) whether it meets the per-decision budget; also written to latency.csv, and attached
    for the report's real-time section (DS under real time against measured step time, the budget)."""
    from prunedrive.app.latency_report import realtime_payload
    from prunedrive.harness.latency import budget_table

    table = budget_table(episodes, budget_ms)
    if table is None:
        return
    model = parse_latency(latency)
    print(f"\ndriven under --latency {model.spec} ({model.label}): DS and its deltas above are under real time")
    table.to_csv(run_dir.path / "latency.csv", index=False)
    run_dir.attach("latency_realtime", realtime_payload(bench_table, table, budget_ms, model.label), producer=__name__,
                   section="prunedrive.app.latency_report:realtime_section")
    header = f"{'agent':<22} {'decisions':>9} {'ms mean':>8} {'ms p95':>8} {'miss %':>7} {'ctrl Hz':>7}"
    print(header + (f" {'<= ' + format(budget_ms, 'g') + ' ms':>10}" if budget_ms is not None else ""))
    for row in table.itertuples():
        line = (f"{row.agent:<22} {row.decisions:>9.1f} {row.latency_ms_mean:>8.0f} {row.latency_ms_p95:>8.0f} "
                f"{100 * row.deadline_miss_share:>7.0f} {row.control_hz:>7.2f}")
        print(line + (f" {'meets' if row.meets_budget else 'misses':>10}" if budget_ms is not None else ""))


def run_bench(suite_name: str, preset: str, methods, sparsities, out: Path, run_id: str | None,
              progress: bool = True, **options) -> int:
    """The main job (see _bench); phase lines all along and, when the output goes to a log, a line at least every
    minute (Phases' heartbeat)."""
    with Phases(heartbeat=progress) as say:
        return _bench(say, suite_name, preset, methods, sparsities, out, run_id, progress=progress, **options)


def _bench(say: Phases, suite_name: str, preset: str, methods, sparsities, out: Path, run_id: str | None,
           progress: bool = True, with_expert: bool = True, workers: int | None = None,
           mlflow: str | None = None, batch: int = 1, model: str | Path | None = None,
           variants: dict[str, str] | None = None, latency: str | None = None, budget_ms: float | None = None,
           device: str = "cpu",
           dtype: str = "float32") -> int:
    """The main job; returns the exit code (app.run.exit_code). `model`: the user's dense model directory (our
    driving LLM, or any local Hugging Face causal LM, driven by the `text-llm` agent) instead of the zoo's.
    `variants`: {name: directory} of the user's own variants of it (app.bench_variants), checked before anything
    is pruned or driven and driven beside the ones pruned here (`methods` empty: only them). `device`/`dtype`
    (models.device): pruning runs on the device in float32 (DG2PF trains in float32 only); driving and the
    open-loop errors on the device in the dtype."""
    import functools

    from prunedrive.models.device import torch_dtype
    from prunedrive.app.bench_variants import check_variants, checkpoint_records, with_checkpoints
    from prunedrive.agents.registry import AgentSpec
    from prunedrive.app.prune_driving import training_data_dir
    from prunedrive.app.run import drive, exit_code
    from prunedrive.app.eval_open import TextModel, evaluate_open_loop
    from prunedrive.app.train import ensure_default_model
    from prunedrive.app.zoo import default_model_dir, is_trained, shipped_is_current
    from prunedrive.harness.progress import estimate
    from prunedrive.models.data import load_split
    from prunedrive.models.driving_llm import DrivingLLM
    from prunedrive.models.hf_causal import is_hf_causal_lm_dir
    from prunedrive.harness.backends import check_suite
    from prunedrive.scenarios.loader import load_suite

    suite = check_suite(load_suite(suite_name))  # kinds and options too: refused before anything is pruned
    parse_latency(latency)  # a bad --latency or profile is refused before anything is pruned or driven
    if budget_ms is not None and (latency or "none") == "none":
        raise ValueError("--budget needs a latency model: --latency fixed:MS, profile:FILE or measured")
    zoo_dir = default_model_dir(preset)
    if model is not None:
        dense_dir = Path(model)
        say(f"dense model: {dense_dir} (yours)")
    elif is_trained(zoo_dir, preset):
        say(f"dense model: {zoo_dir} (trained earlier; reused)")
    elif not shipped_is_current(preset):  # a shipped current model is copied in seconds (ensure_default_model says so)
        say(f"training the default {preset} model once into {zoo_dir} (first run only; "
            f"{estimate(IDLE_TRAIN_SECONDS.get(preset, IDLE_TRAIN_SECONDS['small']))}): expert data, training, DAgger")
    dense_dir = dense_dir if model is not None else ensure_default_model(preset, progress=progress, say=say)
    text_format = is_hf_causal_lm_dir(dense_dir)  # a plain causal LM: the text-native agent drives it
    ours = {DENSE_AGENT, "expert", *(f"llm-{m}-{s:g}" for m in methods for s in sparsities)}
    yours = check_variants(variants or {}, dense_dir, ours)
    if yours:
        say(f"your variants: {', '.join(f'{name} ({model.directory})' for name, model in yours.items())}")
    if methods:
        say(f"pruning: {len(methods)} methods x {len(sparsities)} sparsities = {len(methods) * len(sparsities)} "
            f"variants (cached under {dense_dir / 'pruned'})")
    models = {**pruned_models(dense_dir, methods, sparsities, progress, say, device), **yours}
    checkpoints = checkpoint_records(models)
    specs = ([AgentSpec("expert")] if with_expert else []) + [
        AgentSpec("text-llm" if text_format else "llm", str(model.directory), label=name)
        for name, model in models.items()]
    # Per agent: its model, method and target sparsity (of the LM), which `prunedrive report` plots.
    config = {"model": str(dense_dir), "methods": list(methods), "sparsities": list(sparsities),
              "models": {name: str(model.directory) for name, model in models.items()},
              "method": {name: model.method for name, model in models.items()},
              "sparsity": {name: model.sparsity if np.isfinite(model.sparsity) else None  # unknown: a user's
                           for name, model in models.items()}}  # variant that does not say
    n_episodes = len(specs) * len(suite.episodes())
    say(f"driving {n_episodes} episodes: {len(specs)} agents x {len(suite.episodes())} scenario-seeds of suite "
        f"{suite.name}" + (f" on {workers} Ray workers" if workers else "") + f" ({driving_estimate(specs, suite)})")
    loads = [os.getloadavg()[0]]
    run_dir, episodes = drive(suite, specs, out, run_id=run_id,
                              default_run_id=f"bench-{suite.name}-{preset if model is None else dense_dir.name}"
                              + run_id_suffix(latency),
                              workers=workers, progress=progress, config=config, batch=batch, latency=latency,
                              device=device, dtype=dtype)
    loads.append(os.getloadavg()[0])

    data_dir = training_data_dir(dense_dir)
    if (data_dir / "val.parquet").is_file():
        say(f"open loop: {len(models)} models on {OPEN_LOOP_SAMPLES} held-out expert samples each "
            f"({estimate(IDLE_OPEN_LOOP_SECONDS * len(models))})")
        split = load_split(data_dir, "val")
        load = (functools.partial(TextModel, device=device, dtype=dtype) if text_format else
                lambda path: DrivingLLM.from_pretrained(path).to(device=device, dtype=torch_dtype(dtype)))
        open_loop = {name: evaluate_open_loop(load(model.directory), split, OPEN_LOOP_SAMPLES)
                     for name, model in models.items()}
    else:
        say(f"open loop: skipped, no held-out expert data at {data_dir} (`prunedrive eval-open --model DIR "
            "--data DATA` evaluates a model on a split you give)")
        open_loop = {}
    attach_open_loop(run_dir, open_loop)
    attach_checkpoints(run_dir, checkpoints)
    table = with_checkpoints(comparison_table(episodes, models, open_loop), checkpoints)
    table.to_csv(run_dir.path / "bench.csv", index=False)
    print_comparison(table, load_note(loads))
    print_latency(episodes, latency, budget_ms, run_dir, table)
    if mlflow is not None:  # `--mlflow [URI]`: "" is the default store beside the run
        from prunedrive.app.mlflow_log import log_run

        log_run(run_dir, mlflow, extra_metrics={name: {f"open_loop.{k}": v for k, v in metrics.items()}
                                                 for name, metrics in open_loop.items()})
    where = run_dir.path.resolve()
    say(f"results: {where} (episodes.parquet, steps.parquet, bench.csv, attachments/)")
    pruned = [name for name in models if name != DENSE_AGENT]
    print(f"next: prunedrive report {where}" + (
        f"\n      prunedrive regress {where} {where} --baseline-agent {DENSE_AGENT} --candidate-agent {pruned[-1]}"
        if pruned else ""), flush=True)
    return exit_code(episodes, run_dir)
