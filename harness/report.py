"""A report over one or more runs: a self-contained HTML page and a Markdown file.

    prunedrive report RUN [RUN ...] [--out-dir DIR]   # default results/reports/<first run>
    write_report([run_dir, ...], out_dir) -> (report.html, report.md)

Content: a comparison table (one row per agent of each run: driving score, route completion,
infraction penalty, infractions and collisions per km, success rate, per-step agent time p50/p95 and,
where the agents report them, effective FLOPs per step, non-zero parameters, sparsity and pruning
method; a column shows only when some row has it; the metrics and their headers are
`harness.metrics`' report view), then plots (matplotlib, Agg, no display):
driving score vs sparsity per pruning method, driving score vs per-step agent time (the
accuracy-cost frontier), infractions per km by kind (stacked), driving score per scenario kind; then
per-episode tables with links to the episode videos when the run was recorded.

The HTML embeds every plot as a base64 PNG (the file can be mailed or attached to CI as is); the
Markdown links the same PNGs written under `plots/` next to it. Video links point into
the report's own `videos/` folder, where the recorded episodes' WebM videos are copied.

Sparsity and method of an agent come from the run manifest's config (`sparsity`, `method`: a value,
or a mapping agent -> value) or, for a model-backed agent (one whose episodes report a model's compute:
params, non-zero params or effective FLOPs; its name does not matter), from its model directory's `sparsity.json`
({"global": ..., "method": ...}, written by `prunedrive prune`); a model directory without one is the
dense model (sparsity 0). Agents with neither are left out of the sparsity plot, which is skipped,
with a note, when no agent has one.
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

from prunedrive.harness.metrics import INFRACTIONS, REPORT, in_view
from prunedrive.harness.results import RunDir
from prunedrive.harness.summary import summarize

# Episode columns only a model-backed agent fills (harness.compute leaves them NaN for any other agent):
# whether an agent runs a model is read from its data, not from its name (plug-in agents have any name).
MODEL_COMPUTE_COLUMNS = ("params", "nonzero_params", "effective_flops_mean")


@dataclass
class Series:
    """One agent of one run: a row of the comparison table, a point or bar in each plot."""

    label: str
    agent: str
    run: str
    run_path: Path
    episodes: pd.DataFrame
    summary: dict
    sparsity: float | None = None
    method: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Plot:
    name: str
    title: str
    png: bytes | None     # None: skipped
    note: str = ""


# The comparison table: the metrics of the report view (harness.metrics), then what the report knows
# about the agent itself (manifest config or model directory): (column id, header).
AGENT_COLUMNS = [("sparsity", "sparsity %"), ("method", "method")]


def load_series(run_dirs: list[str | Path]) -> list[Series]:
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
            series.append(s)
    return series


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
        if model_dir.is_dir():
            return 0.0, method or "dense"
    return None, (str(method) if method is not None else None)


def model_backed(episodes: pd.DataFrame) -> bool:
    """True when the agent's episodes report a model's compute (some finite value in a model-only column)."""
    return any(column in episodes and np.isfinite(pd.to_numeric(episodes[column], errors="coerce")).any()
               for column in MODEL_COMPUTE_COLUMNS)


# -- plots ----------------------------------------------------------------------------------------

def _figure(width=7.0, height=4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_sparsity(series: list[Series]) -> Plot:
    title = "Driving score vs sparsity, per pruning method"
    points = [s for s in series if s.sparsity is not None]
    if not points:
        return Plot("ds_vs_sparsity", title, None, "skipped: no agent has a sparsity (manifest config `sparsity`, "
                                                   "or the model directory's sparsity.json)")
    dense = [s for s in points if s.method in (None, "dense") or s.sparsity == 0]
    methods = sorted({s.method or "unknown" for s in points if s not in dense}) or ["dense"]
    figure = _figure()
    ax = figure.add_subplot()
    for method in methods:
        members = sorted([s for s in points if (s.method or "unknown") == method and s not in dense] + dense,
                         key=lambda s: s.sparsity)
        x = [100 * s.sparsity for s in members]
        y = [s.summary["driving_score_mean"] for s in members]
        # The standard error, not the std: the std of per-episode scores (~30 points) hides every difference
        # between methods, while the question here is how well each mean is known.
        err = [np.nan_to_num(s.summary["driving_score_std"] / np.sqrt(s.summary["episodes"])) for s in members]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("driving score (mean ± standard error)")
    ax.grid(alpha=0.3)
    ax.legend(title="method")
    ax.set_title(title)
    return Plot("ds_vs_sparsity", title, _png(figure))


def plot_frontier(series: list[Series]) -> Plot:
    title = "Driving score vs per-step agent time (accuracy-cost frontier)"
    points = [s for s in series if np.isfinite(s.summary.get("agent_wall_ms_p50", np.nan))]
    if not points:
        return Plot("ds_vs_time", title, None, "skipped: no per-step agent time recorded")
    figure = _figure()
    ax = figure.add_subplot()
    x = np.array([max(s.summary["agent_wall_ms_p50"], 1e-4) for s in points])
    y = np.array([s.summary["driving_score_mean"] for s in points])
    for s, xi, yi in zip(points, x, y):  # a legend, not annotations: pruned variants crowd one spot
        ax.scatter([xi], [yi], s=50, zorder=3, label=s.label)
    order = np.lexsort((-y, x))  # by time, best score first among ties
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    ax.step(x[front], y[front], where="post", color="gray", linestyle="--", alpha=0.7, label="frontier")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log range overlap
    ax.set_xlim(x.min() / 2, x.max() * 2)
    ax.set_xlabel("agent wall time per step, p50 (ms, log)")
    ax.set_ylabel("driving score (mean)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    ax.set_title(title)
    return Plot("ds_vs_time", title, _png(figure))


def plot_infractions(series: list[Series]) -> Plot:
    title = "Infractions per km, by kind"
    figure = _figure()
    ax = figure.add_subplot()
    labels = [s.label for s in series]
    bottom = np.zeros(len(series))
    kinds = [k for k in INFRACTIONS if any(s.summary[f"{k}_per_km"] > 0 for s in series)]
    for kind in kinds:
        values = np.array([s.summary[f"{kind}_per_km"] for s in series])
        ax.bar(labels, values, bottom=bottom, label=kind.replace("_", " "))
        bottom += values
    if not kinds:
        ax.bar(labels, np.zeros(len(series)))
        ax.text(0.5, 0.5, "no infractions", transform=ax.transAxes, ha="center", va="center", fontsize=14)
    else:
        ax.legend(fontsize=8)
    ax.set_ylabel("infractions per km")
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title)
    return Plot("infractions", title, _png(figure))


def plot_kinds(series: list[Series]) -> Plot:
    title = "Driving score per scenario kind"
    kinds = list(dict.fromkeys(k for s in series for k in s.episodes["kind"]))
    figure = _figure(max(7.0, 0.9 * len(kinds) + 1.5))
    ax = figure.add_subplot()
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        means = s.episodes.groupby("kind")["driving_score"].mean()
        values = [means.get(k, np.nan) for k in kinds]
        ax.bar(np.arange(len(kinds)) + (i - (len(series) - 1) / 2) * width, values, width, label=s.label)
    ax.set_xticks(np.arange(len(kinds)), [k.replace("_", " ") for k in kinds])
    ax.set_ylabel("driving score (mean over episodes)")
    ax.set_ylim(0, 100 + 8 * (1 + (len(series) - 1) // 4))  # room for the legend above the bars
    ax.set_yticks(np.arange(0, 101, 20))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=min(len(series), 4), loc="upper center")
    ax.set_title(title)
    return Plot("per_kind", title, _png(figure))


# -- tables ---------------------------------------------------------------------------------------

def _metric_cells(summary: dict) -> dict[str, str]:
    """Column id -> text for each report metric with a finite value (NaN: the metric does not apply)."""
    cells = {}
    for m in in_view(REPORT):
        value = m.value(summary)
        if np.isfinite(value):
            cells[m.key] = m.text(value, m.spread(summary))
    return cells


def _agent_cells(s: Series) -> dict[str, str]:
    cells = {}
    if s.sparsity is not None:
        cells["sparsity"] = f"{100 * s.sparsity:.1f}"
    if s.method is not None:
        cells["method"] = str(s.method)
    return cells


def comparison_table(series: list[Series]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(columns present, rows): rows map column id -> formatted text; a column shows only when some row has it."""
    rows = [{"agent": s.label, "run": s.run, **_metric_cells(s.summary), **_agent_cells(s)} for s in series]
    runs = [("run", "run")] if len({s.run for s in series}) > 1 else []  # one run: named above the table
    columns = [(m.key, m.label) for m in in_view(REPORT)] + AGENT_COLUMNS
    present = [("agent", "agent")] + runs + [(c, h) for c, h in columns if any(c in r for r in rows)]
    return present, rows


