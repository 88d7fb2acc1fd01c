"""A report over one or more runs: a self-contained HTML page and a Markdown file.

    prunedrive report RUN [RUN ...] [--report-dir DIR]   # default results/reports/<first run>
    write_report([run_dir, ...], out_dir) -> (report.html, report.md)

The question it answers: how much does pruning cost at each sparsity, per method. Content:

- Two comparison tables, one row per agent of each run, sorted dense baseline first, then by method
  and sparsity, reference agents (expert, baselines without a model) last. The metrics are those of
  `harness.metrics`' report view, split by its `cost` flag:
  * driving: n (episodes), driving score and route completion as mean ± standard error, the paired
    driving-score difference to the dense baseline with its 95% bootstrap CI and a verdict
    (`harness.regress.compare_to_baseline`; the dense baseline is the agent whose method is "dense";
    without one there is no difference column), infraction penalty, infractions and collisions per km,
    success rate;
  * cost: method, target sparsity, non-zero parameters, effective and executed GFLOPs per step, agent
    wall time per step (p50, p95; it depends on the machine and its load).
  "–" marks what does not apply.
- Plots (matplotlib, Agg, no display), one colour per pruning method on the whole page (dense black,
  reference agents grey): the DS difference to dense vs sparsity per method (95% CI error bars), cost vs
  DS (effective GFLOPs per step vs mean DS ± SE, and the measured step time vs DS), infractions per km (a heatmap agents x infraction kinds,
  values in the cells), DS per scenario kind.
- Open-loop errors, when a run has `open_loop.json` (written by `prunedrive bench`), with units.
- The seeds' claims, when a run has `claims.csv` (written by `prunedrive claims`): its table, a forest plot
  of the paired differences coloured by verdict, and claim (c)'s sensitivity table (`sensitivity.csv`) with a
  plot of the DS drop against the share of the model's weights removed.
- Per-episode tables with the episode videos (`<video>` and a link) when the run was recorded.

The HTML embeds every plot as a base64 PNG (the file can be mailed or attached to CI as is); the
Markdown links the same PNGs written under `plots/` next to it. Videos live in the report's own
`videos/` folder, where the recorded episodes' WebM videos are copied.

Sparsity and method of an agent come from the run manifest's config (`sparsity`, `method`: a value,
or a mapping agent -> value) or, for a model-backed agent (one whose episodes report a model's compute:
params, non-zero params or effective FLOPs; its name does not matter), from its model directory's `sparsity.json`
({"global": ..., "method": ...}, written by `prunedrive prune`); a model directory without one is the
dense model (sparsity 0, method "dense").
"""
from __future__ import annotations

import base64
import html
import io
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.harness.metrics import INFRACTIONS, REPORT, in_view, metric
from prunedrive.harness.regress import MIN_PAIRS_FOR_VERDICT, compare_to_baseline
from prunedrive.harness.results import RunDir
from prunedrive.harness.summary import summarize

# Episode columns only a model-backed agent fills (harness.compute leaves them NaN for any other agent):
# whether an agent runs a model is read from its data, not from its name (plug-in agents have any name).
MODEL_COMPUTE_COLUMNS = ("params", "nonzero_params", "effective_flops_mean")
DENSE = "dense"
ALPHA = 0.05  # of the CIs of the differences to dense


@dataclass
class Series:
    """One agent of one run: a row of the comparison tables, a point or bar in each plot."""

    label: str
    agent: str
    run: str
    run_path: Path
    episodes: pd.DataFrame
    summary: dict
    sparsity: float | None = None
    method: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def reference(self) -> bool:
        """An agent without a model (the expert, constant/random baselines): drawn grey, listed last."""
        return self.method is None and self.sparsity is None and not model_backed(self.episodes)

    @property
    def dense(self) -> bool:
        return self.method == DENSE


@dataclass
class Plot:
    name: str
    title: str
    png: bytes | None     # None: skipped
    note: str = ""        # under the plot: how to read it, or why it was skipped
    wide: bool = False    # spans the page


# What the report knows about the agent itself (manifest config or model directory): (column id, header).
AGENT_COLUMNS = [("method", "method"), ("sparsity", "sparsity %"), ("disk_mb", "MB on disk"),
                 ("disk_ratio", "× dense bytes"), ("scheme", "scheme / execution")]
# The paired difference of the driving score to the dense baseline (harness.regress.compare_to_baseline).
DIFF_COLUMNS = [("ds_diff", "ΔDS vs dense"), ("ds_ci", "95% CI"), ("verdict", "verdict")]


def load_series(run_dirs: list[str | Path]) -> list[Series]:
    """Every agent of every run, sorted: dense first, then by method and sparsity, reference agents last."""
    runs = []
    for path in run_dirs:
        run = RunDir(path)
        manifest = run.manifest()
        episodes = run.episodes()
        if episodes.empty:
            raise ValueError(f"{run.path}: the run has no finished episodes")
        runs.append((run.path, manifest, episodes))
    agent_runs: dict[str, int] = {}
    for _, _, episodes in runs:
        for agent in episodes.agent.unique():
            agent_runs[agent] = agent_runs.get(agent, 0) + 1
    series = []
    for path, manifest, episodes in runs:
        config = manifest.get("config") or {}
        for agent, group in episodes.groupby("agent", sort=False):
            summary = summarize(group, ["agent"]).iloc[0].to_dict()
            label = agent if agent_runs[agent] == 1 else f"{agent} [{path.name}]"  # same agent in several runs
            s = Series(label, agent, path.name, path, group.reset_index(drop=True), summary)
            s.sparsity, s.method = _sparsity(agent, group, config)
            s.extra["checkpoint"] = _checkpoint(agent, config)
            series.append(s)
    return sorted(series, key=_order)


def _order(s: Series):
    group = 0 if s.dense else 2 if s.reference else 1
    return group, s.method or "", -1.0 if s.sparsity is None else s.sparsity, s.label


def _sparsity(agent: str, episodes: pd.DataFrame, config: dict) -> tuple[float | None, str | None]:
    def per_agent(value):
        return value.get(agent) if isinstance(value, dict) else value

    sparsity, method = per_agent(config.get("sparsity")), per_agent(config.get("method"))
    if sparsity is not None:
        return float(sparsity), (str(method) if method is not None else None)
    model = per_agent(config.get("models")) if isinstance(config.get("models"), dict) else None
    if model is None and model_backed(episodes):
        model = config.get("model")
    if model:
        model_dir = Path(model)
        record = model_dir / "sparsity.json"
        if record.is_file():
            data = json.loads(record.read_text())
            value = data.get("global", data.get("target_sparsity"))
            return (float(value) if value is not None else None), (data.get("method") or method)
        if model_dir.is_dir():  # no record: the dense model, unless the manifest names another method
            return (0.0 if method in (None, DENSE) else None), method or DENSE
    return None, (str(method) if method is not None else None)


