"""A report over one or more runs: a self-contained HTML page and a Markdown file.

    prunedrive report RUN [RUN ...] [--out-dir DIR]   # default results/reports/<first run>
    write_report([run_dir, ...], out_dir) -> (report.html, report.md)

Content: a comparison table (one row per agent of each run: driving score, route completion,
infraction penalty, infractions and collisions per km, success rate, per-step agent time p50/p95 and,
where the agents report them, effective FLOPs per step, non-zero parameters, sparsity and pruning
method; a column shows only when some row has it), then plots (matplotlib, Agg, no display):
driving score vs sparsity per pruning method, driving score vs per-step agent time (the
accuracy-cost frontier), infractions per km by kind (stacked), driving score per scenario kind; then
per-episode tables with links to the episode videos when the run was recorded.

The HTML embeds every plot as a base64 PNG (the file can be mailed or attached to CI as is); the
Markdown links the same PNGs written under `plots/` next to it. Video links are relative paths from
the report to `<run>/videos/*.mp4`.

Sparsity and method of an agent come from the run manifest's config (`sparsity`, `method`: a value,
or a mapping agent -> value) or, for a model-backed agent, from its model directory's `sparsity.json`
({"global": ..., "method": ...}, written by `prunedrive prune`); a model directory without one is the
dense model (sparsity 0). Agents with neither are left out of the sparsity plot, which is skipped,
with a note, when no agent has one.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.harness.results import RunDir, episode_key
from prunedrive.harness.summary import INFRACTIONS, summarize

NON_MODEL_AGENTS = ("expert", "constant", "random")


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


# (column id, header, summary key or callable, format)
COLUMNS = [
    ("episodes", "episodes", "episodes", "{:.0f}"),
    ("driving_score", "driving score", ("driving_score_mean", "driving_score_std"), "pm1"),
    ("route_completion", "route completion", ("route_completion_mean", "route_completion_std"), "pm1"),
    ("infraction_penalty", "infraction penalty", ("infraction_penalty_mean", "infraction_penalty_std"), "pm3"),
    ("infractions_per_km", "infractions/km", "infractions_per_km", "{:.2f}"),
    ("collisions_per_km", "collisions/km", "collisions_per_km", "{:.2f}"),
    ("success_rate", "success %", "success_rate", "{:.0f}"),
    ("agent_ms_p50", "agent ms/step p50", "agent_wall_ms_p50", "{:.2f}"),
    ("agent_ms_p95", "agent ms/step p95", "agent_wall_ms_p95", "{:.2f}"),
    ("effective_gflops", "effective GFLOPs/step", "effective_gflops", "{:.3g}"),
    ("nonzero_params", "non-zero params", "nonzero_params", "params"),
    ("sparsity", "sparsity %", "sparsity_pct", "{:.1f}"),
    ("method", "method", "method", "{}"),
]


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
            summary["infractions_per_km"] = float(sum(summary[f"{kind}_per_km"] for kind in INFRACTIONS))
            if "effective_flops_mean" in group and group["effective_flops_mean"].notna().any():
                summary["effective_gflops"] = float(group["effective_flops_mean"].mean()) / 1e9
            if "nonzero_params" in group and not group["nonzero_params"].notna().any():
                summary.pop("nonzero_params", None)
            label = agent if agent_runs[agent] == 1 else f"{agent} [{path.name}]"  # same agent in several runs
            s = Series(label, agent, path.name, path, group.reset_index(drop=True), summary)
            s.sparsity, s.method = _sparsity(agent, group, config)
            if s.sparsity is not None:
                summary["sparsity_pct"] = 100 * s.sparsity
            if s.method is not None:
                summary["method"] = s.method
            series.append(s)
    return series


def _sparsity(agent: str, episodes: pd.DataFrame, config: dict) -> tuple[float | None, str | None]:
    def per_agent(value):
        return value.get(agent) if isinstance(value, dict) else value

    sparsity, method = per_agent(config.get("sparsity")), per_agent(config.get("method"))
    if sparsity is not None:
        return float(sparsity), (str(method) if method is not None else None)
    model = per_agent(config.get("models")) if isinstance(config.get("models"), dict) else None
    model_backed = agent not in NON_MODEL_AGENTS and (
        agent.startswith("llm") or ("params" in episodes and episodes["params"].notna().any()))
    if model is None and model_backed:
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

def _cell(summary: dict, key, fmt: str) -> str | None:
    if isinstance(key, tuple):
        mean, std = summary.get(key[0], np.nan), summary.get(key[1], np.nan)
        if not np.isfinite(mean):
            return None
        digits = int(fmt[2:])
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if np.isfinite(std) else "")
    value = summary.get(key)
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return None
    if fmt == "params":
        return _human(float(value))
    return fmt.format(value)


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def comparison_table(series: list[Series]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(columns present, rows): rows map column id -> formatted text; a column shows only when some row has it."""
    rows = []
    for s in series:
        row = {"agent": s.label, "run": s.run}
        for column, _, key, fmt in COLUMNS:
            text = _cell(s.summary, key, fmt)
            if text is not None:
                row[column] = text
        rows.append(row)
    runs = [("run", "run")] if len({s.run for s in series}) > 1 else []  # one run: named above the table
    present = [("agent", "agent")] + runs + [(c, h) for c, h, _, _ in COLUMNS if any(c in r for r in rows)]
    return present, rows


def kind_table(series: list[Series]) -> pd.DataFrame:
    frame = pd.concat([s.episodes.assign(series=s.label) for s in series])
    return frame.pivot_table(index="kind", columns="series", values="driving_score", aggfunc="mean",
                             sort=False)[[s.label for s in series]]


def videos(series: Series, out_dir: Path) -> dict[tuple[str, int], str]:
    """(scenario, seed) -> relative link to the episode's video, for the recorded episodes."""
    links = {}
    for _, e in series.episodes.iterrows():
        path = series.run_path / "videos" / f"{episode_key(e.agent, e.scenario, int(e.seed))}.mp4"
        if path.is_file():
            links[(e.scenario, int(e.seed))] = Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()
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
            video = f"<a href='{e(cells[-1], quote=True)}'>mp4</a>" if cells[-1] else ""
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
        out += _md_table(EPISODE_HEADER, [[*cells[:-1], f"[mp4]({cells[-1]})" if cells[-1] else ""]
                                          for cells in _episode_rows(s, links[s.label])])
        out.append("")
    return "\n".join(out)


# -- CLI ------------------------------------------------------------------------------------------

def add_report_parser(sub) -> None:
    parser = sub.add_parser("report", help="HTML + Markdown report comparing runs (tables, plots, videos)")
    parser.add_argument("runs", nargs="+", help="run ids (under --out) or directories")
    parser.add_argument("--out", default="results", help="where run ids are looked up; default results/")
    parser.add_argument("--out-dir", help="where the report goes; default <out>/reports/<first run>[+N]")
    parser.add_argument("--title", help="page title")
    parser.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    paths = []
    for run in args.runs:
        path = Path(run)
        if not (path / "manifest.json").is_file():
            path = Path(args.out) / run
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"{run}: no run directory with a manifest.json (looked in {run} and {path})")
        paths.append(path)
    # Beside the runs, not in the working tree: reports are outputs, like the runs they are made from.
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.out) / "reports" / (
        paths[0].name + (f"+{len(paths) - 1}" if len(paths) > 1 else ""))
    html_path, md_path = write_report(paths, out_dir, title=args.title)
    print(f"report: {html_path}\n        {md_path}")
    return 0
