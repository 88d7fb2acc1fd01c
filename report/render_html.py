"""The report as one self-contained HTML page: every plot embedded as a base64 PNG (the file can be mailed or
attached to CI as is), the episode videos linked from the report's own videos/ folder."""
from __future__ import annotations

import base64
import html
import re

import numpy as np

from prunedrive.report.content import EPISODE_HEADER, Content, comparison_notes, episode_rows, runs_text
from prunedrive.report.section import Plot, Section
from prunedrive.report.tables import split_table

TEXT_COLUMNS = ("agent", "run", "method", "verdict")

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


def html_table(table_id: str, columns, rows, classes=None) -> list[str]:
    e = html.escape
    out = [f"<div class='scroll'><table id='{table_id}'><thead><tr>"]
    out += [f"<th>{e(header)}</th>" for _, header in columns]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append(f"<tr data-agent='{e(row['agent'], quote=True)}'>" if "agent" in row else "<tr>")
        for column, _ in columns:
            text = row.get(column)
            cls = "na" if text is None else "" if column in TEXT_COLUMNS else "num"
            if column == "verdict" and text in ("worse", "better"):
                cls = text
            swatch = ""
            if column == "agent" and classes and row.get("agent") in classes:
                swatch = f"<span class='swatch' style='background:{classes[row['agent']]}'></span>"
            cls_attr = f" class='{cls}'" if cls else ""
            out.append(f"<td data-col='{column}'{cls_attr}>{swatch}{e(text if text is not None else '–')}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return out


def html_plot(plot: Plot) -> str:
    e = html.escape
    wide = " class='wide'" if plot.wide else ""
    if not plot.png:
        return f"<figure{wide}><p class='note' id='plot-{plot.name}'>{e(plot.title)}: {e(plot.caption)}</p></figure>"
    data = base64.b64encode(plot.png).decode()
    return (f"<figure{wide}><img class='plot' id='plot-{plot.name}' alt='{e(plot.title)}' "
            f"src='data:image/png;base64,{data}'><figcaption><b>{e(plot.title)}.</b> {e(plot.caption)}</figcaption>"
            f"</figure>")


def html_section(section: Section) -> list[str]:
    """A section a run's attachment rendered (report.section): its title, tables with their captions, notes and
    plots."""
    e = html.escape
    out = [f"<h2>{e(section.title)}</h2>"]
    for i, table in enumerate(section.tables):
        out += html_table(table.id or f"{_slug(section.title)}-{i}", table.columns, table.rows)
        if table.caption:
            out.append(f"<p class='note'>{e(table.caption)}</p>")
    out += [f"<p class='note'>{e(note)}</p>" for note in section.notes]
    if section.plots:
        out.append("<div class='plots'>")
        out += [html_plot(plot) for plot in section.plots]
        out.append("</div>")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def render_html(c: Content) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(c.title)}</title>",
           f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>", f"<h1>{e(c.title)}</h1>",
           f"<p>generated {e(c.created)}</p><ul>"]
    out += [f"<li><b>{e(run)}</b>: {e(text)}</li>" for run, text in runs_text(c.series)]
    out.append("</ul><h2>Comparison</h2>")
    driving, cost = split_table(c.columns)
    swatches = {s.label: c.palette.of(s) for s in c.series}
    notes = comparison_notes(c)
    out.append("<h3>Driving</h3>")
    out += html_table("comparison", driving, c.rows, swatches)
    out.append(f"<p class='note'>{e(notes[0])}</p>")
    if cost:
        out.append("<h3>Cost</h3>")
        out += html_table("cost", cost, c.rows, swatches)
        out.append(f"<p class='note'>{e(notes[1])}</p>")
    out.append("<h2>Plots</h2>")
    if c.palette.methods:
        out.append("<p class='note'>Colours: one per pruning method on the whole page: "
                   + ", ".join(f"<span class='swatch' style='background:{colour}'></span>{e(method)}"
                               for method, colour in c.palette.methods.items())
                   + "; grey: agents without a model.</p>")
    out.append("<div class='plots'>")
    out += [html_plot(plot) for plot in c.plots]
    out.append("</div>")
    for section in c.sections:
        out += html_section(section)
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
        for cells in episode_rows(s, c.links[s.label]):
            video = ""
            if cells[-1]:
                src = e(cells[-1], quote=True)
                video = (f"<a href='{src}'>video</a><video controls preload='metadata' src='{src}'></video>")
            cls = " class='failed'" if cells[3] == "failed" else ""
            out.append(f"<tr{cls}>" + "".join(f"<td>{e(x)}</td>" for x in cells[:-1]) + f"<td>{video}</td></tr>")
        out.append("</tbody></table></div></details>")
    out.append("</body></html>")
    return "\n".join(out)

