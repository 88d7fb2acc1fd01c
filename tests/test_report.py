"""The report: every plot embedded, table values equal to the episodes (n, mean ± SE, the paired difference to
dense with its CI and verdict), sorted dense first, open-loop errors with units, videos linked and embedded,
and, with a headless Chromium, a page that renders, whose tables fit 1400 px and whose video plays."""
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

from prunedrive.harness.paired import compare_to_baseline, paired_bootstrap_ci
from prunedrive.report.write import write_report
from prunedrive.harness.results import RunDir
from test_regress import episodes, make_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("ds_vs_sparsity", "cost_vs_ds", "step_time_vs_ds", "infractions", "per_kind")


class Page(HTMLParser):
    """The tables with per-agent rows as {agent: {column: text}} (all tables merged; their columns differ),
    each table's agents in order, every <img>, <a href> and <video>."""

    def __init__(self, text):
        super().__init__()
        self.rows, self.images, self.links, self.videos, self.order = {}, [], [], [], {}
        self._row = self._col = self._table = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id") or attrs.get("class")
        elif tag == "tr" and "data-agent" in attrs:
            self._row = self.rows.setdefault(attrs["data-agent"], {})
            self.order.setdefault(self._table, []).append(attrs["data-agent"])
        elif tag == "td" and self._row is not None and "data-col" in attrs:
            self._col = attrs["data-col"]
            self._row[self._col] = ""
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "video":
            self.videos.append(attrs)

    def handle_endtag(self, tag):
        if tag == "td":
            self._col = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None and self._col:
            self._row[self._col] += data


def signed(value: float) -> str:
    return f"{value:+.1f}".replace("-", "−")


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
                               compute={"effective_flops": 2e9 * keep, "executed_flops": 2e9, "params": 1e6,
                                        "nonzero_params": 1e6 * keep}))
    return base, models


def bench_run(path, agents, n_scenarios=4, seeds=(1, 2, 3), seed=0):
    """One run like `prunedrive bench` writes: per-agent method and sparsity in the manifest config.
    agents: [(name, method or None, sparsity or None, DS shift vs the expert)], with per-episode noise."""
    rng = np.random.default_rng(seed)
    eps = episodes(n_scenarios, seeds)
    truth = {e: float(rng.uniform(60, 90)) for e in eps}
    config = {"agents": [a for a, *_ in agents], "method": {a: m for a, m, _, _ in agents if m},
              "sparsity": {a: s for a, m, s, _ in agents if m is not None}}
    for name, method, sparsity, shift in agents:
        compute = None if method is None else {"effective_flops": 4e7 * (1 - sparsity), "params": 2.14e6,
                                               "nonzero_params": 2.14e6 * (1 - sparsity)}
        make_run(path, name, {e: float(np.clip(v + shift + rng.normal(0, 3), 0, 100)) for e, v in truth.items()},
                 config=config, compute=compute)
    return path


def test_every_plot_is_embedded_and_the_markdown_links_them(runs, tmp_path):
    base, models = runs
    html_path, md_path = write_report([base, *models], tmp_path / "report")
    page = Page(html_path.read_text())
    ids = {img["id"] for img in page.images}
    assert ids == {f"plot-{name}" for name in PLOTS}
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "http" not in "".join(img["src"] for img in page.images)  # self-contained
    md = md_path.read_text()
    for name in PLOTS:
        assert f"(plots/{name}.png)" in md
        assert (tmp_path / "report" / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)