def _checkpoint(agent: str, config: dict) -> dict:
    """What the agent's checkpoint costs on disk: the bench's record in the manifest config (`checkpoints`), else
    the `checkpoint` entry `prunedrive prune` wrote into the model directory's sparsity.json; {} when neither."""
    recorded = config.get("checkpoints")
    if isinstance(recorded, dict) and isinstance(recorded.get(agent), dict):
        return recorded[agent]
    models = config.get("models")
    model = models.get(agent) if isinstance(models, dict) else None
    record = Path(model) / "sparsity.json" if model else None
    if record is not None and record.is_file():
        try:
            checkpoint = json.loads(record.read_text()).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            return {}
        return checkpoint if isinstance(checkpoint, dict) else {}
    return {}


def model_backed(episodes: pd.DataFrame) -> bool:
    """True when the agent's episodes report a model's compute (some finite value in a model-only column)."""
    return any(column in episodes and np.isfinite(pd.to_numeric(episodes[column], errors="coerce")).any()
               for column in MODEL_COMPUTE_COLUMNS)


def dense_baseline(series: list[Series]) -> Series | None:
    """The agent the differences are measured against: the first whose method is "dense"."""
    return next((s for s in series if s.dense), None)


def _suite_id(run_path: Path) -> tuple:
    manifest = RunDir(run_path).manifest()
    identity, config = manifest.get("identity") or {}, manifest.get("config") or {}
    return (identity.get("suite_hash"),) if identity.get("suite_hash") else (None, config.get("suite"))


def dense_differences(series: list[Series], alpha: float = ALPHA, n_boot: int = 10000,
                      seed: int = 0) -> dict[str, dict]:
    """{label: {n_pairs, diff, ci_low, ci_high, verdict}} of each agent's driving score against the dense
    baseline, paired by (scenario, seed) over the agents of runs of the same suite; {} without a baseline.
    Agents of a run of another suite get the verdict "other suite" (their episodes cannot be paired)."""
    base = dense_baseline(series)
    if base is None:
        return {}
    suite = _suite_id(base.run_path)
    same = [s for s in series if _suite_id(s.run_path) == suite]
    frame = pd.concat([s.episodes.assign(agent=s.label) for s in same], ignore_index=True)
    table = compare_to_baseline(frame, base.label, "driving_score", alpha, n_boot, seed)
    out = {row["agent"]: {k: row[k] for k in ("n_pairs", "diff", "ci_low", "ci_high", "verdict")}
           for _, row in table.iterrows()}
    for s in series:
        if s is not base and s.label not in out:
            out[s.label] = {"n_pairs": 0, "diff": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                            "verdict": "other suite"}
    return out


# -- numbers for people ---------------------------------------------------------------------------

def standard_error(s: Series, key: str = "driving_score") -> float:
    m = metric(key)
    n = s.summary.get("episodes", np.nan)
    return m.spread(s.summary) / np.sqrt(n) if n and n > 1 else np.nan


def _metric_text(m, summary: dict) -> str | None:
    """A report metric as the tables print it (a mean/std metric as mean ± standard error); None: NaN."""
    value = m.value(summary)
    if not np.isfinite(value):
        return None
    if m.std_column:
        n = summary.get("episodes", np.nan)
        se = m.spread(summary) / np.sqrt(n) if n and n > 1 else np.nan
        return m.text(value, se)
    return m.text(value)


def _signed(value: float) -> str:
    return f"{value:+.1f}".replace("-", "−")


# -- colours: one per method on the whole page --------------------------------------------------------

METHOD_COLOURS = {DENSE: "#111111", "owl": "#1f77b4", "dg2pf": "#d62728", "wanda": "#2ca02c",
                  "magnitude": "#ff7f0e", "sparsegpt": "#9467bd"}
SPARE_COLOURS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939"]
REFERENCE_GREYS = ["#8a8a8a", "#b5b5b5", "#5f5f5f", "#d0d0d0"]
HATCHES = ["//", "..", "xx", "\\\\"]
UNKNOWN = "unknown"


class Palette:
    """Colours of methods (fixed for known ones) and, per agent, its method's colour, lighter for lower
    sparsity when a method has several; reference agents in greys."""

    def __init__(self, series: list[Series]):
        methods = list(dict.fromkeys(self.method(s) for s in series if not s.reference))
        spare = iter(SPARE_COLOURS * 4)
        self.methods = {m: METHOD_COLOURS.get(m) or next(spare) for m in methods}
        references = [s.label for s in series if s.reference]
        self.agents = {label: REFERENCE_GREYS[i % len(REFERENCE_GREYS)] for i, label in enumerate(references)}
        # Bars side by side need one look per agent: hatched for reference agents and for a second agent of
        # the same method and sparsity (the same model in several runs).
        self.hatches = {label: HATCHES[i % len(HATCHES)] for i, label in enumerate(references)}
        for method in methods:
            members = [s for s in series if not s.reference and self.method(s) == method]
            levels = sorted({s.sparsity or 0.0 for s in members})
            seen: dict[float, int] = {}
            for s in members:  # the sparsest darkest
                rank = levels.index(s.sparsity or 0.0)
                lighten = 0.55 * (len(levels) - 1 - rank) / (len(levels) - 1) if len(levels) > 1 else 0.0
                self.agents[s.label] = _blend(self.methods[method], lighten)
                seen[s.sparsity or 0.0] = seen.get(s.sparsity or 0.0, -1) + 1
                if seen[s.sparsity or 0.0]:
                    self.hatches[s.label] = HATCHES[(seen[s.sparsity or 0.0] - 1) % len(HATCHES)]

    @staticmethod
    def method(s: Series) -> str:
        return s.method or UNKNOWN

    def of(self, s: Series) -> str:
        """The agent's method's colour (grey for a reference agent)."""
        return self.methods.get(self.method(s), "#777777") if not s.reference else self.agents[s.label]

    def shade(self, s: Series) -> str:
        """The agent's own shade of its method's colour (lighter: less sparse), for bars side by side."""
        return self.agents.get(s.label, self.of(s))


def _blend(colour: str, white: float) -> str:
    from matplotlib.colors import to_hex, to_rgb

    return to_hex([c + (1 - c) * white for c in to_rgb(colour)])


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "<", ">"]


def _markers(series: list[Series]) -> dict[str, str]:
    """A marker per sparsity (dense: a star), so that points of one method differ by shape too."""
    levels = sorted({s.sparsity for s in series if s.sparsity is not None and not s.dense})
    by_level = {level: MARKERS[i % len(MARKERS)] for i, level in enumerate(levels)}
    return {s.label: "*" if s.dense else by_level.get(s.sparsity, "o") for s in series}


# -- plots ----------------------------------------------------------------------------------------

def _figure(width=6.6, height=4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.12)
    return buffer.getvalue()


