"""Aggregate episodes into the Leaderboard's global record plus Bench2Drive extras, and print tables.
What is aggregated, how, and which table shows it is declared in `harness.metrics`."""
from __future__ import annotations

import pandas as pd

from prunedrive.harness.metrics import LATENCY, OVERALL, PER_SCENARIO, Metric, in_view, summary_row


def summarize(episodes: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """One row per group: the `by` columns, then every metric of `harness.metrics.METRICS` (scores
    mean/std, infractions per km, success, efficiency, comfort, failures, per-step agent time, compute)."""
    rows = []
    for key, group in episodes.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), **summary_row(group)})
    return pd.DataFrame(rows)


def print_tables(episodes: pd.DataFrame, console=None, latency_label: str | None = None) -> None:
    """The per-scenario and overall tables; for a run under a latency model (`latency_label`: how the manifest
    names it, e.g. "measured (not reproducible)") also the latency table."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: don't squeeze the tables to 80 columns
            console = Console(width=160)
    per_scenario = Table(title="Per scenario (mean over seeds)")
    # How it drove, how the episodes ended, what it cost.
    driving = [m for m in in_view(PER_SCENARIO) if not m.cost]
    cost = [m for m in in_view(PER_SCENARIO) if m.cost]
    for column in ("agent", "scenario", *(m.short for m in driving), "status", *(m.short for m in cost)):
        per_scenario.add_column(column, justify="left" if column in ("agent", "scenario", "status") else "right")
    for (agent, scenario), group in episodes.groupby(["agent", "scenario"], sort=False):
        statuses = ", ".join(f"{s} {n}" for s, n in group["status"].value_counts().items())
        row = summary_row(group)
        # Means only: a std over a handful of seeds says little and would double the table's width.
        per_scenario.add_row(agent, scenario, *(m.text(m.value(row)) for m in driving), statuses,
                             *(m.text(m.value(row)) for m in cost))
    console.print(per_scenario)

    overall = Table(title="Overall (Leaderboard 2.0 global record + Bench2Drive extras)")
    metrics = in_view(OVERALL)
    for column in ("agent", *(m.short for m in metrics)):
        overall.add_column(column, justify="left" if column == "agent" else "right")
    for _, row in summarize(episodes, ["agent"]).iterrows():
        overall.add_row(row.agent, *(_cell(m, row) for m in metrics))
    console.print(overall)
    if "decisions" in episodes:  # driven under a latency model (harness.latency)
        latency = Table(title=f"Latency in the loop (simulated time; {latency_label or 'latency model'})")
        for column in ("agent", *(m.short for m in in_view(LATENCY))):
            latency.add_column(column, justify="left" if column == "agent" else "right")
        for _, row in summarize(episodes, ["agent"]).iterrows():
            latency.add_row(row.agent, *(_cell(m, row) for m in in_view(LATENCY)))
        console.print(latency)
    for _, row in episodes[episodes.status == "failed"].iterrows():
        last_line = row.error.strip().splitlines()[-1] if row.error.strip() else "unknown error"
        console.print(f"[red]failed[/red] {row.agent} {row.scenario} seed={row.seed}: {last_line}")


def _cell(m: Metric, row) -> str:
    return m.text(m.value(row), m.spread(row))