def test_table_values_match_the_episodes(runs, tmp_path):
    base, models = runs
    html_path, md_path = write_report([base, *models], tmp_path / "report")
    page = Page(html_path.read_text())
    rows = page.rows
    assert set(rows) == {"expert", "constant", "llm-dense", "llm-owl50", "llm-wanda50"}
    every = {agent: group for agent, group in RunDir(base).episodes().groupby("agent")}
    for model in models:
        every.update({agent: group for agent, group in RunDir(model).episodes().groupby("agent")})
    md = md_path.read_text()
    dense = every["llm-dense"].set_index(["scenario", "seed"]).driving_score
    for agent, group in every.items():
        row = rows[agent]
        ds, n = group.driving_score, len(group)
        # mean ± standard error (not the std): how well the mean is known
        assert row["driving_score"] == f"{ds.mean():.1f} ± {ds.std(ddof=1) / np.sqrt(n):.1f}"
        rc = group.route_completion
        assert row["route_completion"] == f"{rc.mean():.1f} ± {rc.std(ddof=1) / np.sqrt(n):.1f}"
        assert row["episodes"] == str(n) == "6"
        assert row["collisions_per_km"] == f"{group.collisions.sum() / group.km_driven.sum():.2f}"
        assert row["agent_ms_p50"] == f"{1000 * group.agent_wall_s_p50.median():.2f}"
        assert f"| {agent} |" in md and row["driving_score"] in md
        if agent == "llm-dense":
            assert row["verdict"] == "baseline" and row["ds_diff"] == row["ds_ci"] == "–"
            continue
        # the paired difference to dense, recomputed here: same scenario and seed, agent - dense
        d = (group.set_index(["scenario", "seed"]).driving_score - dense).to_numpy()
        low, high = paired_bootstrap_ci(d, 0.05, 10000, 0)
        assert row["ds_diff"] == signed(d.mean()) and row["ds_ci"] == f"[{signed(low)}, {signed(high)}]"
        assert row["verdict"] == "n too small"  # 6 pairs: no verdict
    assert rows["llm-owl50"]["ds_diff"] == "−10.0" and rows["llm-owl50"]["ds_ci"] == "[−10.0, −10.0]"
    assert rows["constant"]["collisions_per_km"] != "0.00"
    # the cost table: model columns only where there is a model, numbers for people
    assert rows["llm-owl50"]["sparsity"] == "50" and rows["llm-owl50"]["method"] == "owl"
    assert rows["llm-dense"]["sparsity"] == "0" and rows["llm-dense"]["method"] == "dense"
    assert rows["llm-owl50"]["effective_gflops"] == "1" and rows["llm-dense"]["nonzero_params"] == "1.00M"
    assert rows["llm-owl50"]["nonzero_params"] == "500.00k" and rows["llm-owl50"]["executed_gflops"] == "2"
    assert rows["expert"]["sparsity"] == "–" and rows["expert"]["effective_gflops"] == "–"
    # two tables that share the agents, dense first, then method and sparsity, reference agents last
    assert page.order["comparison"] == page.order["cost"] == ["llm-dense", "llm-owl50", "llm-wanda50", "constant",
                                                              "expert"]
    text = html_path.read_text()
    assert "standard error" in text and "wall time depends on" in text and "### Driving" in md and "### Cost" in md


def test_sorted_dense_first_then_method_and_sparsity_reference_agents_last(tmp_path):
    agents = [("expert", None, None, 0), ("llm-wanda-0.7", "wanda", 0.7, -20), ("llm-owl-0.5", "owl", 0.5, -5),
              ("constant", None, None, -40), ("llm-dense", "dense", 0.0, -3), ("llm-owl-0.7", "owl", 0.7, -9),
              ("llm-wanda-0.5", "wanda", 0.5, -8)]
    run = bench_run(tmp_path / "bench", agents, n_scenarios=2, seeds=(1,))
    page = Page(write_report([run], tmp_path / "report")[0].read_text())
    assert page.order["comparison"] == ["llm-dense", "llm-owl-0.5", "llm-owl-0.7", "llm-wanda-0.5", "llm-wanda-0.7",
                                        "constant", "expert"]
    assert page.rows["llm-wanda-0.7"]["sparsity"] == "70" and page.rows["llm-dense"]["verdict"] == "baseline"


def test_verdicts_with_enough_pairs(tmp_path):
    """12 pairs: a model 20 points worse is "worse", the expert 10 points better is "better"; every cell is
    compare_to_baseline's."""
    agents = [("llm-dense", "dense", 0.0, -10), ("llm-magnitude-0.7", "magnitude", 0.7, -30),
              ("llm-owl-0.5", "owl", 0.5, -10), ("expert", None, None, 0)]
    run = bench_run(tmp_path / "bench", agents)
    page = Page(write_report([run], tmp_path / "report")[0].read_text())
    table = compare_to_baseline(RunDir(run).episodes(), "llm-dense").set_index("agent")
    for agent in ("llm-magnitude-0.7", "llm-owl-0.5", "expert"):
        row, expected = page.rows[agent], table.loc[agent]
        assert expected.n_pairs == 12 and row["episodes"] == "12"
        assert row["verdict"] == expected.verdict
        assert row["ds_diff"] == signed(expected["diff"])
        assert row["ds_ci"] == f"[{signed(expected.ci_low)}, {signed(expected.ci_high)}]"
    assert page.rows["llm-magnitude-0.7"]["verdict"] == "worse" and page.rows["expert"]["verdict"] == "better"


def test_without_models_the_sparsity_plot_and_model_columns_are_left_out(runs, tmp_path):
    base, _ = runs
    html_path, md_path = write_report([base], tmp_path / "report")
    text = html_path.read_text()
    page = Page(text)
    assert {img["id"] for img in page.images} == {"plot-infractions", "plot-per_kind"}
    assert "skipped: no dense baseline" in text and "skipped: no dense baseline" in md_path.read_text()
    assert "skipped: no agent reports effective FLOPs" in text
    assert "sparsity %" not in text and "effective GFLOPs" not in text and "non-zero params" not in text
    assert "ΔDS vs dense" not in text and "verdict" not in page.rows["expert"]  # no dense: no difference column
    assert "agent_ms_p50" in page.rows["expert"] and "method" not in page.rows["expert"]  # cost: wall time only


