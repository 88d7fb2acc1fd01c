"""The sections a run's attachments bring (harness.results.RunDir.attach): each attachment that names a `section`
renderer ("module:function") is rendered by it; the report knows neither the attachment nor what it holds.

The reference comes from a run directory, which may come from anyone: only prunedrive's modules and the modules of
registered plug-ins (report.section.RENDERER_GROUP) are imported, and only functions marked `@section_renderer` are
called. A renderer that cannot be loaded or fails leaves a note in its place (and on stderr): the rest of the report
is still written.

A run written before attachments existed has none: its report has the comparison tables, plots, per-kind table
and episodes, without the sections its command would attach today (bench's open-loop errors, the claims)."""
from __future__ import annotations

import sys
from importlib import metadata

from prunedrive.harness.results import RunDir
from prunedrive.plugins.registry import RegistryError, load_reference
from prunedrive.report.data import ReportContext, Series
from prunedrive.report.section import RENDERER_GROUP, Section


def _allowed_module(module: str) -> bool:
    if module == "prunedrive" or module.startswith("prunedrive."):
        return True
    return module in {entry.module for entry in metadata.entry_points(group=RENDERER_GROUP)}


def load_renderer(reference: str, where: str):
    """The renderer `reference` names, if it may be called (RegistryError naming `where` otherwise)."""
    module = reference.partition(":")[0]
    if not _allowed_module(module):
        raise RegistryError(f"{where}: {reference!r} is not a renderer the report may import: only prunedrive's modules "
                            f"and modules registered under the entry point group {RENDERER_GROUP!r}")
    render = load_reference(reference, where)
    if not getattr(render, "renders_report_section", False):
        raise RegistryError(f"{where}: {reference!r} is not marked as a section renderer "
                            "(prunedrive.report.section.section_renderer)")
    return render


def _render(attachment, series: list[Series], run_path) -> Section | None:
    where = f"{attachment.path}: section renderer of {attachment.name!r}"
    render = load_renderer(attachment.section, where)
    section = render(attachment.load(), ReportContext(series, run_path))
    if section is not None and not isinstance(section, Section):
        raise TypeError(f"{attachment.section} (section of {attachment.path}) returned "
                        f"{type(section).__name__}, not a prunedrive.report.section.Section or None")
    return section


def attached_sections(series: list[Series]) -> list[Section]:
    """The sections of every run's attachments, runs in the report's order, attachments in the order attached.
    A renderer returns a Section, or None when its attachment has nothing to show for these series."""
    sections = []
    for run_path in dict.fromkeys(s.run_path for s in series):
        for attachment in RunDir(run_path).attachments().values():
            if attachment.section is None:
                continue
            try:
                section = _render(attachment, series, run_path)
            except Exception as exc:  # one producer's renderer must not cost the whole report
                message = f"the {attachment.name!r} attachment of {run_path} was not rendered: {type(exc).__name__}: {exc}"
                print(f"warning: {message}", file=sys.stderr)
                section = Section(f"{attachment.name} (not rendered)", notes=[message])
            if section is not None:
                sections.append(section)
    return sections
