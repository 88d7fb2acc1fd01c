"""A report over one or more runs: a self-contained HTML page and a Markdown file.

    prunedrive report RUN [RUN ...] [--report-dir DIR]   # default results/reports/<first run>
    write_report([run_dir, ...], out_dir) -> (report.html, report.md)

The question it answers: how much does pruning cost at each sparsity, per method. Content:

- Two comparison tables (report.tables), one row per agent of each run, sorted dense baseline first, then by
  method and sparsity, reference agents (expert, baselines without a model) last. The metrics are those of
  `harness.metrics`' report view, split by its `cost` flag:
  * driving: n (episodes), driving score and route completion as mean ± standard error, the paired
    driving-score difference to the dense baseline with its 95% bootstrap CI and a verdict
    (`harness.paired.compare_to_baseline`; the dense baseline is the agent whose method is "dense";
    without one there is no difference column), infraction penalty, infractions and collisions per km,
    success rate;
  * cost: method, target sparsity, the checkpoint's bytes on disk, non-zero parameters, effective and executed
    GFLOPs per step, agent wall time per step (p50, p95; it depends on the machine and its load).
  "–" marks what does not apply.
- Plots (report.plots), one colour per method the runs name on the whole page (dense black, reference agents
  grey): the DS difference to dense vs sparsity per method (95% CI error bars), cost vs DS (effective GFLOPs per
  step vs mean DS ± SE, and the measured step time vs DS), infractions per km (a heatmap agents x infraction
  kinds, values in the cells), DS per scenario kind.
- The sections the runs' attachments render (report.attached): `prunedrive bench` attaches its open-loop
  errors, `prunedrive claims` its claims with their sensitivity table and plots.
- Per-episode tables with the episode videos (`<video>` and a link) when the run was recorded.

The HTML embeds every plot as a base64 PNG; the Markdown links the same PNGs written under `plots/` next to
it. Videos live in the report's own `videos/` folder, where the recorded episodes' WebM videos are copied.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prunedrive.report.attached import attached_sections
from prunedrive.report.content import Content, videos
from prunedrive.report.data import dense_baseline, dense_differences, load_series
from prunedrive.report.palette import Palette
from prunedrive.report.plots import plot_cost, plot_infractions, plot_kinds, plot_sparsity
from prunedrive.report.render_html import render_html
from prunedrive.report.render_markdown import render_markdown
from prunedrive.report.tables import comparison_table, kind_table


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
    sections = attached_sections(series)
    known = {label: cells for section in sections for label, cells in section.agent_cells.items()}
    sections = [section for section in sections if section.placed]
    for plot in plots + [plot for section in sections for plot in section.plots]:
        if plot.png:
            (out_dir / "plots" / f"{plot.name}.png").write_bytes(plot.png)
    report = Content(title, datetime.now().isoformat(timespec="seconds"), series,
                     *comparison_table(series, diffs, known),
                     kind_table(series), plots, {s.label: videos(s, out_dir) for s in series}, palette,
                     dense_baseline(series), sections)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(render_html(report))
    md_path.write_text(render_markdown(report))
    return html_path, md_path
