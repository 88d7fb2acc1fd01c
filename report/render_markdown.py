"""The report as Markdown: the same tables and notes as the HTML page, the plots linked as plots/<name>.png
(written beside it by report.write), the videos linked from the report's videos/ folder."""
from __future__ import annotations

import numpy as np

from prunedrive.report.content import EPISODE_HEADER, Content, comparison_notes, episode_rows, runs_text
from prunedrive.report.section import Plot, Section
from prunedrive.report.tables import split_table


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(text):
        return str(text).replace("|", "\\|")

    return ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(esc(c) for c in row) + " |" for row in rows]


def md_rows(columns: list[tuple[str, str]], rows: list[dict[str, str]]) -> list[str]:
    """A table of {column: text} rows ("–" for a missing cell) under its headers."""
    return md_table([h for _, h in columns], [[r.get(col, "–") for col, _ in columns] for r in rows])


def md_plot(plot: Plot) -> list[str]:
    return ([f"![{plot.title}](plots/{plot.name}.png)", "", plot.caption] if plot.png
            else [f"*{plot.title}: {plot.caption}*"]) + [""]


def md_section(section: Section) -> list[str]:
    """A section a run's attachment rendered (report.section)."""
    out = [f"## {section.title}", ""]
    for table in section.tables:
        out += md_rows(table.columns, table.rows)
        out += ["", table.caption, ""] if table.caption else [""]
    for note in section.notes:
        out += [note, ""]
    for plot in section.plots:
        out += md_plot(plot)
    return out


def render_markdown(c: Content) -> str:
    out = [f"# {c.title}", "", f"generated {c.created}", ""]
    out += [f"- **{run}**: {text}" for run, text in runs_text(c.series)]
    driving, cost = split_table(c.columns)
    notes = comparison_notes(c)
    out += ["", "## Comparison", "", "### Driving", ""]
    out += md_rows(driving, c.rows)
    out += ["", notes[0], ""]
    if cost:
        out += ["### Cost", ""]
        out += md_rows(cost, c.rows)
        out += ["", notes[1], ""]
    out += ["## Plots", ""]
    for plot in c.plots:
        out += md_plot(plot)
    for section in c.sections:
        out += md_section(section)
    out += ["## Driving score per scenario kind", ""]
    out += md_table(["agent", *(str(k) for k in c.kinds.columns)],
                    [[str(label), *("–" if not np.isfinite(v) else f"{v:.1f}" for v in values)]
                     for label, values in c.kinds.iterrows()])
    out += ["", "## Episodes", ""]
    for s in c.series:
        out += [f"### {s.label}", ""]
        out += md_table(EPISODE_HEADER, [[*cells[:-1], f"[video]({cells[-1]})" if cells[-1] else ""]
                                         for cells in episode_rows(s, c.links[s.label])])
        out.append("")
    return "\n".join(out)