def test_ds_is_plotted_against_the_measured_step_time_as_well_as_flops(runs):
    from prunedrive.report.data import load_series
    from prunedrive.report.plots import cost_points

    base, models = runs
    series = load_series([base, *models])
    time_x = {s.agent: x for s, x in cost_points(series, "agent_ms_p50")}
    flops_x = {s.agent: x for s, x in cost_points(series, "effective_gflops")}
    assert time_x == {"llm-dense": 6.0, "llm-owl50": 4.0, "llm-wanda50": 4.0}  # ms, not FLOPs; no expert point
    assert flops_x == {"llm-dense": 2.0, "llm-owl50": 1.0, "llm-wanda50": 1.0}


def test_open_loop_errors_with_units(runs, tmp_path):
    base, models = runs
    from prunedrive.app.bench import attach_open_loop

    dense = models[0]
    attach_open_loop(RunDir(dense), {"llm-dense": {
        "n": 200, "lon_control_error": 0.0614, "lat_control_error": 0.031, "action_parse_rate": 0.97,
        "vehicle_count_error": 0.42, "lead_distance_error": 3.14, "traffic_light_distance_error": float("nan"),
        "examples": {"action": ["Brake pedal 100%"]}}})
    html_path, md_path = write_report([base, *models], tmp_path / "report")
    page = Page(html_path.read_text())
    assert page.order["open-loop-dense"] == ["llm-dense"]  # only agents with open-loop errors
    row = page.rows["llm-dense"]
    assert row["lon_control_error"] == "0.061" and row["lat_control_error"] == "0.031"
    assert row["action_parse_rate"] == "97" and row["vehicle_count_error"] == "0.42"
    assert row["lead_distance_error"] == "3.1" and row["n"] == "200"
    assert "traffic_light_distance_error" not in row  # NaN: not a column
    text, md = html_path.read_text(), md_path.read_text()
    for unit in ("lon. control MAE (0–1)", "lead distance MAE (m)", "vehicle count MAE (vehicles)",
                 "actions parsed (%)"):
        assert unit in text and unit in md
    assert "mean absolute error of the longitudinal control" in text
    without = write_report([base], tmp_path / "without")[0].read_text()  # no open-loop attachment: no table
    assert not any(key.startswith("open-loop") for key in Page(without).order) and "Open-loop errors" not in without


def test_videos_are_linked_and_embedded_relative_to_the_report(runs, tmp_path):
    base, _ = runs
    out = tmp_path / "deep" / "report"
    html_path, md_path = write_report([base], out)
    page = Page(html_path.read_text())
    links = [href for href in page.links if href.endswith(".webm")]
    assert len(links) == 1 and not os.path.isabs(links[0]) and links[0].startswith("videos/")
    assert page.videos == [{"controls": None, "preload": "metadata", "src": links[0]}]
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
    assert rows["planner"]["sparsity"] == "70" and rows["planner"]["method"] == "owl"
    assert rows["planner"]["effective_gflops"] == "0.6"
    assert rows["llm-replay"]["sparsity"] == "–" and rows["llm-replay"]["method"] == "–"