def plot_sparsity(series: list[Series], diffs: dict[str, dict], palette: Palette) -> Plot:
    name, title = "ds_vs_sparsity", "Driving-score difference to dense vs sparsity, per method"
    base = dense_baseline(series)
    points = [s for s in series if s.sparsity is not None and not s.dense and not s.reference]
    if base is None:
        return Plot(name, title, None, "skipped: no dense baseline (an agent whose method is \"dense\": a model "
                                       "directory without sparsity.json, or `method` in the manifest config)")
    points = [s for s in points if np.isfinite(diffs.get(s.label, {}).get("diff", np.nan))]
    if not points:
        return Plot(name, title, None, "skipped: no pruned agent with a sparsity whose episodes pair with the "
                                       "dense baseline's")
    from matplotlib.lines import Line2D

    figure = _figure(6.6, 4.6)
    ax = figure.add_subplot()
    ax.axhline(0, color=palette.methods.get(DENSE, "#111111"), linewidth=1.2, zorder=1)
    methods = list(dict.fromkeys(palette.method(s) for s in points))
    step = 1.4  # percentage points between the methods at one sparsity, so their error bars stay apart
    few = False
    lows, highs = [0.0], [0.0]
    handles = []
    for i, method in enumerate(methods):
        members = sorted((s for s in points if palette.method(s) == method), key=lambda s: s.sparsity)
        d = [diffs[s.label] for s in members]
        x = np.array([100 * s.sparsity for s in members]) + (i - (len(methods) - 1) / 2) * step
        for j in range(1, len(members)):  # one method, one sparsity, several agents (several runs): apart too
            if members[j].sparsity == members[j - 1].sparsity:
                x[j] = x[j - 1] + step / 3
        y = np.array([r["diff"] for r in d])
        low, high = np.array([r["ci_low"] for r in d]), np.array([r["ci_high"] for r in d])
        lows.append(np.nanmin(low))
        highs.append(np.nanmax(high))
        enough = np.array([r["n_pairs"] >= MIN_PAIRS_FOR_VERDICT for r in d])
        few |= not enough.all()
        colour = palette.methods[method]
        joined = enough.all() and len(x) > 1
        ax.errorbar(x, y, yerr=[y - low, high - y], fmt="-" if joined else "none", capsize=4, color=colour,
                    linewidth=1.5, zorder=3)
        # filled: a point with enough pairs for a verdict; hollow: too few
        ax.scatter(x, y, s=55, facecolors=np.where(enough, colour, "white"), edgecolors=colour, linewidths=1.8,
                   zorder=4)
        handles.append(Line2D([], [], color=colour, marker="o", markersize=7, linestyle="-" if joined else "none",
                              markerfacecolor=colour if enough.all() else "white", label=method))
    sparsities = sorted({100 * s.sparsity for s in points})
    ax.set_xticks(sparsities, [f"{v:g}%" for v in sparsities])
    ax.set_xlim(min(sparsities) - 12, max(sparsities) + 12)
    lo, hi = min(lows), max(highs)
    pad = max(0.12 * (hi - lo), 2.0)
    ax.set_ylim(lo - pad, hi + pad)
    ax.text(0.01, 0.0, " dense = 0", transform=ax.get_yaxis_transform(), va="bottom", ha="left", fontsize=8,
            color=palette.methods.get(DENSE, "#111111"))
    ax.set_xlabel("target sparsity")
    ax.set_ylabel("ΔDS vs dense (paired mean, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              ncol=min(len(methods), 5), frameon=False)
    ax.set_title(title, fontsize=10)
    note = (f"Each point: mean over episodes of (agent DS − dense DS) on the same scenario and seed, with its 95% "
            f"paired-bootstrap CI; below 0 the pruned model drives worse. Methods at one sparsity are drawn "
            f"{step:g} points apart.")
    if few:
        note += (f" Hollow points: fewer than {MIN_PAIRS_FOR_VERDICT} pairs, too few for a verdict (their CI is "
                 "too narrow to trust); such points are not joined by lines.")
    return Plot(name, title, _png(figure), note)


def _dodge(x: np.ndarray, log: bool) -> np.ndarray:
    """Spread points with (nearly) equal x sideways a little, so their error bars stay apart."""
    if len(x) < 2:
        return x
    t = np.log10(x) if log else x.astype(float)
    span = (t.max() - t.min()) or (abs(t.max()) or 1.0)
    out, order = t.copy(), np.argsort(t, kind="stable")
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and t[order[j + 1]] - t[order[i]] < 0.02 * span:
            j += 1
        k = j - i + 1
        for rank, idx in enumerate(order[i:j + 1]):
            out[idx] = t[idx] + (rank - (k - 1) / 2) * 0.025 * span
        i = j + 1
    return 10 ** out if log else out


# The x axes DS is plotted against: {metric key: (plot name, title, axis label, what x is, for the note, why a plot
# is skipped)}. FLOPs say what pruning could save; the measured step time what it did save (unstructured zeros on
# dense kernels: nothing).
COST_AXES = {
    "effective_gflops": ("cost_vs_ds", "Cost vs driving score", "effective GFLOPs per step (non-zero weights)",
                         "effective FLOPs per agent step, counted over the non-zero weights (deterministic, unlike "
                         "wall time)", "skipped: no agent reports effective FLOPs (model-backed agents do)"),
    "agent_ms_p50": ("step_time_vs_ds", "Measured step time vs driving score",
                     "measured agent ms per step (p50)",
                     "the agent's measured wall time per step (median over episodes of each episode's p50), on "
                     "this run's machine at its load: what pruning actually bought, where FLOPs say what it could",
                     "skipped: no model-backed agent (only model agents' step times are compared)"),
}


def cost_points(series: list[Series], x_key: str) -> list[tuple[Series, float]]:
    """The model agents with a finite x (COST_AXES' metric) and that x; reference agents are drawn as lines."""
    m = metric(x_key)
    return [(s, float(m.value(s.summary))) for s in series
            if not s.reference and model_backed(s.episodes) and np.isfinite(m.value(s.summary))]


def plot_cost(series: list[Series], palette: Palette, x_key: str = "effective_gflops") -> Plot:
    name, title, x_label, x_text, skipped = COST_AXES[x_key]
    points = [s for s, _ in cost_points(series, x_key)]
    references = [s for s in series if s.reference]
    if not points:
        return Plot(name, title, None, skipped)
    figure = _figure(6.6, 4.4 + 0.2 * ((len(points) + len(references) + 2) // 3))
    ax = figure.add_subplot()
    x = np.array([x for _, x in cost_points(series, x_key)])
    log = x.min() > 0 and x.max() / x.min() > 30
    xd = _dodge(x, log)
    markers = _markers(series)
    dense = []
    for s, xi in zip(points, xd):
        y, se = s.summary["driving_score_mean"], standard_error(s)
        colour = palette.of(s) if not s.dense else palette.methods[DENSE]
        ax.errorbar([xi], [y], yerr=[[np.nan_to_num(se)], [np.nan_to_num(se)]], fmt="none", ecolor=colour,
                    capsize=3, zorder=2)
        ax.scatter([xi], [y], marker=markers[s.label], s=260 if s.dense else 70, color=colour,
                   edgecolors="white" if not s.dense else "#ffd400", linewidths=1.0 if not s.dense else 1.3,
                   zorder=5 if s.dense else 4, label=s.label)
        if s.dense:
            dense.append((s, xi, y))
    if log:
        ax.set_xscale("log")
        ax.set_xlim(x.min() / 1.6, x.max() * 1.6)
    else:
        ax.set_xlim(0, x.max() * 1.15)
    left, right = ax.get_xlim()
    for s, xi, y in dense:  # its label inside the axes, on the side with room
        t = (np.log10(xi / left) / np.log10(right / left)) if log else (xi - left) / (right - left)
        label = s.label if len(s.label) <= 24 else s.label[:22] + "…"
        ax.annotate(f"dense: {label}", (xi, y), xytext=(-14 if t > 0.5 else 14, 16), textcoords="offset points",
                    fontsize=8, fontweight="bold", ha="right" if t > 0.5 else "left",
                    arrowprops={"arrowstyle": "-", "color": "#111111", "lw": 0.8})
    # Reference agents have no model, hence no FLOPs: a dotted line at their score, labelled at the left.
    placed: list[float] = []
    for i, s in enumerate(references):
        y = s.summary["driving_score_mean"]
        ax.axhline(y, color=palette.of(s), linestyle=(0, (2, 2)), linewidth=1.3, zorder=1)
        ty = y
        while any(abs(ty - p) < 4.5 for p in placed):
            ty -= 4.5
        placed.append(ty)
        ax.text(0.005, ty, f" {s.label} (no model)", transform=ax.get_yaxis_transform(), ha="left", va="bottom",
                fontsize=8, color="#555555")
    ax.set_ylim(0, 105)
    ax.set_xlabel(f"{x_label}{', log scale' if log else ''}")
    ax.set_ylabel("driving score (mean ± SE)")
    ax.grid(alpha=0.3, which="both" if log else "major")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), borderaxespad=0,
              ncol=3 if max(len(s.label) for s in points) <= 22 else 2,
              frameon=False)
    ax.set_title(title + " (top left is best)", fontsize=10)
    note = (f"x: {x_text}; y: mean driving score ± standard error. Colour: method; marker: sparsity (dense: the "
            "star). Agents at equal x are spread sideways a little."
            + (" Dotted lines: agents without a model (no FLOPs), at their mean score." if references else ""))
    return Plot(name, title, _png(figure), note)


def plot_infractions(series: list[Series], palette: Palette) -> Plot:
    name, title = "infractions", "Infractions per km, by kind"
    kinds = [k for k in INFRACTIONS if any(s.summary.get(f"{k}_per_km", 0) > 0 for s in series)]
    columns = [*kinds, "infractions"]  # the total last
    values = np.array([[s.summary.get(f"{k}_per_km", np.nan) for k in columns] for s in series], float)
    figure = _figure(max(5.0, 2.6 + 1.1 * len(columns)), 1.4 + 0.4 * len(series))
    ax = figure.add_subplot()
    # Shaded per column (darkest: the most of that kind), so that a rare kind is as readable as a common one.
    top = np.nanmax(np.where(np.isfinite(values), values, 0), axis=0, initial=0.0)
    shade = np.where(top > 0, np.nan_to_num(values) / np.where(top > 0, top, 1.0), 0.0)
    ax.imshow(shade, cmap="Greys", vmin=0, vmax=1.25, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = "–" if not np.isfinite(v) else "0" if v == 0 else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if shade[i, j] > 0.6 else "#222222",
                    fontweight="bold" if j == len(columns) - 1 else "normal")
    ax.set_xticks(range(len(columns)), [("all" if k == "infractions" else k.replace("_", " ")).replace(" ", "\n", 1)
                                        for k in columns], fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(series)), [s.label for s in series], fontsize=9)
    for tick, s in zip(ax.get_yticklabels(), series):  # agent names in their method's colour
        tick.set_color(palette.of(s) if not s.reference else "#555555")
    ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(series)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title + ("" if kinds else ": none"), fontsize=10, pad=10)
    note = ("Infractions per km driven (a total over the total km of each agent's episodes, as the Leaderboard "
            "counts them); the darkest cell of each column is the agent with the most of that kind; the last "
            "column is all kinds together. Only kinds that occurred are shown.")
    return Plot(name, title, _png(figure), note)


