"""Run attachments (harness.results.RunDir.attach / attachments) and how the report places the sections they name:
tables and JSON stored beside the episodes with their producer and renderer, listed in attachments/index.json;
bad names, producers, sections, content and indexes refused naming what is wrong; a renderer loaded from its
"module:function" reference whatever module it lives in."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prunedrive.harness.results import Attachment, RunDir, RunError
from test_regress import episodes, make_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path):
    return RunDir(make_run(tmp_path / "run", "expert", {e: 80.0 for e in episodes(2, (1,))}))


def test_a_table_and_a_dict_come_back_with_their_producer_and_section(run):
    table = pd.DataFrame({"agent": ["a", "b"], "value": [1.5, np.nan]})
    path = run.attach("numbers", table, producer="my.module", section="my.module:render")
    assert path == run.path / "attachments" / "numbers.parquet"
    run.attach("errors", {"a": {"x": np.float32(0.25), "n": np.int64(3)}}, producer="other")
    found = run.attachments()
    assert list(found) == ["numbers", "errors"]  # in the order attached
    numbers, errors = found["numbers"], found["errors"]
    assert isinstance(numbers, Attachment) and (numbers.producer, numbers.section) == ("my.module", "my.module:render")
    pd.testing.assert_frame_equal(numbers.load(), table)
    assert errors.section is None and errors.load() == {"a": {"x": 0.25, "n": 3}}  # numpy scalars as numbers
    index = json.loads((run.path / "attachments" / "index.json").read_text())
    assert index["errors"] == {"file": "errors.json", "producer": "other", "section": None}
    assert not list((run.path / "attachments").glob(".*.tmp"))  # written through temporary files, renamed


def test_re_attaching_a_name_replaces_it_and_its_old_file(run):
    run.attach("thing", pd.DataFrame({"x": [1]}), producer="p")
    run.attach("thing", [1, 2], producer="q", section="a.b:c")
    assert not (run.path / "attachments" / "thing.parquet").exists()
    thing = run.attachments()["thing"]
    assert thing.load() == [1, 2] and thing.producer == "q" and list(run.attachments()) == ["thing"]


def test_a_run_without_attachments_has_none(run):
    assert run.attachments() == {}


@pytest.mark.parametrize("name, producer, section, message", [
    ("../escape", "p", None, "attachment name '../escape'"),
    ("", "p", None, "attachment name ''"),
    ("ok", "", None, "producer must be"),
    ("ok", "p", "no_colon", "section must be a 'package.module:function'"),
    ("ok", "p", "a:b:c", "section must be"),
])
def test_bad_names_producers_and_sections_are_refused(run, name, producer, section, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run.attach(name, {"a": 1}, producer=producer, section=section)
    assert not (run.path / "attachments" / "index.json").exists()


def test_content_other_than_a_table_or_json_is_refused(run):
    with pytest.raises(TypeError, match="attachment 'x': content must be a pandas DataFrame"):
        run.attach("x", "text", producer="p")


@pytest.mark.parametrize("index, message", [
    ("not json", "index.json: unreadable"),
    ("[1]", "an attachment index is a JSON object"),
    ('{"a": {"file": "../b.json", "producer": "p", "section": null}}', "entry 'a' must name its file"),
    ('{"a": {"file": "a.json", "producer": "", "section": null}}', "producer must be"),
])
def test_a_bad_index_names_the_file(run, index, message):
    (run.path / "attachments").mkdir()
    (run.path / "attachments" / "index.json").write_text(index)
    with pytest.raises(RunError, match=re.escape(message)):
        run.attachments()


RENDERER = '''
from prunedrive.report.section import Section, Table, section_renderer


@section_renderer
def render(payload, context):
    rows = [{"agent": s.label, "score": str(payload[s.agent])} for s in context.run_series() if s.agent in payload]
    return Section(f"Scores of {context.run}", [Table([("agent", "agent"), ("score", "score")], rows, "from a plug-in",
                                                      id="plugin-scores")], notes=["a note"])


@section_renderer
def nothing(payload, context):
    return None


@section_renderer
def cells(payload, context):
    return Section("", agent_cells={s.label: {"scheme": payload["scheme"]} for s in context.run_series()})


@section_renderer
def wrong(payload, context):
    return "not a section"


def unmarked(payload, context):
    return None
'''


@pytest.fixture
def plugin(importable):
    """A plug-in's renderers: a module registered under the report's entry point group (a dist-info beside it)."""
    folder = importable("my_sections", RENDERER)
    info = folder / "my_sections-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-sections\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[prunedrive.report_sections]\nscores = my_sections:render\n")
    return "my_sections"


def test_the_report_places_the_section_an_attachment_names(run, plugin, tmp_path):
    from prunedrive.report.write import write_report

    run.attach("scores", {"expert": 42}, producer=plugin, section=f"{plugin}:render")
    run.attach("quiet", {"expert": 1}, producer=plugin, section=f"{plugin}:nothing")  # nothing to show
    run.attach("data", {"expert": 1}, producer=plugin)  # no section: data only
    run.attach("cells", {"scheme": "int8 / ours"}, producer=plugin, section=f"{plugin}:cells")  # cost cells only
    html_path, md_path = write_report([run.path], tmp_path / "report")
    text, md = html_path.read_text(), md_path.read_text()
    assert "<h2>Scores of run</h2>" in text and "<table id='plugin-scores'>" in text
    assert "<td data-col='score' class='num'>42</td>" in text and "from a plug-in" in text and "a note" in text
    assert "## Scores of run" in md and "| expert | 42 |" in md
    assert text.count("<h2>") == md.count("\n## ")  # no empty section for `quiet` or `data`
    assert "<h2></h2>" not in text and "\n## \n" not in md  # nor for `cells`, whose cells join the cost table
    assert "<td data-col='scheme' class='num'>int8 / ours</td>" in text and "| int8 / ours |" in md


@pytest.mark.parametrize("section, message", [
    ("my_sections:missing", "has no attribute 'missing'"),
    ("my_sections:wrong", "returned str, not a prunedrive.report.section.Section"),
    ("my_sections:unmarked", "is not marked as a section renderer"),
    ("shutil:rmtree", "is not a renderer the report may import"),  # a run directory is input: never any function
    ("os:system", "is not a renderer the report may import"),
])
def test_a_section_that_cannot_be_rendered_leaves_a_note_and_the_report_is_written(run, plugin, tmp_path, capsys,
                                                                                    section, message):
    from prunedrive.report.write import write_report

    victim = tmp_path / "victim"
    victim.mkdir()
    run.attach("scores", [str(victim)], producer=plugin, section=section)
    html_path, md_path = write_report([run.path], tmp_path / "report")
    assert victim.is_dir()  # nothing was called
    assert message in md_path.read_text() and "## scores (not rendered)" in md_path.read_text()
    assert message in capsys.readouterr().err


def test_no_file_name_written_by_app_is_named_below_it():
    """What app/ writes into a run or a model directory is found by the harness and the report only through
    attachments and the model card (models.card), never by its file name."""
    # what app/ wrote by name before attachments and the model card, and what it writes by name now
    written = {"open_loop.json", "claims.csv", "claims.json", "sensitivity.csv", "sparsity.json"}
    for path in (ROOT / "app").glob("*.py"):
        written |= set(re.findall(r'"([A-Za-z_]+\.(?:json|csv|parquet))"', path.read_text()))
    written -= {"manifest.json", "episodes.parquet", "steps.parquet", "config.json", "index.json"}
    assert "bench.csv" in written  # the scan sees app's file names
    for layer in ("harness", "report"):
        for path in (ROOT / layer).rglob("*.py"):
            named = [name for name in written if name in path.read_text()]
            assert not named, f"{path.relative_to(ROOT)} names {named}, written by app/"
