"""The report's plots (matplotlib, Agg, no display), each a `report.section.Plot` with a PNG: the DS difference
to dense vs sparsity per method (95% CI error bars), cost vs DS (effective GFLOPs per step vs mean DS ± SE, and the
measured step time vs DS), infractions per km (a heatmap agents x infraction kinds) and DS per scenario kind."""
from __future__ import annotations

import io

import numpy as np

from prunedrive.harness.metrics import INFRACTIONS, metric
from prunedrive.harness.paired import MIN_PAIRS_FOR_VERDICT
from prunedrive.report.data import Series, dense_baseline, model_backed
from prunedrive.report.palette import DENSE_COLOUR, Palette, markers
from prunedrive.report.section import Plot


def standard_error(s: Series, key: str = "driving_score") -> float:
    m = metric(key)
    n = s.summary.get("episodes", np.nan)
    return m.spread(s.summary) / np.sqrt(n) if n and n > 1 else np.nan


def new_figure(width=6.6, height=4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.12)
    return buffer.getvalue()


def plot_sparsity(series: list[Series], diffs: dict[str, dict], palette: Palette) -> Plot:
    name, title = "ds_vs_sparsity", "Driving-score difference to dense vs sparsity, per method"
    base = dense_baseline(series)
    points = [s for s in series if s.sparsity is not None and not s.dense and not s.reference]
    if base is None:
        return Plot(name, title, None, "skipped: no dense baseline (an agent whose method is \"dense\": a model "
                                       "directory without a model card, or `method` in the manifest config)")
    points = [s for s in points if np.isfinite(diffs.get(s.label, {}).get("diff", np.nan))]
    if not points:
        return Plot(name, title, None, "skipped: no pruned agent with a sparsity whose episodes pair with the "
                                       "dense baseline's")
    from matplotlib.lines import Line2D

    figure = new_figure(6.6, 4.6)
    ax = figure.add_subplot()
    ax.axhline(0, color=DENSE_COLOUR, linewidth=1.2, zorder=1)
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
            color=DENSE_COLOUR)
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
    return Plot(name, title, png_bytes(figure), note)


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
    figure = new_figure(6.6, 4.4 + 0.2 * ((len(points) + len(references) + 2) // 3))
    ax = figure.add_subplot()
    x = np.array([x for _, x in cost_points(series, x_key)])
    log = x.min() > 0 and x.max() / x.min() > 30
    xd = _dodge(x, log)
    marks = markers(series)
    dense = []
    for s, xi in zip(points, xd):
        y, se = s.summary["driving_score_mean"], standard_error(s)
        colour = palette.of(s) if not s.dense else DENSE_COLOUR
        ax.errorbar([xi], [y], yerr=[[np.nan_to_num(se)], [np.nan_to_num(se)]], fmt="none", ecolor=colour,
                    capsize=3, zorder=2)
        ax.scatter([xi], [y], marker=marks[s.label], s=260 if s.dense else 70, color=colour,
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
    return Plot(name, title, png_bytes(figure), note)


def plot_infractions(series: list[Series], palette: Palette) -> Plot:
    name, title = "infractions", "Infractions per km, by kind"
    kinds = [k for k in INFRACTIONS if any(s.summary.get(f"{k}_per_km", 0) > 0 for s in series)]
    columns = [*kinds, "infractions"]  # the total last
    values = np.array([[s.summary.get(f"{k}_per_km", np.nan) for k in columns] for s in series], float)
    figure = new_figure(max(5.0, 2.6 + 1.1 * len(columns)), 1.4 + 0.4 * len(series))
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
    return Plot(name, title, png_bytes(figure), note)


def plot_kinds(series: list[Series], palette: Palette) -> Plot:
    name, title = "per_kind", "Driving score per scenario kind"
    kinds = list(dict.fromkeys(k for s in series for k in s.episodes["kind"]))
    figure = new_figure(min(max(8.0, 1.6 + len(kinds) * (0.22 * len(series) + 0.4)), 13.0), 4.2)
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
    return Plot(name, title, png_bytes(figure), note, wide=True)