def plot_kinds(series: list[Series], palette: Palette) -> Plot:
    name, title = "per_kind", "Driving score per scenario kind"
    kinds = list(dict.fromkeys(k for s in series for k in s.episodes["kind"]))
    figure = _figure(min(max(8.0, 1.6 + len(kinds) * (0.22 * len(series) + 0.4)), 13.0), 4.2)
    ax = figure.add_subplot()
    width = 0.85 / max(len(series), 1)
    for i, s in enumerate(series):
        means = s.episodes.groupby("kind")["driving_score"].mean()
        values = [means.get(k, np.nan) for k in kinds]
        hatch = palette.hatches.get(s.label)
        ax.bar(np.arange(len(kinds)) + (i - (len(series) - 1) / 2) * width, values, width * 0.92,
               color=palette.shade(s), edgecolor="#444444" if hatch else "none", hatch=hatch, linewidth=0.5,
               label=s.label)
    ax.set_xticks(np.arange(len(kinds)), [k.replace("_", " ") for k in kinds])
    ax.set_ylabel("driving score (mean over episodes)")
    ax.set_ylim(0, 100)
    ax.set_yticks(np.arange(0, 101, 20))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title="agent",
              title_fontsize=8)
    ax.set_title(title, fontsize=10)
    note = ("Colour: method (lighter: lower sparsity); grey, hatched: agents without a model. "
            "The numbers are in the table below.")
    return Plot(name, title, _png(figure), note, wide=True)


# -- tables ---------------------------------------------------------------------------------------

def _agent_cells(s: Series) -> dict[str, str]:
    cells = {}
    if s.sparsity is not None:
        cells["sparsity"] = f"{100 * s.sparsity:.3g}"
    if s.method is not None:
        cells["method"] = str(s.method)
    checkpoint = s.extra.get("checkpoint") or {}
    if isinstance(checkpoint.get("bytes_on_disk"), (int, float)):
        cells["disk_mb"] = f"{checkpoint['bytes_on_disk'] / 1e6:.2f}"
    if isinstance(checkpoint.get("ratio_to_dense"), (int, float)) and np.isfinite(checkpoint["ratio_to_dense"]):
        cells["disk_ratio"] = f"{checkpoint['ratio_to_dense']:.3f}"
    if checkpoint.get("execution"):
        cells["scheme"] = f"{checkpoint.get('scheme', '')} / {checkpoint['execution']}"
    return cells


def _diff_cells(s: Series, diffs: dict[str, dict]) -> dict[str, str]:
    if not diffs:
        return {}
    d = diffs.get(s.label)
    if d is None:  # the baseline itself
        return {"verdict": "baseline"}
    if not np.isfinite(d["diff"]):
        return {"verdict": d["verdict"]}
    ci = f"[{_signed(d['ci_low'])}, {_signed(d['ci_high'])}]"
    verdict = d["verdict"] + (f" ({d['n_pairs']} pairs)" if d["n_pairs"] != s.summary.get("episodes") else "")
    return {"ds_diff": _signed(d["diff"]), "ds_ci": ci, "verdict": verdict}


