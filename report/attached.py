"""The sections a run's attachments bring (harness.results.RunDir.attach): each attachment that names a `section`
renderer ("module:function") is rendered by it; the report knows neither the attachment nor what it holds.

A run written before attachments existed has none: its report has the comparison tables, plots, per-kind table
and episodes, without the sections its command would attach today (bench's open-loop errors, the claims)."""
from __future__ import annotations

from prunedrive.harness.results import RunDir
from prunedrive.plugins.registry import load_reference
from prunedrive.report.data import ReportContext, Series
from prunedrive.report.section import Section


def attached_sections(series: list[Series]) -> list[Section]:
    """The sections of every run's attachments, runs in the report's order, attachments in the order attached.
    A renderer returns a Section, or None when its attachment has nothing to show for these series."""
    sections = []
    for run_path in dict.fromkeys(s.run_path for s in series):
        for attachment in RunDir(run_path).attachments().values():
            if attachment.section is None:
                continue
            render = load_reference(attachment.section, f"{attachment.path}: section renderer of {attachment.name!r}")
            section = render(attachment.load(), ReportContext(series, run_path))
            if section is not None and not isinstance(section, Section):
                raise TypeError(f"{attachment.section} (section of {attachment.path}) returned "
                                f"{type(section).__name__}, not a prunedrive.report.section.Section or None")
            if section is not None:
                sections.append(section)
    return sections
