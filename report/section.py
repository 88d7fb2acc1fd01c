"""What a report section is: the contract between the report and the modules that attach data to a run.

A producer (bench, claims) attaches its data to the run with a `section` reference ("module:function"); the report
loads that function and calls it as `render(payload, context) -> Section`, where `payload` is the attachment's
content (a DataFrame or a JSON value) and `context` a `report.data.ReportContext` (the loaded runs, and the run the
attachment belongs to). The report places the Section's tables, plots and notes; it knows nothing of its content.

A run directory is input, so what it names is not trusted: the report imports a renderer only from prunedrive's
own modules or from a module a plug-in registered under the entry point group `prunedrive.report_sections`
(`mysections = "my_pkg.sections:render"` registers the module my_pkg.sections), and calls it only when it is marked
with `@section_renderer`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

RENDERER_GROUP = "prunedrive.report_sections"


def section_renderer(render: Callable) -> Callable:
    """Mark a function as a report section renderer: the only kind of function an attachment can make the report call."""
    render.renders_report_section = True
    return render


@dataclass
class Table:
    """columns: (key, header) in order; rows: {key: text} (a missing key prints "–"); a row's "agent" key, when it
    has one, tags the HTML row (data-agent). caption: printed under the table."""

    columns: list[tuple[str, str]]
    rows: list[dict[str, str]]
    caption: str = ""
    id: str = ""  # the HTML table's id; empty: derived from the section's title


@dataclass
class Plot:
    """A PNG and what it shows. png None: the plot was skipped (caption says why). wide: spans the page."""

    name: str
    title: str
    png: bytes | None
    caption: str = ""
    wide: bool = False


@dataclass
class Section:
    """title, tables, plots and notes: placed on the page as a section of its own (a section without any of them
    is not). agent_cells: {agent label: {comparison column: text}}, cells of the comparison table's rows that the
    producer knows better than the agent's model card (bench: each checkpoint's bytes against the dense model's);
    they replace the row's cells read from the card."""

    title: str
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    agent_cells: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def placed(self) -> bool:
        """True when the section has something of its own to show on the page."""
        return bool(self.title and (self.tables or self.plots or self.notes))