def test_cli_report(runs, tmp_path, capsys):
    from prunedrive.app.cli import main

    base, models = runs
    assert main(["report", "base", str(models[0]), "--out", str(tmp_path), "--report-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["report", "nope", "--out", str(tmp_path)]) == 2
    assert "no run directory" in capsys.readouterr().err


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _record(path, frames=12):
    """A real WebM episode video (harness.video.VideoWriter), over the placeholder make_run wrote."""
    from prunedrive.harness.video import VideoWriter, overlay_lines

    writer = VideoWriter(path, fps=5)
    for i in range(frames):
        frame = np.full((96, 160, 3), 60, np.uint8)
        frame[40:60, 8 * i:8 * i + 24] = 255
        writer.add(frame, overlay_lines("expert", i / 5, 20.0, 0.5, 0.0, 0.0, 100 * i / frames, 0))
    writer.close()
    assert writer.path.stat().st_size > 200


@pytest.mark.skipif(_browser() is None, reason="no headless chromium on PATH (apt-get install chromium); "
                                                "the HTML content is checked without a browser by the tests above")
def test_the_page_renders_in_headless_chromium(runs, tmp_path):
    from PIL import Image

    base, models = runs
    video = next((base / "videos").glob("expert__*.webm"))
    _record(video)
    agents = [("llm-dense", "dense", 0.0, -5)] + [(f"llm-{m}-{s:g}", m, s, -5 - 20 * s)
                                                  for m in ("owl", "dg2pf", "wanda", "magnitude") for s in (0.5, 0.7)]
    bench = bench_run(tmp_path / "bench-smoke-small-with-a-long-run-name", agents, n_scenarios=2)
    html_path, _ = write_report([base, *models, bench], tmp_path / "report")
    common = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,3000"]
    url = html_path.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        # The virtual time budget lets the page load and the video fetch its metadata before the DOM is dumped.
        dom = subprocess.run([*common, f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                              url], capture_output=True, text=True, timeout=120)
    # The page's own script writes what the browser rendered into <body>'s data-* attributes.
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    data = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(0)))
    assert data["images-loaded"] == data["images-total"] == str(len(PLOTS)), data
    # No table is wider than its container at 1400 px, and the page does not scroll sideways.
    assert int(data["tables-total"]) >= 5 and data["tables-overflowing"] == "", data
    assert int(data["page-scroll-width"]) <= int(data["page-client-width"]), data
    # The recorded episode's <video> loaded its metadata: readyState >= 1 (HAVE_METADATA), a finite duration.
    (state, duration, error), = (v.split(":") for v in data["videos"].split())
    assert int(state) >= 1 and np.isfinite(float(duration)) and float(duration) > 0 and error == "0", data
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([*common, f"--user-data-dir={profile}", f"--screenshot={shot}", url], capture_output=True,
                       timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    image = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert image.shape == (3000, 1400)
    assert image.std() > 20  # not blank: text, tables and plots
    top = image[: image.shape[0] // 3]
    assert (top < 128).mean() > 0.01  # dark pixels (text, plot lines) where the tables and the plots are


def test_a_claims_run_shows_its_claims_table_sensitivity_and_plots(tmp_path):
    from prunedrive.app.claims import Comparison, attach_claims
    from test_report_tables import claims_tables

    agents = [("llm-dense", "dense", 0.0, 0), ("llm-owl-0.5", "owl", 0.5, -4), ("llm-wanda-0.5", "wanda", 0.5, -12),
              ("llm-owl-0.5-encoder", "owl", 0.5, -6)]
    run = bench_run(tmp_path / "claims-synth", agents, n_scenarios=4, seeds=tuple(range(1, 6)))
    comparisons = [Comparison("a", "OWL vs Wanda at 50%", "llm-owl-0.5", "llm-wanda-0.5"),
                   Comparison("d", "OWL at 50% vs dense (keeps accuracy)", "llm-owl-0.5", "llm-dense",
                              "non-inferiority"),
                   Comparison("c", "encoder vs LM per weight", "llm-owl-0.5-encoder", "llm-owl-0.5", "per-weight")]
    table, sensitivity = claims_tables(run, comparisons, {"llm-owl-0.5": 0.4, "llm-owl-0.5-encoder": 0.09})
    attach_claims(RunDir(run), table, sensitivity)

    html_path, md_path = write_report([run], tmp_path / "report")
    page = Page(html_path.read_text())
    assert page.order["claims-claims-synth"] == list(table["comparison"])
    row, truth = page.rows["OWL vs Wanda at 50%"], table.iloc[0]
    assert row["diff"] == f"{truth.ds_diff:+.1f} [{truth.ci_low:+.1f}, {truth.ci_high:+.1f}]"
    assert row["verdict"] == truth.verdict == "supported" and row["n"] == "20"
    assert page.order["sensitivity-claims-synth"] == ["llm-owl-0.5", "llm-owl-0.5-encoder"]
    assert page.rows["llm-owl-0.5-encoder"]["model"] == "9.0"
    ids = {img["id"] for img in page.images}
    assert {"plot-claims_claims-synth", "plot-sensitivity_claims-synth"} <= ids
    md = md_path.read_text()
    assert "## The seeds' claims (claims-synth)" in md and "(plots/claims_claims-synth.png)" in md
    assert "encoder vs LM per weight" in md and "per 10% of model" in md

    (run / "attachments" / "index.json").unlink()  # an ordinary run (or one written before attachments): none
    assert "The seeds' claims" not in write_report([run], tmp_path / "plain")[0].read_text()


def test_a_methods_colour_is_its_own_whichever_runs_are_reported():
    """Colours handed out in order of appearance gave OWL one colour in one report and another in the next."""
    from prunedrive.report.palette import method_colours

    alone = {m: method_colours([m])[m] for m in ("owl", "wanda", "dg2pf", "magnitude")}
    together = method_colours(["wanda", "owl", "magnitude", "dg2pf"])
    assert together == alone  # these four hash to distinct colours
    assert len(set(method_colours(["a", "b", "c", "d", "e", "f"]).values())) == 6  # collisions take a free colour
