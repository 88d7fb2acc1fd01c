"""Aggregate episodes into the Leaderboard's global record plus Bench2Drive extras, and print tables."""
from __future__ import annotations

import numpy as np
import pandas as pd

from prunedrive.harness.events import EventKind
from prunedrive.harness.scoring import mean_std

INFRACTIONS = [k.value for k in EventKind if k not in (EventKind.MIN_SPEED, EventKind.OUTSIDE_ROUTE_LANES)]


def summarize(episodes: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """One row per group: mean/std of the three scores, infractions per km, success, efficiency,
    comfort, failures and per-step agent time."""
    rows = []
    for key, group in episodes.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["episodes"] = len(group)
        for score in ("driving_score", "route_completion", "infraction_penalty"):
            row[f"{score}_mean"], row[f"{score}_std"] = mean_std(group[score].astype(float).tolist())
        km = max(float(group["km_driven"].sum()), 0.001)  # the Leaderboard's floor
        for kind in INFRACTIONS:
            row[f"{kind}_per_km"] = float(group[f"n_{kind}"].sum()) / km
        row["collisions_per_km"] = float(group["collisions"].sum()) / km
        row["outside_lanes_km"] = float(group["outside_lanes_m"].sum()) / 1000.0
        row["success_rate"] = 100.0 * float(group["success"].mean())
        row["efficiency"] = float(np.nanmean(group["efficiency"])) if group["efficiency"].notna().any() else np.nan
        row["comfort"] = float(np.nanmean(group["comfort"])) if group["comfort"].notna().any() else np.nan
        row["failed"] = int((group["status"] == "failed").sum())
        for name, reduce in (("agent_wall_s_p50", np.median), ("agent_wall_s_p95", np.max), ("sim_wall_s_p50", np.median)):
            values = group[name].dropna()
            row[name.replace("_s_", "_ms_")] = 1000 * float(reduce(values)) if len(values) else np.nan
        for name in ("effective_flops_mean", "nonzero_params"):
            if name in group:
                row[name] = float(group[name].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def print_tables(episodes: pd.DataFrame, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: don't squeeze the tables to 80 columns
            console = Console(width=160)
    per_scenario = Table(title="Per scenario (mean over seeds)")
    for column in ("agent", "scenario", "eps", "DS", "RC", "IP", "collisions", "status", "agent ms p50"):
        per_scenario.add_column(column, justify="left" if column in ("agent", "scenario", "status") else "right")
    for (agent, scenario), group in episodes.groupby(["agent", "scenario"], sort=False):
        statuses = ", ".join(f"{s} {n}" for s, n in group["status"].value_counts().items())
        per_scenario.add_row(agent, scenario, str(len(group)), f"{group.driving_score.mean():.1f}",
                             f"{group.route_completion.mean():.1f}", f"{group.infraction_penalty.mean():.3f}",
                             str(int(group.collisions.sum())), statuses,
                             f"{1000 * np.nanmedian(group.agent_wall_s_p50):.2f}")
    console.print(per_scenario)

    overall = Table(title="Overall (Leaderboard 2.0 global record + Bench2Drive extras)")
    for column in ("agent", "eps", "DS", "RC", "IP", "coll/km", "success %", "efficiency", "comfort", "failed",
                   "agent ms p50", "agent ms p95"):
        overall.add_column(column, justify="left" if column == "agent" else "right")
    for _, r in summarize(episodes, ["agent"]).iterrows():
        overall.add_row(r.agent, str(r.episodes), _pm(r.driving_score_mean, r.driving_score_std),
                        _pm(r.route_completion_mean, r.route_completion_std),
                        _pm(r.infraction_penalty_mean, r.infraction_penalty_std, 3), f"{r.collisions_per_km:.2f}",
                        f"{r.success_rate:.0f}", f"{r.efficiency:.0f}", f"{r.comfort:.0f}", str(r.failed),
                        f"{r.agent_wall_ms_p50:.2f}", f"{r.agent_wall_ms_p95:.2f}")
    console.print(overall)
    for _, row in episodes[episodes.status == "failed"].iterrows():
        last_line = row.error.strip().splitlines()[-1] if row.error.strip() else "unknown error"
        console.print(f"[red]failed[/red] {row.agent} {row.scenario} seed={row.seed}: {last_line}")


def _pm(mean: float, std: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" if not np.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
