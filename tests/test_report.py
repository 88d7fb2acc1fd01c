"""The report: every plot embedded, table values equal to the episodes, videos linked, renders in a browser."""
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pytest

from prunedrive.harness.report import write_report
from prunedrive.harness.results import RunDir
from test_regress import episodes, make_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """The comparison table as {agent: {column: text}} and every <img> src."""

    def __init__(self, text):
        super().__init__()
        self.rows, self.images, self.links, self._row, self._col = {}, [], [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-agent" in attrs:
            self._row = self.rows.setdefault(attrs["data-agent"], {})
        elif tag == "td" and self._row is not None and "data-col" in attrs:
            self._col = attrs["data-col"]
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "td":
            self._col = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None and self._col:
            self._row[self._col] = self._row.get(self._col, "") + data


@pytest.fixture
def runs(tmp_path):
    """expert + constant in one run (one video), and a dense and two pruned model runs with sparsity.json."""
    eps = episodes(3, (1, 2))
    rng = np.random.default_rng(0)
    base = make_run(tmp_path / "base", "expert", {e: float(rng.uniform(70, 100)) for e in eps}, wall_ms=0.4,
                    video_keys=[eps[0]])
    make_run(base, "constant", {e: float(rng.uniform(20, 50)) for e in eps}, wall_ms=0.01,
             collisions={eps[1]: 1, eps[2]: 2})
    models = []
    for name, sparsity, method, score, ms in (("dense", None, None, 80, 6.0), ("owl50", 0.5, "owl", 70, 4.0),
                                               ("wanda50", 0.5, "wanda", 60, 4.0)):
        model_dir = tmp_path / "models" / name
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text("{}")
        if sparsity is not None:
            (model_dir / "sparsity.json").write_text(json.dumps({"global": sparsity, "method": method}))
        keep = 1 - (sparsity or 0)
        models.append(make_run(tmp_path / name, f"llm-{name}", {e: score + i for i, e in enumerate(eps)}, wall_ms=ms,
                               config={"model": str(model_dir), "agents": ["llm"]},
                               compute={"effective_flops": 2e9 * keep, "params": 1e6, "nonzero_params": 1e6 * keep}))
    return base, models


def test_every_plot_is_embedded_and_the_markdown_links_them(runs, tmp_path):
    base, models = runs
    html_path, md_path = write_report([base, *models], tmp_path / "report")
    page = Page(html_path.read_text())
    ids = {img["id"] for img in page.images}
    assert ids == {"plot-ds_vs_time", "plot-ds_vs_sparsity", "plot-infractions", "plot-per_kind"}
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "http" not in "".join(img["src"] for img in page.images)  # self-contained
    md = md_path.read_text()
    for name in ("ds_vs_time", "ds_vs_sparsity", "infractions", "per_kind"):
        assert f"(plots/{name}.png)" in md
        assert (tmp_path / "report" / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)


def test_table_values_match_the_episodes(runs, tmp_path):
    base, models = runs
    html_path, md_path = write_report([base, *models], tmp_path / "report")
    rows = Page(html_path.read_text()).rows
    assert set(rows) == {"expert", "constant", "llm-dense", "llm-owl50", "llm-wanda50"}
    every = {agent: group for agent, group in RunDir(base).episodes().groupby("agent")}
    for model in models:
        every.update({agent: group for agent, group in RunDir(model).episodes().groupby("agent")})
    md = md_path.read_text()
    for agent, group in every.items():
        row = rows[agent]
        ds = group.driving_score
        assert row["driving_score"] == f"{ds.mean():.1f} ± {ds.std(ddof=1):.1f}"
        assert row["route_completion"] == f"{group.route_completion.mean():.1f} ± {group.route_completion.std():.1f}"
        assert row["episodes"] == str(len(group))
        assert row["collisions_per_km"] == f"{group.collisions.sum() / group.km_driven.sum():.2f}"
        assert row["agent_ms_p50"] == f"{1000 * group.agent_wall_s_p50.median():.2f}"
        assert f"| {agent} |" in md and row["driving_score"] in md
    assert rows["constant"]["collisions_per_km"] != "0.00"
    # model columns only where there is a model
    assert rows["llm-owl50"]["sparsity"] == "50.0" and rows["llm-owl50"]["method"] == "owl"
    assert rows["llm-dense"]["sparsity"] == "0.0" and rows["llm-dense"]["method"] == "dense"
    assert rows["llm-owl50"]["effective_gflops"] == "1" and rows["llm-dense"]["nonzero_params"] == "1.00M"
    assert rows["expert"]["sparsity"] == "–"


def test_without_models_the_sparsity_plot_and_model_columns_are_left_out(runs, tmp_path):
    base, _ = runs
    html_path, md_path = write_report([base], tmp_path / "report")
    text = html_path.read_text()
    page = Page(text)
    assert len(page.images) == 3 and "plot-ds_vs_sparsity" not in {img["id"] for img in page.images}
    assert "skipped: no agent has a sparsity" in text and "skipped: no agent has a sparsity" in md_path.read_text()
    assert "sparsity %" not in text and "effective GFLOPs" not in text and "non-zero params" not in text


def test_videos_are_linked_relative_to_the_report(runs, tmp_path):
    base, _ = runs
    out = tmp_path / "deep" / "report"
    html_path, md_path = write_report([base], out)
    links = [href for href in Page(html_path.read_text()).links if href.endswith(".webm")]
    assert len(links) == 1 and not os.path.isabs(links[0])
    source = next((base / "videos").glob("expert__*.webm"))
    assert (out / links[0]).read_bytes() == source.read_bytes()  # a copy inside the report folder
    assert f"[video]({links[0]})" in md_path.read_text()


def test_same_agent_in_two_runs_gets_the_run_in_its_label(tmp_path):
    scores = {e: 70.0 for e in episodes(2)}
    a, b = make_run(tmp_path / "a", "expert", scores), make_run(tmp_path / "b", "expert", scores)
    rows = Page(write_report([a, b], tmp_path / "report")[0].read_text()).rows
    assert set(rows) == {"expert [a]", "expert [b]"}


def test_model_backed_is_read_from_the_data_not_the_agent_name(tmp_path):
    """A plug-in agent of any name whose episodes report a model's compute gets its model's sparsity; an agent
    named llm-* whose episodes report none (it runs no model: it replays, say) does not."""
    model_dir = tmp_path / "models" / "owl70"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / "sparsity.json").write_text(json.dumps({"global": 0.7, "method": "owl"}))
    scores = {e: 70.0 for e in episodes(2, (1,))}
    config = {"model": str(model_dir)}
    planner = make_run(tmp_path / "planner", "planner", scores, config=config,
                       compute={"effective_flops": 6e8, "nonzero_params": 3e5})  # FLOPs, no `params`
    replay = make_run(tmp_path / "replay", "llm-replay", scores, config=config)
    rows = Page(write_report([planner, replay], tmp_path / "report")[0].read_text()).rows
    assert rows["planner"]["sparsity"] == "70.0" and rows["planner"]["method"] == "owl"
    assert rows["planner"]["effective_gflops"] == "0.6"
    assert rows["llm-replay"]["sparsity"] == "–" and rows["llm-replay"]["method"] == "–"