def comparison_table(series: list[Series], diffs: dict[str, dict] | None = None
                     ) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(columns present, rows): rows map column id -> formatted text; a column shows only when some row has
    it. The metrics are harness.metrics' report view, in its order (a mean/std metric as mean ± standard
    error), the difference to dense right after the driving score, then method and sparsity."""
    diffs = dense_differences(series) if diffs is None else diffs
    rows = []
    for s in series:
        cells = {m.key: text for m in in_view(REPORT) if (text := _metric_text(m, s.summary)) is not None}
        rows.append({"agent": s.label, "run": s.run, **cells, **_diff_cells(s, diffs), **_agent_cells(s)})
    runs = [("run", "run")] if len({s.run for s in series}) > 1 else []  # one run: named above the table
    columns = []
    for m in in_view(REPORT):
        columns.append((m.key, m.label))
        if m.key == "driving_score":
            columns += DIFF_COLUMNS
    columns += AGENT_COLUMNS
    present = [("agent", "agent")] + runs + [(c, h) for c, h in columns if any(c in r for r in rows)]
    return present, rows


HEADERS = {"episodes": "n", "driving_score": "DS (mean ± SE)", "route_completion": "RC % (mean ± SE)"}


def split_table(columns: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The comparison columns as two tables that fit a page: driving (how it drove) and cost (what it spent,
    and what the agent is: method, sparsity)."""
    cost_keys = {m.key for m in in_view(REPORT) if m.cost} | {c for c, _ in AGENT_COLUMNS}
    ident = [(c, h) for c, h in columns if c in ("agent", "run")]
    header = {c: HEADERS.get(c, h) for c, h in columns}
    # The run only in the cost table: the driving table is the wide one (an agent in several runs has the
    # run in its label anyway).
    driving = ident[:1] + [(c, header[c]) for c, _ in columns if c not in cost_keys and c not in ("agent", "run")]
    agent = [(c, h) for c, h in columns if c in ("method", "sparsity")]
    spent = [(c, header[c]) for c, _ in columns if c in cost_keys and c not in ("method", "sparsity")]
    timed = {m.key for m in in_view(REPORT) if m.unit == "ms"}  # wall time, the machine-dependent cost, last
    cost = ident + agent + [x for x in spent if x[0] not in timed] + [x for x in spent if x[0] in timed]
    if len(cost) == len(ident):
        cost = []
    return driving, cost


# Open-loop metrics (app.eval_open.evaluate_open_loop, via prunedrive bench's open_loop.json):
# (key, header, unit, scale, decimals).
OPEN_LOOP = [
    ("lon_control_error", "lon. control MAE", "0–1", 1, 3),
    ("lat_control_error", "lat. control MAE", "steer, −1–1", 1, 3),
    ("action_parse_rate", "actions parsed", "%", 100, 0),
    ("vehicle_count_error", "vehicle count MAE", "vehicles", 1, 2),
    ("pedestrian_count_error", "pedestrian count MAE", "pedestrians", 1, 2),
    ("lead_presence_accuracy", "lead presence", "% correct", 100, 0),
    ("lead_distance_error", "lead distance MAE", "m", 1, 1),
    ("traffic_light_accuracy", "light state", "% correct", 100, 0),
    ("traffic_light_distance_error", "light distance MAE", "m", 1, 1),
    ("perception_parse_rate", "perception parsed", "%", 100, 0),
    ("n", "samples", "", 1, 0),
]
OPEN_LOOP_NOTE = (
    "Open-loop: each model's answers on the held-out split of the expert's driving dataset (no simulator). "
    "lon. control MAE: mean absolute error of the longitudinal control (throttle − brake + 1) / 2, in [0, 1]; "
    "lat. control MAE: of the steer, in [−1, 1] (an unparsable answer counts as a prediction of 0). Count errors: "
    "mean absolute error in vehicles or pedestrians; distance errors in metres; presence, light state and parse "
    "rates: % of the samples. Lower errors and higher rates are better.")


