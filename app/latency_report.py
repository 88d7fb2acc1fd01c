"""Report sections of latency in the loop (report.section's contract: `render(payload, context) -> Section`).

- `sweep_section`: a latency sweep's table (app.latency_sweep, attachment `latency_sweep`) and DS against the
  fixed latency per agent with 95% CI error bars: how much delay each agent's driving tolerates.
- `realtime_section`: a bench under `--latency` (attachment built by `realtime_payload`): DS under real time
  against the measured step time per model, the Pareto front of driving vs speed, and which models meet
  `--budget` per decision.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from prunedrive.report.plots import new_figure, png_bytes
from prunedrive.report.section import Plot, Section, Table, section_renderer
from prunedrive.app.cells import mean_se, number

Z95 = 1.959964  # the normal 95% quantile: the error bars of a mean are ± Z95 x its standard error
REALTIME_COLUMNS = ("agent", "driving_score", "ds_se", "ds_diff", "ds_ci_low", "ds_ci_high", "verdict", "step_ms",
                    "latency_ms_p95", "meets_budget", "budget_ms", "latency")


def _diff_cells(row) -> dict[str, str]:
    """ΔDS, its CI and verdict as text ("–" where the row has none: the reference itself)."""
    verdict = row["verdict"] if isinstance(row["verdict"], str) and row["verdict"] else "–"
    if not np.isfinite(float(row["ds_diff"])):
        return {"ds_diff": "–", "ds_ci": "–", "verdict": verdict}
    return {"ds_diff": f"{row['ds_diff']:+.1f}", "ds_ci": f"[{row['ds_ci_low']:+.1f}, {row['ds_ci_high']:+.1f}]",
            "verdict": verdict}


def _ds_cell(row) -> str:
    return mean_se(row["driving_score"], row["ds_se"])


# -- the latency sweep -----------------------------------------------------------------------------------
SWEEP_COLUMNS = [("agent", "agent"), ("latency_ms", "latency ms"), ("n", "n"), ("ds", "DS ± SE"),
                 ("ds_diff", "ΔDS vs reference"), ("ds_ci", "95% CI"), ("verdict", "verdict"),
                 ("decisions", "decisions/episode"), ("miss", "deadline miss %"), ("stale", "stale %")]


@section_renderer
def sweep_section(table: pd.DataFrame, context=None) -> Section:
    """The sweep table (one row per agent and latency) and the plot of DS against latency per agent."""
    reference = float(table["reference_ms"].iloc[0]) if len(table) else 0.0
    rows = [{"agent": row["agent"], "latency_ms": f"{row['latency_ms']:g}", "n": f"{int(row['n'])}",
             "ds": _ds_cell(row), **_diff_cells(row), "decisions": number(row["decisions"], "{:.1f}"),
             "miss": number(100 * row["deadline_miss_share"], "{:.0f}"),
             "stale": number(100 * row["stale_share"], "{:.0f}")}
            for _, row in table.iterrows()]
    caption = (f"Each agent drove the same scenarios and seeds at every fixed latency (--latency fixed:MS); ΔDS is "
               f"paired with the same agent at {reference:g} ms by scenario and seed, with its 95% bootstrap CI. "
               "stale %: simulated time driven on a control chosen more than one policy period earlier.")
    return Section("Latency sweep: driving score against a fixed decision latency",
                   tables=[Table(list(SWEEP_COLUMNS), rows, caption, id="latency-sweep")],
                   plots=[plot_sweep(table)],
                   notes=["Fixed latencies are declared settings, not measurements: the same sweep gives the same "
                          "episodes on any machine."])


def plot_sweep(table: pd.DataFrame) -> Plot:
    """DS mean against the latency, one line per agent, error bars ± Z95 x SE (the mean's 95% CI)."""
    figure = new_figure()
    axes = figure.add_subplot(1, 1, 1)
    for agent, group in table.groupby("agent", sort=False):
        group = group.sort_values("latency_ms")
        axes.errorbar(group["latency_ms"], group["driving_score"], yerr=Z95 * group["ds_se"].fillna(0.0),
                      marker="o", capsize=3, label=str(agent))
    axes.set_xlabel("decision latency (ms, fixed)")
    axes.set_ylabel("driving score (mean, 95% CI)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return Plot("ds_vs_latency", "Driving score against decision latency, per agent", png_bytes(figure),
                "Error bars: the mean's 95% CI (± 1.96 SE over episodes); the table gives the paired CI of each "
                "difference to the reference latency.")


# -- a bench under --latency: driving vs speed -----------------------------------------------------------
def realtime_payload(bench_table: pd.DataFrame, budget: pd.DataFrame | None, budget_ms: float | None,
                     label: str) -> pd.DataFrame:
    """The attachment `realtime_section` renders, from a bench under a latency model: its comparison table
    (app.bench.comparison_table: DS, ΔDS to dense, step_ms_p50, nonzero_params) and harness.latency.budget_table
    (latency p95, meets_budget). Agents without a model (the expert) are left out: their step is not a model's.
    `label`: how the latency model is named (harness.latency.LatencyModel.label: declared profiles say so)."""
    models = bench_table[np.isfinite(pd.to_numeric(bench_table.get("nonzero_params"), errors="coerce"))]
    payload = models[["agent", "driving_score", "ds_se", "ds_diff", "ds_ci_low", "ds_ci_high", "verdict"]].copy()
    payload["step_ms"] = models["step_ms_p50"].astype(float).to_numpy()
    per_agent = budget.set_index("agent") if budget is not None else pd.DataFrame()
    payload["latency_ms_p95"] = [float(per_agent["latency_ms_p95"].get(a, np.nan)) if len(per_agent) else np.nan
                                 for a in payload["agent"]]
    payload["meets_budget"] = [_meets(per_agent, a) if budget_ms is not None else None for a in payload["agent"]]
    payload["budget_ms"] = np.nan if budget_ms is None else float(budget_ms)
    payload["latency"] = label
    return payload[list(REALTIME_COLUMNS)].reset_index(drop=True)


def _meets(per_agent: pd.DataFrame, agent: str):
    value = per_agent["meets_budget"].get(agent) if "meets_budget" in per_agent else None
    return None if value is None else bool(value)


def pareto_front(driving_score, step_ms) -> np.ndarray:
    """Whether each point is on the front of driving vs speed: no other point drives at least as well and runs at
    least as fast, strictly better in one. Points with a NaN are never on it."""
    ds, ms = np.asarray(driving_score, np.float64), np.asarray(step_ms, np.float64)
    ok = np.isfinite(ds) & np.isfinite(ms)
    front = np.zeros(len(ds), bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (ds >= ds[i]) & (ms <= ms[i]) & ((ds > ds[i]) | (ms < ms[i]))
        front[i] = not dominated.any()
    return front


REALTIME_COLUMNS_SHOWN = [("agent", "agent"), ("ds", "DS under real time ± SE"), ("ds_diff", "ΔDS vs dense"),
                          ("ds_ci", "95% CI"), ("verdict", "verdict"), ("step_ms", "ms/step (measured)"),
                          ("latency_ms_p95", "decision ms p95"), ("front", "Pareto front"), ("budget", "budget")]


@section_renderer
def realtime_section(payload: pd.DataFrame, context=None) -> Section:
    """DS under real time against measured step time per model: the table, the Pareto front, the budget."""
    front = pareto_front(payload["driving_score"], payload["step_ms"])
    budget_ms = float(payload["budget_ms"].iloc[0]) if len(payload) else np.nan
    label = str(payload["latency"].iloc[0]) if len(payload) else ""
    rows = []
    for on_front, (_, row) in zip(front, payload.iterrows()):
        budget = "–" if row["meets_budget"] is None or pd.isna(row["meets_budget"]) else \
            ("meets" if row["meets_budget"] else "misses")
        rows.append({"agent": row["agent"], "ds": _ds_cell(row), **_diff_cells(row),
                     "step_ms": number(row["step_ms"], "{:.1f}"),
                     "latency_ms_p95": number(row["latency_ms_p95"], "{:.0f}"),
                     "front": "yes" if on_front else "", "budget": budget})
    budget_text = (f"budget: a decision's p95 latency (worst episode) <= {budget_ms:g} ms" if np.isfinite(budget_ms)
                   else "no --budget given")
    caption = (f"Driven under --latency {label}: a slower model decides later and less often. ΔDS: paired with dense "
               f"by scenario and seed (95% bootstrap CI). Pareto front: no other model drives at least as well at "
               f"least as fast. {budget_text}.")
    return Section("Driving under real time against speed (latency in the loop)",
                   tables=[Table(list(REALTIME_COLUMNS_SHOWN), rows, caption, id="latency-realtime")],
                   plots=[plot_realtime(payload, front, budget_ms)],
                   notes=[f"latency model: {label}"] if label else [])


def plot_realtime(payload: pd.DataFrame, front: np.ndarray, budget_ms: float) -> Plot:
    """DS under real time (± 95% CI of the mean) against measured ms per step; the front joined by a line;
    models that meet the budget filled, the others hollow."""
    figure = new_figure()
    axes = figure.add_subplot(1, 1, 1)
    for on_front, (_, row) in zip(front, payload.iterrows()):
        meets = row["meets_budget"]
        hollow = meets is not None and not pd.isna(meets) and not meets
        axes.errorbar([row["step_ms"]], [row["driving_score"]], yerr=[Z95 * np.nan_to_num(row["ds_se"])],
                      marker="o", capsize=3, markerfacecolor="white" if hollow else None, label=str(row["agent"]))
    on = payload[front].sort_values("step_ms")
    if len(on) > 1:
        axes.plot(on["step_ms"], on["driving_score"], color="black", linewidth=1, linestyle="--",
                  label="Pareto front")
    axes.set_xlabel("measured step time (ms, p50)")
    axes.set_ylabel("driving score under real time")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    budget = f"; hollow: misses the {budget_ms:g} ms budget" if np.isfinite(budget_ms) else ""
    return Plot("ds_vs_step_time_realtime", "Driving under real time against measured step time", png_bytes(figure),
                f"Error bars: the mean's 95% CI (± 1.96 SE); dashed: the Pareto front{budget}.")
