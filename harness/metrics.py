"""Every metric of a run, declared once: what it is called where, how episodes reduce to it, how it reads.

The summary table (`harness.summary.summarize`), its terminal tables, the report's comparison table,
the bench table, the regression gate's checks and the MLflow metrics are all read from `METRICS`, so a
metric added here shows up in each of them (as far as its `views` and `gate` say) under one name.

Names:
  column   the summary table's column (and the MLflow metric); a mean/std metric also has `std_column`
  key      its id in the report's and the bench's tables (what the number shown is: `agent_ms_p50`)
  label    the long header (report) and the regression check's name
  short    the header in terminal tables

Plug-in metrics: a package declares `Metric` objects under the entry point group `prunedrive.metrics`
(`[project.entry-points."prunedrive.metrics"] seconds = "my_pkg.metrics:SIM_SECONDS"`); `all_metrics()` is the
built-ins, in their order, then the plug-ins (by name), and every table below reads it.

How a metric aggregates over episodes is its `Aggregate`; `aggregate_metric` is the one place that
computes it. Per-km rates are sums over sums (total count / total km, with the Leaderboard's 0.001 km
floor), never means of per-episode rates: a 50 m episode with one collision must not weigh like a
2 km one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prunedrive.harness.events import EventKind
from prunedrive.harness.scoring import mean_std
from prunedrive.plugins.registry import Registry, RegistryError

KM_FLOOR = 0.001  # the Leaderboard's floor on km driven when it divides infractions by distance
# The kinds counted per km: min speed and outside-route-lanes scale the penalty by a percentage instead.
INFRACTIONS = [k.value for k in EventKind if k not in (EventKind.MIN_SPEED, EventKind.OUTSIDE_ROUTE_LANES)]

# What the terminal and report tables show; a metric in none of them is still summarized and logged.
OVERALL, PER_SCENARIO, REPORT, BENCH = "overall", "per_scenario", "report", "bench"
LATENCY = "latency"  # the latency table: runs under a latency model only (harness.latency; its columns absent else)
# Regression gate: "gate" checks and gates; "opt-in" is reported and gates only when given a margin
# (wall time depends on the machine and its load).
GATE, OPT_IN = "gate", "opt-in"


@dataclass(frozen=True)
class Aggregate:
    """How a group of episode rows reduces to the metric.

    how:
      count          number of episodes
      mean_std       mean and sample std of `sources[0]` (the Leaderboard's global record)
      per_km         sum of `sources` / max(sum of km_driven, KM_FLOOR)
      total          sum of `sources[0]`
      percent        100 x mean of a boolean column
      nanmean        mean over the episodes that have a value; NaN when none has
      failed         episodes whose status is "failed"
      median, max    of a per-episode statistic (e.g. each episode's p50), over the episodes that have
                     one; NaN when none has
      mean           mean of a column that only some agents fill (model compute): left out of the summary
                     when the episodes have no such column
      ratio          sum of `sources[0]` / sum of `sources[1]` over the episodes that have both (a total over
                     a total, as per_km); NaN when none has or the denominator sums to 0
    """

    how: str
    sources: tuple[str, ...] = ()
    scale: float = 1.0   # unit conversion: the result is scale x value / per (s -> ms: scale 1000; m -> km: per 1000)
    per: float = 1.0

    def convert(self, value: float) -> float:
        return self.scale * value / self.per

    @property
    def skips_missing(self) -> bool:
        """True when episodes without a value are left out by design (rather than being bad input)."""
        return self.how in ("nanmean", "median", "max", "mean", "ratio")


@dataclass(frozen=True)
class Metric:
    column: str                       # summary column; a mean/std metric's mean
    key: str                          # id in the report and bench tables
    label: str                        # long header; the regression check's name
    short: str                        # terminal-table header
    unit: str
    aggregate: Aggregate
    fmt: str = "{:.2f}"               # a format string, or "params" (1.23M)
    digits: int | None = None         # mean/std metrics: decimals of "mean ± std"
    higher_is_better: bool | None = None  # None: neither (a count, a size)
    gate: str | None = None           # None, GATE or OPT_IN (see above)
    views: frozenset[str] = field(default_factory=frozenset)
    cost: bool = False                # what the agent spent, not how it drove
    display_per: float = 1.0          # report and bench show column / display_per (FLOPs -> GFLOPs: 1e9)

    @property
    def std_column(self) -> str | None:
        return self.column.removesuffix("_mean") + "_std" if self.aggregate.how == "mean_std" else None

    @property
    def summary_columns(self) -> tuple[str, ...]:
        return (self.column,) if self.std_column is None else (self.column, self.std_column)

    def value(self, summary_row) -> float:
        """The number the report and bench show, from a summary row (a dict or Series); NaN when absent."""
        value = summary_row.get(self.column, np.nan)
        return np.nan if value is None else float(value) / self.display_per

    def spread(self, summary_row) -> float:
        return float(summary_row.get(self.std_column, np.nan)) if self.std_column else np.nan

    def text(self, value: float, spread: float = np.nan) -> str:
        """The number as the tables print it; a finite spread is appended as "± std"."""
        if self.digits is not None:
            out = f"{value:.{self.digits}f}"
            return out + (f" ± {spread:.{self.digits}f}" if np.isfinite(spread) else "")
        if self.fmt == "params":
            return human_count(value)
        return self.fmt.format(value)


def human_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _score(name: str, label: str, short: str, unit: str, digits: int, views, gate=None) -> Metric:
    return Metric(f"{name}_mean", name, label, short, unit, Aggregate("mean_std", (name,)), digits=digits,
                  higher_is_better=True, gate=gate, views=frozenset(views))


def _infraction_rate(kind: str) -> Metric:
    return Metric(f"{kind}_per_km", f"{kind}_per_km", f"{kind.replace('_', ' ')}/km", f"{kind}/km", "1/km",
                  Aggregate("per_km", (f"n_{kind}",)), higher_is_better=False)


METRICS: tuple[Metric, ...] = (
    Metric("episodes", "episodes", "episodes", "eps", "episodes", Aggregate("count"), fmt="{:.0f}",
           views=frozenset({OVERALL, PER_SCENARIO, REPORT})),
    _score("driving_score", "driving score", "DS", "%", 1, {OVERALL, PER_SCENARIO, REPORT, BENCH}, gate=GATE),
    _score("route_completion", "route completion", "RC", "%", 1, {OVERALL, PER_SCENARIO, REPORT, BENCH}),
    _score("infraction_penalty", "infraction penalty", "IP", "factor", 3, {OVERALL, PER_SCENARIO, REPORT}),
    *(_infraction_rate(kind) for kind in INFRACTIONS),
    Metric("infractions_per_km", "infractions_per_km", "infractions/km", "infr/km", "1/km",
           Aggregate("per_km", tuple(f"n_{kind}" for kind in INFRACTIONS)), higher_is_better=False,
           views=frozenset({REPORT})),
    Metric("collisions_per_km", "collisions_per_km", "collisions/km", "coll/km", "1/km",
           Aggregate("per_km", ("collisions",)), higher_is_better=False, gate=GATE,
           views=frozenset({OVERALL, REPORT, BENCH})),
    Metric("collisions", "collisions", "collisions", "collisions", "collisions", Aggregate("total", ("collisions",)),
           fmt="{:.0f}", higher_is_better=False, views=frozenset({PER_SCENARIO})),
    Metric("outside_lanes_km", "outside_lanes_km", "km outside the route lanes", "outside km", "km",
           Aggregate("total", ("outside_lanes_m",), per=1000), higher_is_better=False),
    Metric("success_rate", "success_rate", "success %", "success %", "%", Aggregate("percent", ("success",)),
           fmt="{:.0f}", higher_is_better=True, views=frozenset({OVERALL, REPORT, BENCH})),
    Metric("efficiency", "efficiency", "efficiency", "efficiency", "%", Aggregate("nanmean", ("efficiency",)),
           fmt="{:.0f}", higher_is_better=True, views=frozenset({OVERALL})),
    Metric("comfort", "comfort", "comfort", "comfort", "%", Aggregate("nanmean", ("comfort",)),
           fmt="{:.0f}", higher_is_better=True, views=frozenset({OVERALL})),
    Metric("failed", "failed", "failed episodes", "failed", "episodes", Aggregate("failed", ("status",)),
           fmt="{:.0f}", higher_is_better=False, views=frozenset({OVERALL})),
    # Median over episodes of each episode's p50 step time; the p95 is the worst episode's p95.
    Metric("agent_wall_ms_p50", "agent_ms_p50", "agent ms/step (p50)", "agent ms p50", "ms",
           Aggregate("median", ("agent_wall_s_p50",), scale=1000), higher_is_better=False, gate=OPT_IN, cost=True,
           views=frozenset({OVERALL, PER_SCENARIO, REPORT, BENCH})),
    Metric("agent_wall_ms_p95", "agent_ms_p95", "agent ms/step (p95)", "agent ms p95", "ms",
           Aggregate("max", ("agent_wall_s_p95",), scale=1000), higher_is_better=False, cost=True,
           views=frozenset({OVERALL, REPORT})),
    Metric("sim_wall_ms_p50", "sim_ms_p50", "simulator ms/step (p50)", "sim ms p50", "ms",
           Aggregate("median", ("sim_wall_s_p50",), scale=1000), higher_is_better=False, cost=True),
    Metric("effective_flops_mean", "effective_gflops", "effective GFLOPs/step", "eff GFLOP/step", "GFLOPs",
           Aggregate("mean", ("effective_flops_mean",)), fmt="{:.3g}", higher_is_better=False, cost=True,
           views=frozenset({REPORT, BENCH}), display_per=1e9),
    Metric("executed_flops_mean", "executed_gflops", "executed GFLOPs/step", "exec GFLOP/step", "GFLOPs",
           Aggregate("mean", ("executed_flops_mean",)), fmt="{:.3g}", higher_is_better=False, cost=True,
           views=frozenset({REPORT, BENCH}), display_per=1e9),
    Metric("nonzero_params", "nonzero_params", "non-zero params", "non-zero params", "parameters",
           Aggregate("mean", ("nonzero_params",)), fmt="params", higher_is_better=False, cost=True,
           views=frozenset({REPORT, BENCH})),
    # Closed loop: the share of a model's decisions whose answer did not parse (the agent then braked). NaN
    # for agents without a model. Weights that are all NaN score like a cautious driver; this says why.
    Metric("parse_failure_rate", "parse_failure_rate", "parse failures (share of model decisions)", "parse fail",
           "share", Aggregate("ratio", ("parse_failures", "model_decisions")), higher_is_better=False,
           views=frozenset({OVERALL, REPORT, BENCH})),
    # Latency in the loop (harness.latency): absent from runs at --latency none, and then left out.
    Metric("decisions", "decisions", "decisions per episode", "decisions", "decisions",
           Aggregate("mean", ("decisions",)), fmt="{:.1f}", views=frozenset({LATENCY})),
    Metric("decision_latency_ms_mean", "decision_latency_ms", "decision latency (ms, mean)", "latency ms", "ms",
           Aggregate("mean", ("decision_latency_ms_mean",)), fmt="{:.0f}", higher_is_better=False, cost=True,
           views=frozenset({LATENCY})),
    Metric("decision_latency_ms_p95", "decision_latency_ms_p95", "decision latency (ms, p95; mean over episodes)",
           "latency ms p95", "ms", Aggregate("mean", ("decision_latency_ms_p95",)), fmt="{:.0f}",
           higher_is_better=False, cost=True, views=frozenset({LATENCY})),
    Metric("control_hz", "control_hz", "effective control rate (Hz)", "control Hz", "Hz",
           Aggregate("mean", ("control_hz",)), fmt="{:.2f}", higher_is_better=True, views=frozenset({LATENCY})),
    Metric("deadline_miss_share", "deadline_miss_share", "deadline misses (share of decisions slower than the "
           "policy period)", "deadline miss", "share", Aggregate("mean", ("deadline_miss_share",)),
           higher_is_better=False, views=frozenset({LATENCY})),
    Metric("stale_share", "stale_share", "share of simulated time on a stale control", "stale share", "share",
           Aggregate("mean", ("stale_share",)), higher_is_better=False, views=frozenset({LATENCY})),
)


AGGREGATIONS = ("count", "mean_std", "per_km", "total", "percent", "nanmean", "failed", "median", "max", "mean",
                 "ratio")


def _check_metric(name: str, entry: object) -> Metric:
    """A plug-in metric is a Metric whose names are its own (a built-in's column or key would be overwritten)."""
    if not isinstance(entry, Metric):
        raise RegistryError(f"metric {name!r}: {entry!r} is not a prunedrive.harness.metrics.Metric")
    if entry.aggregate.how not in AGGREGATIONS:
        raise RegistryError(f"metric {name!r}: unknown aggregation {entry.aggregate.how!r}; allowed: "
                            f"{', '.join(AGGREGATIONS)}")
    taken = {column for m in METRICS for column in (*m.summary_columns, m.key)}
    clash = sorted({*entry.summary_columns, entry.key} & taken)
    if clash:
        raise RegistryError(f"metric {name!r}: {', '.join(clash)} is a built-in metric's name; choose another")
    return entry


METRIC_PLUGINS: Registry[Metric] = Registry("metric", "prunedrive.metrics", check=_check_metric)


def all_metrics() -> tuple[Metric, ...]:
    """The one metric table: the built-ins (METRICS, in order), then installed plug-in metrics by name."""
    return (*METRICS, *(METRIC_PLUGINS.get(name) for name in METRIC_PLUGINS.names()))


def metric(key: str) -> Metric:
    return next(m for m in all_metrics() if m.key == key)


def in_view(view: str) -> list[Metric]:
    return [m for m in all_metrics() if view in m.views]


def gated() -> list[Metric]:
    """The metrics the regression gate checks, in the order it reports them."""
    return [m for m in all_metrics() if m.gate is not None]


def aggregate_metric(m: Metric, group: pd.DataFrame) -> dict[str, float]:
    """The summary columns of `m` over the episode rows `group` ({} for an optional metric whose episode
    column is absent)."""
    a = m.aggregate
    if a.how == "count":
        return {m.column: len(group)}
    if a.how == "mean_std":
        mean, std = mean_std(group[a.sources[0]].astype(float).tolist())
        return {m.column: mean, m.std_column: std}
    if a.how == "per_km":
        return {m.column: per_km(sum(float(group[s].sum()) for s in a.sources), float(group["km_driven"].sum()))}
    if a.how == "total":
        return {m.column: a.convert(float(group[a.sources[0]].sum()))}
    if a.how == "percent":
        return {m.column: 100.0 * float(group[a.sources[0]].mean())}
    if a.how == "nanmean":
        values = group[a.sources[0]]
        return {m.column: float(np.nanmean(values)) if values.notna().any() else np.nan}
    if a.how == "failed":
        return {m.column: int((group[a.sources[0]] == "failed").sum())}
    if a.how in ("median", "max"):
        values = group[a.sources[0]].dropna()
        reduce = np.median if a.how == "median" else np.max
        return {m.column: a.convert(float(reduce(values))) if len(values) else np.nan}
    if a.how == "mean":
        return {m.column: float(group[a.sources[0]].mean())} if a.sources[0] in group else {}
    if a.how == "ratio":
        return {m.column: ratio_of_totals(group, *a.sources)}
    raise ValueError(f"metric {m.column}: unknown aggregation {a.how!r}")


def ratio_of_totals(group: pd.DataFrame, numerator: str, denominator: str) -> float:
    """sum(numerator) / sum(denominator) over the rows that have both; NaN when there is nothing to divide
    (no such column, no row with both, or a zero denominator)."""
    if numerator not in group or denominator not in group:
        return np.nan
    top = pd.to_numeric(group[numerator], errors="coerce").to_numpy(float)
    bottom = pd.to_numeric(group[denominator], errors="coerce").to_numpy(float)
    both = np.isfinite(top) & np.isfinite(bottom)
    total = float(bottom[both].sum())
    return float(top[both].sum()) / total if total > 0 else np.nan


def per_km(count: float, km: float) -> float:
    """Infractions per km as the Leaderboard computes them: a total over a total, km floored at 0.001."""
    return count / max(km, KM_FLOOR)


def summary_row(group: pd.DataFrame) -> dict[str, float]:
    """Every metric's summary columns over the episode rows `group`, in table order."""
    row: dict[str, float] = {}
    for m in all_metrics():
        row.update(aggregate_metric(m, group))
    return row


def summary_columns() -> list[str]:
    return [column for m in all_metrics() for column in m.summary_columns]