def open_loop_table(series: list[Series]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(columns present, rows) of the runs' open_loop.json ({agent: {metric: value}}); ([], []) without one."""
    files: dict[Path, dict] = {}
    rows = []
    for s in series:
        if s.run_path not in files:
            path = s.run_path / "open_loop.json"
            try:
                files[s.run_path] = json.loads(path.read_text()) if path.is_file() else {}
            except (OSError, ValueError):
                files[s.run_path] = {}
        values = files[s.run_path].get(s.agent)
        if not isinstance(values, dict):
            continue
        row = {"agent": s.label}
        for key, _, _, scale, decimals in OPEN_LOOP:
            value = values.get(key)
            if isinstance(value, (int, float)) and np.isfinite(value):
                row[key] = f"{scale * value:.{decimals}f}"
        rows.append(row)
    columns = [("agent", "agent")] + [(key, f"{header} ({unit})" if unit else header)
                                      for key, header, unit, _, _ in OPEN_LOOP if any(key in r for r in rows)]
    return (columns, rows) if rows else ([], [])


# -- the seeds' claims (prunedrive claims writes claims.csv and sensitivity.csv into its run) ---------------

VERDICT_COLOURS = {"supported": "#2e7d32", "refuted": "#c62828"}  # anything else (inconclusive, n too small): grey
SCOPE_COLOURS = {"lm": "#1f77b4", "encoder": "#d62728", "all": "#7f7f7f"}
CLAIMS_COLUMNS = [("claim", "claim"), ("comparison", "comparison"), ("n", "n"), ("diff", "ΔDS [95% CI]"),
                  ("coll", "Δcoll/km"), ("verdict", "verdict")]
SENSITIVITY_COLUMNS = [("scope", "scope"), ("agent", "agent"), ("part", "part sparsity %"),
                       ("model", "model sparsity %"), ("n", "n"), ("drop", "DS drop [95% CI]"),
                       ("per_part", "per 10% of part"), ("per_model", "per 10% of model")]
CLAIMS_NOTE = ("Each row: mean over paired episodes (same scenario and seed) of the candidate's DS minus the "
               "baseline's, with its 95% percentile-bootstrap CI. Superiority rows: supported when the CI lies "
               "above 0, refuted when below. Non-inferiority rows (\"keeps accuracy\"): supported when the CI's "
               "lower bound is above minus the margin, refuted when its upper bound is below it. \"per 10% of the "
               "model's weights\" rows compare DS drops from dense per 10% of the model's weights removed.")
SENSITIVITY_NOTE = ("Claim (c): OWL pruning the LM, the encoder or both. DS drop: dense minus agent, paired, "
                    "positive is a loss. part: the target sparsity of the part pruned; model: the share of all "
                    "the model's weights that are zero. The drops per 10% divide the drop and its CI by those.")


@dataclass
class Claims:
    run: str
    table: pd.DataFrame
    sensitivity: pd.DataFrame | None


def load_claims(series: list[Series]) -> list[Claims]:
    """The claims (and sensitivity) tables of the runs that have them, in run order."""
    out = []
    for run_path in dict.fromkeys(s.run_path for s in series):
        path = run_path / "claims.csv"
        if not path.is_file():
            continue
        sensitivity = run_path / "sensitivity.csv"
        sensitivity = pd.read_csv(sensitivity) if sensitivity.is_file() else None
        out.append(Claims(run_path.name, pd.read_csv(path),
                          sensitivity if sensitivity is not None and not sensitivity.empty else None))
    return out


def _ci_text(value: float, low: float, high: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:+.1f} [{low:+.1f}, {high:+.1f}]"


def claims_rows(c: Claims) -> list[dict[str, str]]:
    return [{"agent": r.comparison, "claim": str(r.claim), "comparison": r.comparison, "n": str(int(r.n)),
             "diff": _ci_text(r.ds_diff, r.ci_low, r.ci_high),
             "coll": f"{r.coll_per_km_diff:+.2f}" if np.isfinite(r.coll_per_km_diff) else "–", "verdict": r.verdict}
            for r in c.table.itertuples()]


def sensitivity_rows(c: Claims) -> list[dict[str, str]]:
    if c.sensitivity is None:
        return []
    return [{"agent": r.agent, "scope": r.scope, "part": f"{100 * r.target_sparsity:.3g}",
             "model": f"{100 * r.model_sparsity:.1f}", "n": str(int(r.n)), "drop": _ci_text(r.ds_drop, r.ci_low,
                                                                                          r.ci_high),
             "per_part": _ci_text(r.drop_per_part, r.drop_per_part_low, r.drop_per_part_high),
             "per_model": _ci_text(r.drop_per_model, r.drop_per_model_low, r.drop_per_model_high)}
            for r in c.sensitivity.itertuples()]


def plot_claims(c: Claims) -> Plot:
    name, title = f"claims_{c.run}", f"The seeds' claims: paired DS differences ({c.run})"
    table = c.table[np.isfinite(c.table["ds_diff"]) & (c.table["kind"] != "per-weight")].reset_index(drop=True)
    if table.empty:
        return Plot(name, title, None, "no comparison has paired episodes")
    figure = _figure(8.5, 1.0 + 0.26 * len(table))
    ax = figure.add_subplot()
    y = np.arange(len(table))[::-1]
    for row, r in zip(y, table.itertuples()):
        ax.errorbar([r.ds_diff], [row], xerr=[[r.ds_diff - r.ci_low], [r.ci_high - r.ds_diff]], fmt="o", ms=4,
                    color=VERDICT_COLOURS.get(r.verdict, "#888888"), elinewidth=1.4, capsize=2)
    ax.axvline(0, color="#333333", linewidth=0.8)
    margins = table.get("margin", pd.Series(dtype=float)).dropna().unique()
    for margin in margins:
        ax.axvline(-margin, color="#333333", linewidth=0.8, linestyle=":")
    ax.set_yticks(y, [f"({r.claim}) {r.comparison}" for r in table.itertuples()], fontsize=7.5)
    ax.set_xlabel("ΔDS, candidate − baseline (95% CI)")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title, fontsize=10)
    note = ("Green: supported, red: refuted, grey: inconclusive. Solid line: no difference"
            + (f"; dotted: the non-inferiority margin ({', '.join(f'−{m:g}' for m in margins)} DS) of the "
               "\"keeps accuracy\" rows" if len(margins) else "")
            + ". Per-weight rows are in the table only (other units).")
    return Plot(name, title, _png(figure), note, wide=True)