def kind_table(series: list[Series]) -> pd.DataFrame:
    frame = pd.concat([s.episodes.assign(series=s.label) for s in series])
    return frame.pivot_table(index="kind", columns="series", values="driving_score", aggfunc="mean",
                             sort=False)[[s.label for s in series]]


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
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:1.6em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em} th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f2f2f2} td{white-space:nowrap} td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
.plots{display:flex;flex-wrap:wrap;gap:16px} figure{margin:0} figcaption{font-size:0.85em;color:#555}
img.plot{max-width:640px;border:1px solid #eee} .note{color:#777;font-style:italic}
.failed{color:#b00}
"""
# Lets a headless browser check report the images it decoded (document.body.dataset.imagesLoaded).
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.plot'));
  document.body.dataset.imagesLoaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesTotal = imgs.length;
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
    plots = [plot_frontier(series), plot_sparsity(series), plot_infractions(series), plot_kinds(series)]
    for plot in plots:
        if plot.png:
            (out_dir / "plots" / f"{plot.name}.png").write_bytes(plot.png)
    columns, rows = comparison_table(series)
    kinds = kind_table(series)
    links = {s.label: videos(s, out_dir) for s in series}
    created = datetime.now().isoformat(timespec="seconds")
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(_html(title, created, series, columns, rows, kinds, plots, links))
    md_path.write_text(_markdown(title, created, series, columns, rows, kinds, plots, links))
    return html_path, md_path


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


def _html(title, created, series, columns, rows, kinds, plots, links) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>", f"<h1>{e(title)}</h1>",
           f"<p>generated {e(created)}</p><ul>"]
    out += [f"<li><b>{e(run)}</b>: {e(text)}</li>" for run, text in _runs_text(series)]
    out.append("</ul><h2>Comparison</h2><div class='scroll'><table id='comparison'><thead><tr>")
    out += [f"<th>{e(header)}</th>" for _, header in columns]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append(f"<tr data-agent='{e(row['agent'], quote=True)}'>")
        for column, _ in columns:
            cls = "" if column in ("agent", "run", "method") else " class='num'"
            out.append(f"<td data-col='{column}'{cls}>{e(row.get(column, '–'))}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div><p class='note'>driving score = route completion × infraction penalty "
               "(CARLA Leaderboard 2.0); mean ± std over episodes. Agent time: median over episodes of each "
               "episode's p50; p95: the worst episode's p95.</p><h2>Plots</h2><div class='plots'>")
    for plot in plots:
        if plot.png:
            data = base64.b64encode(plot.png).decode()
            out.append(f"<figure><img class='plot' id='plot-{plot.name}' alt='{e(plot.title)}' "
                       f"src='data:image/png;base64,{data}'><figcaption>{e(plot.title)}</figcaption></figure>")
        else:
            out.append(f"<figure><p class='note' id='plot-{plot.name}'>{e(plot.title)}: {e(plot.note)}</p></figure>")
    out.append("</div><h2>Driving score per scenario kind</h2><table id='kinds'><thead><tr><th>kind</th>")
    out += [f"<th>{e(c)}</th>" for c in kinds.columns]
    out.append("</tr></thead><tbody>")
    for kind, values in kinds.iterrows():
        out.append(f"<tr><td>{e(str(kind))}</td>" + "".join(
            f"<td class='num'>{'–' if not np.isfinite(v) else f'{v:.1f}'}</td>" for v in values) + "</tr>")
    out.append("</tbody></table><h2>Episodes</h2>")
    for s in series:
        out.append(f"<details{' open' if len(series) <= 2 else ''}><summary><b>{e(s.label)}</b> "
                   f"({len(s.episodes)} episodes)</summary><table class='episodes'><thead><tr>")
        out += [f"<th>{h}</th>" for h in EPISODE_HEADER]
        out.append("</tr></thead><tbody>")
        for cells in _episode_rows(s, links[s.label]):
            video = f"<a href='{e(cells[-1], quote=True)}'>video</a>" if cells[-1] else ""
            cls = " class='failed'" if cells[3] == "failed" else ""
            out.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in cells[:-1]) + f"<td>{video}</td></tr>")
        out.append("</tbody></table></details>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(text):
        return str(text).replace("|", "\\|")

    return ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(esc(c) for c in row) + " |" for row in rows]


def _markdown(title, created, series, columns, rows, kinds, plots, links) -> str:
    out = [f"# {title}", "", f"generated {created}", ""]
    out += [f"- **{run}**: {text}" for run, text in _runs_text(series)]
    out += ["", "## Comparison", ""]
    out += _md_table([h for _, h in columns], [[r.get(c, "–") for c, _ in columns] for r in rows])
    out += ["", "Driving score = route completion × infraction penalty (CARLA Leaderboard 2.0); mean ± std over "
                "episodes.", "", "## Plots", ""]
    for plot in plots:
        out += [f"![{plot.title}](plots/{plot.name}.png)" if plot.png else f"*{plot.title}: {plot.note}*", ""]
    out += ["## Driving score per scenario kind", ""]
    out += _md_table(["kind", *kinds.columns], [[str(k), *("–" if not np.isfinite(v) else f"{v:.1f}" for v in vals)]
                                                for k, vals in kinds.iterrows()])
    out += ["", "## Episodes", ""]
    for s in series:
        out += [f"### {s.label}", ""]
        out += _md_table(EPISODE_HEADER, [[*cells[:-1], f"[video]({cells[-1]})" if cells[-1] else ""]
                                          for cells in _episode_rows(s, links[s.label])])
        out.append("")
    return "\n".join(out)


# -- CLI ------------------------------------------------------------------------------------------
