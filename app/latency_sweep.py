"""`prunedrive latency-sweep`: how much delay an agent's driving tolerates (a sensitivity sweep).

Each chosen agent drives one suite at each fixed latency (`--latency fixed:MS`, harness.latency), on the same
scenarios and seeds at every latency, so each latency's episodes pair with the reference latency's (the
smallest asked, normally 0 ms) by scenario and seed. Per agent and latency the table gives n, DS mean ± SE, the
paired ΔDS to the same agent at the reference latency with its 95% bootstrap CI and a verdict
(harness.paired.compare_to_baseline), decisions per episode, the deadline-miss share and the stale share.

On disk a sweep is one directory, out/<sweep id>/: its manifest (a RunDir manifest with no episodes of its own:
the suite, the agents and the latencies, checked on a rerun) and one ordinary run directory per latency under
latency/fixed-<MS>/, driven by app.run.drive (the one episode loop), each with its latency in its identity. A
rerun of the same command resumes: finished episodes are kept, the missing ones driven. The sweep table is the
attachment `latency_sweep` of the reference latency's run (its report section: app.latency_report.sweep_section),
so `prunedrive report` over the latency runs (`report_command`) shows it beside each latency's own tables.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.agents.registry import AgentSpec
from prunedrive.app.run import EXIT_OK, drive, exit_code, suite_identity
from prunedrive.harness.paired import MIN_PAIRS_FOR_VERDICT
from prunedrive.harness.results import RunDir, content_hash
from prunedrive.scenarios.loader import Suite
from prunedrive.app.cells import mean_se, number, paired_diff

DEFAULT_LATENCIES_MS = (0.0, 100.0, 200.0, 400.0, 800.0)
ATTACHMENT = "latency_sweep"
SECTION = "prunedrive.app.latency_report:sweep_section"
PRODUCER = "prunedrive.app.latency_sweep"
TABLE_WIDTH = 100  # what the terminal table and its legend fit
# The sweep table's columns (the attachment keeps them all; the terminal shows the ones that fit 100 columns).
COLUMNS = ("agent", "latency_ms", "n", "driving_score", "ds_se", "ds_diff", "ds_ci_low", "ds_ci_high", "verdict",
           "decisions", "deadline_miss_share", "stale_share", "reference_ms")


def check_latencies(values) -> list[float]:
    """--latencies: one or more distinct finite milliseconds >= 0, returned ascending (the first is the
    reference every other latency is paired with)."""
    latencies = [float(v) for v in values or ()]
    if not latencies:
        raise ValueError("--latencies needs at least one value in milliseconds, e.g. 0 100 200 400 800")
    bad = [v for v in latencies if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"--latencies: {bad[0]:g} is not a latency; allowed: finite milliseconds >= 0")
    if len({f"{v:g}" for v in latencies}) != len(latencies):  # as the runs name them (fixed-<MS>)
        raise ValueError(f"--latencies repeats a value: {' '.join(f'{v:g}' for v in latencies)}")
    return sorted(latencies)


def latency_run_id(ms: float) -> str:
    """The run directory (under the sweep's latency/) of one latency: fixed-<MS>."""
    return f"fixed-{ms:g}"


def default_sweep_id(suite: Suite, specs: list[AgentSpec], latencies: list[float]) -> str:
    """A fixed id per suite, agents and latencies, so running the same command again resumes the same sweep."""
    key = content_hash({"suite": suite_identity(suite), "specs": [asdict(s) for s in specs], "latencies": latencies})
    return f"latency-sweep-{suite.name}-{key[:10]}"


def sweep_identity(suite: Suite, specs: list[AgentSpec], latencies: list[float]) -> dict:
    """What a rerun of a sweep must match (each latency's run checks its own agents' weights besides)."""
    return {**suite_identity(suite), "latencies_ms": latencies,
            "specs": [{"agent": s.name, "model": s.model, "label": s.label, "args": dict(s.args)} for s in specs]}


def open_sweep(sweep: RunDir, identity: dict, config: dict) -> None:
    """The sweep's manifest: written on the first run, checked against `identity` on a rerun (RunError naming
    what differs)."""
    if sweep.manifest_path.is_file():
        sweep.check_identity(identity)
    else:
        sweep.create(config, [], identity)


def attach_table(reference: RunDir, table: pd.DataFrame) -> None:
    """The sweep table goes to the reference latency's run: `prunedrive report` reads runs with episodes
    (report_command), and that run shows the section beside its own tables. Under the run's lock, as every write."""
    reference.lock()
    try:
        reference.attach(ATTACHMENT, table, producer=PRODUCER, section=SECTION)
    finally:
        reference.unlock()


def run_latency_sweep(suite: Suite, specs: list[AgentSpec], latencies, out: str | Path, *,
                      run_id: str | None = None, workers: int | None = None, batch: int = 1, progress: bool = True,
                      device: str | None = None, dtype: str | None = None,
                      say=print) -> tuple[RunDir, pd.DataFrame, int]:
    """Drive `specs` on `suite` at every latency of `latencies` (ms) into one sweep directory; returns it, the
    sweep table (`sweep_table`, also attached to the reference latency's run) and the exit code
    (app.run.exit_code's, the worst over the latencies: 3 when an episode of any latency has no row or failed for
    infrastructure reasons)."""
    latencies = check_latencies(latencies)
    sweep = RunDir.under(out, run_id or default_sweep_id(suite, specs, latencies))
    sweep.lock()  # one writer per sweep, before its manifest is read or written
    try:
        open_sweep(sweep, sweep_identity(suite, specs, latencies),
                   {"command": "latency-sweep", "suite": suite.name, "suite_path": str(suite.path),
                    "specs": [asdict(s) for s in specs], "latencies_ms": latencies,
                    "runs": {f"{ms:g}": f"latency/{latency_run_id(ms)}" for ms in latencies}})
        by_latency, runs, code, agents = {}, {}, EXIT_OK, []
        for i, ms in enumerate(latencies, 1):
            say(f"latency {i}/{len(latencies)}: fixed:{ms:g} ms, {len(specs)} agent(s) x "
                f"{len(suite.episodes())} scenario-seeds of suite {suite.name}")
            run_dir, episodes = drive(suite, specs, sweep.path / "latency", default_run_id=latency_run_id(ms),
                                      latency=f"fixed:{ms:g}", workers=workers, batch=batch, progress=progress,
                                      device=device, dtype=dtype, config={"latency_sweep": sweep.path.name})
            by_latency[ms], runs[ms], agents = episodes, run_dir, run_dir.manifest()["config"]["agents"]
            code = max(code, exit_code(episodes, run_dir))
        table = sweep_table(by_latency, agents)
        attach_table(runs[latencies[0]], table)
    finally:
        sweep.unlock()
    return sweep, table, code


def report_command(sweep: RunDir) -> str:
    """The `prunedrive report` command over a sweep's latency runs (the reference, with the sweep section, first)."""
    runs = sweep.manifest()["config"]["runs"]
    return "prunedrive report " + " ".join(str((sweep.path / run).resolve()) for run in runs.values())


def sweep_table(by_latency: dict[float, pd.DataFrame], agents: list[str]) -> pd.DataFrame:
    """One row per agent and latency (agents in the order given, latencies ascending): n, DS mean and its
    standard error, the paired DS difference to the same agent at the reference latency (the smallest) with its
    95% bootstrap CI and verdict, decisions per episode, deadline-miss share and stale share."""
    from prunedrive.harness.paired import compare_to_baseline
    from prunedrive.harness.summary import summarize

    latencies = sorted(by_latency)
    reference = latencies[0]
    episodes = pd.concat([frame.assign(latency_ms=ms) for ms, frame in by_latency.items() if len(frame)],
                         ignore_index=True)
    rows = []
    for agent in agents:
        group = episodes[episodes["agent"] == agent]
        if group.empty:
            continue
        summary = summarize(group, ["latency_ms"]).set_index("latency_ms")
        # compare_to_baseline pairs "agents" by (scenario, seed): here each latency plays an agent.
        by_ms = group.assign(agent=group["latency_ms"].map(lambda ms: f"{ms:g}"))
        paired = compare_to_baseline(by_ms, f"{reference:g}").set_index("agent")
        for ms in latencies:
            if ms not in summary.index:
                continue
            row, versus = summary.loc[ms], (paired.loc[f"{ms:g}"] if f"{ms:g}" in paired.index else {})
            n = int(row["episodes"])
            rows.append({"agent": agent, "latency_ms": ms, "n": n, "driving_score": float(row["driving_score_mean"]),
                         "ds_se": float(row["driving_score_std"]) / np.sqrt(n) if n > 1 else np.nan,
                         "ds_diff": versus.get("diff", np.nan), "ds_ci_low": versus.get("ci_low", np.nan),
                         "ds_ci_high": versus.get("ci_high", np.nan), "verdict": versus.get("verdict", ""),
                         "decisions": float(row.get("decisions", np.nan)),
                         "deadline_miss_share": float(row.get("deadline_miss_share", np.nan)),
                         "stale_share": float(row.get("stale_share", np.nan)), "reference_ms": reference})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def format_sweep(table: pd.DataFrame) -> list[str]:
    """The sweep table as lines that fit 100 columns, then a legend."""
    reference = float(table["reference_ms"].iloc[0]) if len(table) else 0.0
    lines = [f"{'agent':<18} {'ms':>5} {'n':>3} {'DS ± SE':>11} {'ΔDS [95% CI]':>21} {'verdict':<12} "
             f"{'decis.':>6} {'miss %':>6} {'stale %':>7}"]
    for r in table.itertuples():
        ds, diff = mean_se(r.driving_score, r.ds_se), paired_diff(r.ds_diff, r.ds_ci_low, r.ds_ci_high)
        lines.append(f"{r.agent[:18]:<18} {r.latency_ms:>5g} {r.n:>3d} {ds:>11} {diff:>21} {(r.verdict or '–'):<12} "
                     f"{number(r.decisions, '{:.1f}'):>6} {number(100 * r.deadline_miss_share, '{:.0f}'):>6} "
                     f"{number(100 * r.stale_share, '{:.0f}'):>7}")
    legend = (f"ΔDS: paired with the same agent at {reference:g} ms by scenario and seed (95% bootstrap CI); "
              "decis.: decisions per episode; miss %: decisions slower than the policy period; stale %: "
              "simulated time driven on a control chosen more than one policy period earlier.")
    if len(table) and table["n"].min() < MIN_PAIRS_FOR_VERDICT:
        legend = (f"n = {table['n'].min()} episodes per agent and latency is too few to conclude (verdicts need >= "
                  f"{MIN_PAIRS_FOR_VERDICT} pairs): run a larger suite, e.g. --suite standard. " + legend)
    return lines + textwrap.wrap(legend, TABLE_WIDTH)


def agent_specs(names: list[str], model: str | None, agent_args: tuple) -> list[AgentSpec]:
    """The sweep's agents: `model` goes to those whose factory takes one (llm, text-llm, plug-ins that do), so
    `--agent expert llm --model DIR` sweeps the expert beside the model; every agent gets `agent_args`."""
    import inspect

    from prunedrive.agents.registry import resolve_factory

    def takes_model(name: str) -> bool:
        try:
            return "model" in inspect.signature(resolve_factory(name)).parameters
        except (TypeError, ValueError):
            return False

    return [AgentSpec(name, model if model is not None and takes_model(name) else None, None, agent_args)
            for name in names]