def plot_sensitivity(c: Claims) -> Plot:
    name, title = f"sensitivity_{c.run}", f"Claim (c): DS drop vs the model's weights removed ({c.run})"
    table = c.sensitivity
    if table is None or table.empty or not np.isfinite(table["ds_drop"]).any():
        return Plot(name, title, None, "no sensitivity table")
    figure = _figure(6.6, 4.2)
    ax = figure.add_subplot()
    for scope, group in table.groupby("scope", sort=False):
        colour = SCOPE_COLOURS.get(scope, "#9467bd")
        x = 100 * group["model_sparsity"]
        ax.errorbar(x, group["ds_drop"], yerr=[group["ds_drop"] - group["ci_low"], group["ci_high"] - group["ds_drop"]],
                    fmt="o", color=colour, capsize=3, label=scope)
        for r in group.itertuples():
            ax.annotate(f"{100 * r.target_sparsity:.0f}%", (100 * r.model_sparsity, r.ds_drop), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="#333333", linewidth=0.8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of the model's weights removed (%)")
    ax.set_ylabel("DS drop from dense (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="scope", title_fontsize=8)
    ax.set_title(title, fontsize=10)
    note = ("Each point: OWL pruning one scope to the target sparsity written beside it. A steeper rise from the "
            "origin is a more sensitive part: the same drop for fewer weights removed.")
    return Plot(name, title, _png(figure), note)


def kind_table(series: list[Series]) -> pd.DataFrame:
    """Agents (rows, in the report's order) x scenario kinds: mean driving score."""
    frame = pd.concat([s.episodes.assign(series=s.label) for s in series])
    table = frame.pivot_table(index="series", columns="kind", values="driving_score", aggfunc="mean", sort=False)
    kinds = list(dict.fromkeys(k for s in series for k in s.episodes["kind"]))
    return table.reindex(index=[s.label for s in series], columns=kinds)


def videos(series: Series, out_dir: Path) -> dict[tuple[str, int], str]:
    """(scenario, seed) -> link to the episode's video, for the recorded episodes. The videos are copied
    into the report's own videos/ folder, so the links work wherever the report folder is opened."""
    links = {}
    for _, e in series.episodes.iterrows():
        path = RunDir(series.run_path).video_path(e.agent, e.scenario, int(e.seed))
        if path.is_file():
            copy = out_dir / "videos" / series.run_path.name / path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
            links[(e.scenario, int(e.seed))] = copy.relative_to(out_dir).as_posix()
    return links


# -- writers --------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:1.6em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px} h3{margin:1.2em 0 4px}
table{border-collapse:collapse;margin:8px 0;font-size:0.88em} th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f2f2f2;font-weight:600;max-width:8em;vertical-align:bottom} td{white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums} td.na{color:#999;text-align:center}
td[data-col=agent],td[data-col=run]{white-space:normal;overflow-wrap:anywhere;min-width:9em;max-width:19em}
td.worse{color:#b00;font-weight:600} td.better{color:#060;font-weight:600}
.scroll{overflow-x:auto;max-width:100%}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:18px 24px;align-items:start}
figure{margin:0} figure.wide{grid-column:1/-1} figcaption{font-size:0.85em;color:#444;max-width:860px}
figcaption b{color:#222} img.plot{max-width:100%;height:auto;border:1px solid #eee}
.note{color:#666;font-size:0.88em;max-width:1100px} .swatch{display:inline-block;width:.8em;height:.8em;
border-radius:2px;margin-right:4px;vertical-align:-1px}
.failed{color:#b00} video{display:block;max-width:320px;margin-top:2px}
"""
# Lets a headless browser check report what it rendered, as data-* attributes of <body>: the plots it
# decoded, the tables wider than their container (ids), whether the page scrolls sideways, and per
# video its readyState and duration once its metadata loaded (or it failed).
SCRIPT = """
window.addEventListener('load', function () {
  var b = document.body.dataset;
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.plot'));
  b.imagesLoaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  b.imagesTotal = imgs.length;
  var tables = Array.prototype.slice.call(document.querySelectorAll('table'));
  b.tablesTotal = tables.length;
  b.tablesOverflowing = tables.filter(function (t) {
    var box = t.parentElement;
    return t.getBoundingClientRect().width > box.clientWidth + 1 || box.scrollWidth > box.clientWidth + 1;
  }).map(function (t) { return t.id || t.className || 'table'; }).join(' ');
  b.pageScrollWidth = document.documentElement.scrollWidth;
  b.pageClientWidth = document.documentElement.clientWidth;
  var vids = Array.prototype.slice.call(document.querySelectorAll('video'));
  function videos() {
    b.videos = vids.map(function (v) {
      return v.readyState + ':' + v.duration + ':' + (v.error ? v.error.code : 0);
    }).join(' ');
  }
  vids.forEach(function (v) {
    ['loadedmetadata', 'loadeddata', 'error'].forEach(function (e) { v.addEventListener(e, videos); });
  });
  videos();
});
"""


def write_report(run_dirs: list[str | Path], out_dir: str | Path, title: str | None = None) -> tuple[Path, Path]:
    """Write `out_dir/report.html` (self-contained) and `out_dir/report.md` (+ `plots/*.png`)."""
    if not run_dirs:
        raise ValueError("report: give at least one run")
    series = load_series(run_dirs)
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    title = title or "prunedrive report: " + ", ".join(dict.fromkeys(s.run for s in series))
    diffs = dense_differences(series)
    palette = Palette(series)
    plots = [plot_sparsity(series, diffs, palette), plot_cost(series, palette),
             plot_cost(series, palette, "agent_ms_p50"), plot_infractions(series, palette), plot_kinds(series, palette)]
    claims = load_claims(series)
    claim_plots = [p for c in claims for p in (plot_claims(c), plot_sensitivity(c))]
    for plot in plots + claim_plots:
        if plot.png:
            (out_dir / "plots" / f"{plot.name}.png").write_bytes(plot.png)
    report = Content(title, datetime.now().isoformat(timespec="seconds"), series, *comparison_table(series, diffs),
                     open_loop_table(series), kind_table(series), plots,
                     {s.label: videos(s, out_dir) for s in series}, palette, dense_baseline(series), claims,
                     claim_plots)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(_html(report))
    md_path.write_text(_markdown(report))
    return html_path, md_path


@dataclass
class Content:
    title: str
    created: str
    series: list[Series]
    columns: list[tuple[str, str]]
    rows: list[dict[str, str]]
    open_loop: tuple[list[tuple[str, str]], list[dict[str, str]]]
    kinds: pd.DataFrame
    plots: list[Plot]
    links: dict[str, dict]
    palette: Palette
    dense: Series | None
    claims: list[Claims] = field(default_factory=list)
    claim_plots: list[Plot] = field(default_factory=list)


def _runs_text(series: list[Series]) -> list[tuple[str, str]]:
    out = {}
    for s in series:
        manifest = RunDir(s.run_path).manifest()
        config = manifest.get("config") or {}
        out[s.run] = (f"suite {config.get('suite', '?')}, agents {', '.join(config.get('agents') or [])}, "
                      f"created {manifest.get('created', '?')}, {s.run_path}")
    return list(out.items())


def _episode_rows(s: Series, links: dict) -> list[list[str]]:
    rows = []
    for _, e in s.episodes.sort_values(["scenario", "seed"]).iterrows():
        rows.append([e.scenario, e.kind, str(int(e.seed)), e.status, f"{e.driving_score:.1f}",
                     f"{e.route_completion:.1f}", f"{e.infraction_penalty:.3f}", str(int(e.collisions)),
                     links.get((e.scenario, int(e.seed)), "")])
    return rows


EPISODE_HEADER = ["scenario", "kind", "seed", "status", "DS", "RC", "IP", "collisions", "video"]
TEXT_COLUMNS = ("agent", "run", "method", "verdict")


def _notes(c: Content) -> tuple[str, str]:
    driving = ("n: episodes. DS: driving score = route completion × infraction penalty (CARLA Leaderboard 2.0); "
               "DS and RC: mean ± standard error over episodes.")
    if c.dense is not None:
        driving += (f" ΔDS vs dense: mean over episodes of (agent DS − {c.dense.label} DS) on the same scenario and "
                    f"seed, with its 95% paired-bootstrap CI; verdict: better / worse when the CI excludes 0, "
                    f"\"n too small\" below {MIN_PAIRS_FOR_VERDICT} pairs.")
    else:
        driving += " No dense baseline (an agent whose method is \"dense\"), hence no differences to it."
    present = {column for column, _ in c.columns}
    cost = []
    if "sparsity" in present:
        cost.append("Sparsity: the pruning target.")
    if "effective_gflops" in present or "executed_gflops" in present:
        cost.append("Effective FLOPs count the non-zero weights, executed FLOPs the weights the installed kernels "
                    "multiply (all of them on a dense path); both are deterministic.")
    cost.append("Agent time per step: median over episodes of each episode's p50, p95 the worst episode's p95; wall "
                "time depends on the machine and its load (other processes, thread count), so compare it only "
                "within one run.")
    return driving, " ".join(cost)


def _html_table(table_id: str, columns, rows, classes=None) -> list[str]:
    e = html.escape
    out = [f"<div class='scroll'><table id='{table_id}'><thead><tr>"]
    out += [f"<th>{e(header)}</th>" for _, header in columns]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append(f"<tr data-agent='{e(row['agent'], quote=True)}'>")
        for column, _ in columns:
            text = row.get(column)
            cls = "na" if text is None else "" if column in TEXT_COLUMNS else "num"
            if column == "verdict" and text in ("worse", "better"):
                cls = text
            swatch = ""
            if column == "agent" and classes and row["agent"] in classes:
                swatch = f"<span class='swatch' style='background:{classes[row['agent']]}'></span>"
            cls_attr = f" class='{cls}'" if cls else ""
            out.append(f"<td data-col='{column}'{cls_attr}>{swatch}{e(text if text is not None else '–')}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return out


def _html_plot(plot: Plot) -> str:
    e = html.escape
    wide = " class='wide'" if plot.wide else ""
    if not plot.png:
        return f"<figure{wide}><p class='note' id='plot-{plot.name}'>{e(plot.title)}: {e(plot.note)}</p></figure>"
    data = base64.b64encode(plot.png).decode()
    return (f"<figure{wide}><img class='plot' id='plot-{plot.name}' alt='{e(plot.title)}' "
            f"src='data:image/png;base64,{data}'><figcaption><b>{e(plot.title)}.</b> {e(plot.note)}</figcaption>"
            f"</figure>")


def _html(c: Content) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(c.title)}</title>",
           f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>", f"<h1>{e(c.title)}</h1>",
           f"<p>generated {e(c.created)}</p><ul>"]
    out += [f"<li><b>{e(run)}</b>: {e(text)}</li>" for run, text in _runs_text(c.series)]
    out.append("</ul><h2>Comparison</h2>")
    driving, cost = split_table(c.columns)
    swatches = {s.label: c.palette.of(s) for s in c.series}
    notes = _notes(c)
    out.append("<h3>Driving</h3>")
    out += _html_table("comparison", driving, c.rows, swatches)
    out.append(f"<p class='note'>{e(notes[0])}</p>")
    if cost:
        out.append("<h3>Cost</h3>")
        out += _html_table("cost", cost, c.rows, swatches)
        out.append(f"<p class='note'>{e(notes[1])}</p>")
    columns, rows = c.open_loop
    if rows:
        out.append("<h3>Open-loop errors</h3>")
        out += _html_table("open-loop", columns, rows, swatches)
        out.append(f"<p class='note'>{e(OPEN_LOOP_NOTE)}</p>")
    out.append("<h2>Plots</h2>")
    if c.palette.methods:
        out.append("<p class='note'>Colours: one per pruning method on the whole page: "
                   + ", ".join(f"<span class='swatch' style='background:{colour}'></span>{e(method)}"
                               for method, colour in c.palette.methods.items())
                   + "; grey: agents without a model.</p>")
    out.append("<div class='plots'>")
    out += [_html_plot(plot) for plot in c.plots]
    out.append("</div>")
    for claims in c.claims:
        out.append(f"<h2>The seeds' claims ({e(claims.run)})</h2>")
        out += _html_table(f"claims-{claims.run}", CLAIMS_COLUMNS, claims_rows(claims))
        out.append(f"<p class='note'>{e(CLAIMS_NOTE)}</p>")
        if claims.sensitivity is not None:
            out += _html_table(f"sensitivity-{claims.run}", SENSITIVITY_COLUMNS, sensitivity_rows(claims))
            out.append(f"<p class='note'>{e(SENSITIVITY_NOTE)}</p>")
        out.append("<div class='plots'>")
        out += [_html_plot(plot) for plot in c.claim_plots if plot.name.endswith(f"_{claims.run}")]
        out.append("</div>")
    out.append("<h2>Driving score per scenario kind</h2><div class='scroll'><table id='kinds'><thead><tr>"
               "<th>agent</th>")
    out += [f"<th>{e(str(k).replace('_', ' '))}</th>" for k in c.kinds.columns]
    out.append("</tr></thead><tbody>")
    for label, values in c.kinds.iterrows():
        out.append(f"<tr><td>{e(str(label))}</td>" + "".join(
            f"<td class='na'>–</td>" if not np.isfinite(v) else f"<td class='num'>{v:.1f}</td>" for v in values)
                   + "</tr>")
    out.append("</tbody></table></div><p class='note'>mean driving score over each kind's episodes</p>"
               "<h2>Episodes</h2>")
    for s in c.series:
        out.append(f"<details{' open' if len(c.series) <= 2 else ''}><summary><b>{e(s.label)}</b> "
                   f"({len(s.episodes)} episodes)</summary><div class='scroll'><table class='episodes'><thead><tr>")
        out += [f"<th>{h}</th>" for h in EPISODE_HEADER]
        out.append("</tr></thead><tbody>")
        for cells in _episode_rows(s, c.links[s.label]):
            video = ""
            if cells[-1]:
                src = e(cells[-1], quote=True)
                video = (f"<a href='{src}'>video</a><video controls preload='metadata' src='{src}'></video>")
            cls = " class='failed'" if cells[3] == "failed" else ""
            out.append(f"<tr{cls}>" + "".join(f"<td>{e(x)}</td>" for x in cells[:-1]) + f"<td>{video}</td></tr>")
        out.append("</tbody></table></div></details>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(text):
        return str(text).replace("|", "\\|")

    return ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(esc(c) for c in row) + " |" for row in rows]


def _md_plot(plot: Plot) -> list[str]:
    return ([f"![{plot.title}](plots/{plot.name}.png)", "", plot.note] if plot.png
            else [f"*{plot.title}: {plot.note}*"]) + [""]


def _markdown(c: Content) -> str:
    out = [f"# {c.title}", "", f"generated {c.created}", ""]
    out += [f"- **{run}**: {text}" for run, text in _runs_text(c.series)]
    driving, cost = split_table(c.columns)
    notes = _notes(c)
    out += ["", "## Comparison", "", "### Driving", ""]
    out += _md_table([h for _, h in driving], [[r.get(col, "–") for col, _ in driving] for r in c.rows])
    out += ["", notes[0], ""]
    if cost:
        out += ["### Cost", ""]
        out += _md_table([h for _, h in cost], [[r.get(col, "–") for col, _ in cost] for r in c.rows])
        out += ["", notes[1], ""]
    columns, rows = c.open_loop
    if rows:
        out += ["### Open-loop errors", ""]
        out += _md_table([h for _, h in columns], [[r.get(col, "–") for col, _ in columns] for r in rows])
        out += ["", OPEN_LOOP_NOTE, ""]
    out += ["## Plots", ""]
    for plot in c.plots:
        out += _md_plot(plot)
    for claims in c.claims:
        out += [f"## The seeds' claims ({claims.run})", ""]
        rows = claims_rows(claims)
        out += _md_table([h for _, h in CLAIMS_COLUMNS], [[r[col] for col, _ in CLAIMS_COLUMNS] for r in rows])
        out += ["", CLAIMS_NOTE, ""]
        if claims.sensitivity is not None:
            rows = sensitivity_rows(claims)
            out += _md_table([h for _, h in SENSITIVITY_COLUMNS],
                             [[r[col] for col, _ in SENSITIVITY_COLUMNS] for r in rows])
            out += ["", SENSITIVITY_NOTE, ""]
        for plot in c.claim_plots:
            if plot.name.endswith(f"_{claims.run}"):
                out += _md_plot(plot)
    out += ["## Driving score per scenario kind", ""]
    out += _md_table(["agent", *(str(k) for k in c.kinds.columns)],
                     [[str(label), *("–" if not np.isfinite(v) else f"{v:.1f}" for v in values)]
                      for label, values in c.kinds.iterrows()])
    out += ["", "## Episodes", ""]
    for s in c.series:
        out += [f"### {s.label}", ""]
        out += _md_table(EPISODE_HEADER, [[*cells[:-1], f"[video]({cells[-1]})" if cells[-1] else ""]
                                          for cells in _episode_rows(s, c.links[s.label])])
        out.append("")
    return "\n".join(out)