def test_cli_report(runs, tmp_path, capsys):
    from prunedrive.app.cli import main

    base, models = runs
    assert main(["report", "base", str(models[0]), "--out", str(tmp_path), "--out-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["report", "nope", "--out", str(tmp_path)]) == 2
    assert "no run directory" in capsys.readouterr().err


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless chromium on PATH (apt-get install chromium); "
                                                "the HTML content is checked without a browser by the tests above")
def test_the_page_renders_in_headless_chromium(runs, tmp_path):
    from PIL import Image

    base, models = runs
    html_path, _ = write_report([base, *models], tmp_path / "report")
    common = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,3000"]
    url = html_path.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([*common, f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True,
                             text=True, timeout=120)
    # The page's own script counts the images the browser decoded (complete, naturalWidth > 0).
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    assert 'data-images-loaded="4"' in body.group(0) and 'data-images-total="4"' in body.group(0), body.group(0)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([*common, f"--user-data-dir={profile}", f"--screenshot={shot}", url], capture_output=True,
                       timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    image = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert image.shape == (3000, 1400)
    assert image.std() > 20  # not blank: text, tables and plots
    top = image[: image.shape[0] // 3]
    assert (top < 128).mean() > 0.01  # dark pixels (text, plot lines) where the table and the plots are
