"""The report's tables for a bench run and a claims run are those the report gave before it became a package (and
before bench and claims attached their data instead of writing open_loop.json, claims.csv and sensitivity.csv):
every table's headers, rows and cells, in order, against tests/data/report_tables.json, written by the last
harness/report.py from the same runs (the old files in place of the attachments)."""
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from prunedrive.harness.results import RunDir
from test_regress import episodes, make_run

GOLDEN = Path(__file__).parent / "data" / "report_tables.json"
AGENTS = [("expert", None, None, 0.0), ("llm-dense", "dense", 0.0, -4.0), ("llm-owl-0.5", "owl", 0.5, -6.0),
          ("llm-owl-0.7", "owl", 0.7, -11.0), ("llm-wanda-0.7", "wanda", 0.7, -19.0),
          ("llm-dg2pf-0.7", "dg2pf", 0.7, -5.0), ("llm-owl-0.5-encoder", "owl", 0.5, -9.0)]
OPEN_LOOP = {"llm-dense": {"n": 200, "lon_control_error": 0.0614, "lat_control_error": 0.031,
                           "action_parse_rate": 0.97, "vehicle_count_error": 0.42, "lead_distance_error": 3.14,
                           "traffic_light_distance_error": float("nan"), "examples": {"action": ["Brake 100%"]}},
             "llm-owl-0.7": {"n": 200, "lon_control_error": 0.0912, "lat_control_error": 0.05,
                             "action_parse_rate": 0.9, "vehicle_count_error": 0.8, "lead_distance_error": 4.5}}


def bench_like_run(path: Path, old_files: bool = False) -> Path:
    """A run as bench and claims write it: per-agent method, sparsity and checkpoint in the manifest config, model
    compute in the steps, the open-loop errors and the claims. old_files: as the last release wrote them
    (open_loop.json, claims.csv, sensitivity.csv), else as attachments through app.bench and app.claims."""
    from prunedrive.app.claims import Comparison

    rng = np.random.default_rng(7)
    keys = episodes(4, (1, 2, 3))
    truth = {e: float(rng.uniform(60, 90)) for e in keys}
    checkpoints = {a: {"bytes_on_disk": 9_000_000 * (1 - 0.6 * s), "ratio_to_dense": 1 - 0.6 * s,
                       "scheme": "sparse-24" if s else "dense", "execution": "decompressed: no kernel"}
                   for a, m, s, _ in AGENTS if m is not None}
    config = {"agents": [a for a, *_ in AGENTS], "method": {a: m for a, m, _, _ in AGENTS if m},
              "sparsity": {a: s for a, m, s, _ in AGENTS if m is not None},
              **({"checkpoints": checkpoints} if old_files else {})}  # where the last release kept them
    for name, method, sparsity, shift in AGENTS:
        compute = None if method is None else {"effective_flops": 4e7 * (1 - sparsity), "executed_flops": 4e7,
                                               "params": 2.14e6, "nonzero_params": 2.14e6 * (1 - sparsity)}
        make_run(path, name, {e: float(np.clip(v + shift + rng.normal(0, 3), 0, 100)) for e, v in truth.items()},
                 config=config, compute=compute, wall_ms=1.0 + 4 * (1 - (sparsity or 0)))
    comparisons = [Comparison("a", "OWL vs Wanda at 70%", "llm-owl-0.7", "llm-wanda-0.7"),
                   Comparison("d", "DG2PF at 70% vs dense (keeps accuracy)", "llm-dg2pf-0.7", "llm-dense",
                              "non-inferiority"),
                   Comparison("c", "encoder vs LM per weight", "llm-owl-0.5-encoder", "llm-owl-0.5", "per-weight")]
    table, sensitivity = claims_tables(path, comparisons, {"llm-owl-0.5": 0.42, "llm-owl-0.5-encoder": 0.08})
    if old_files:
        (path / "open_loop.json").write_text(json.dumps(OPEN_LOOP, indent=2, default=float))
        table.to_csv(path / "claims.csv", index=False)
        sensitivity.to_csv(path / "sensitivity.csv", index=False)
    else:
        from prunedrive.app.bench import attach_checkpoints, attach_open_loop
        from prunedrive.app.claims import attach_claims

        attach_open_loop(RunDir(path), OPEN_LOOP)
        attach_checkpoints(RunDir(path), checkpoints)
        attach_claims(RunDir(path), table, sensitivity)
    return path


def claims_tables(run: Path, comparisons, shares: dict[str, float]):
    """(claims table, sensitivity table) of the run's episodes as app.claims makes them: the sensitivity of the
    OWL agents at 50% pruning the LM (llm-owl-0.5) and the encoder (llm-owl-0.5-encoder); `shares`: their share of
    the model's weights removed."""
    from prunedrive.app.claims import claims_table, sensitivity_table

    scores = RunDir(run).episodes()
    table = claims_table(scores, comparisons, n_boot=2000, model_sparsity=shares)
    sensitivity = sensitivity_table(scores, [("llm-owl-0.5", "lm", 0.5), ("llm-owl-0.5-encoder", "encoder", 0.5)],
                                    shares, n_boot=2000)
    return table, sensitivity


class Tables(HTMLParser):
    """Every <table> of a page: {id (or class + its number): {"headers": [...], "rows": [[cell text, ...]]}}."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self._table, self._cell = {}, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            key = attrs.get("id") or f"{attrs.get('class')}-{len(self.tables)}"
            self._table = self.tables.setdefault(key, {"headers": [], "rows": []})
        elif tag == "tr" and self._table is not None:
            self._table["rows"].append([])
        elif tag in ("th", "td") and self._table is not None:
            self._cell = tag
            if tag == "th":
                self._table["headers"].append("")
            else:
                self._table["rows"][-1].append("")

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self._cell = None
        elif tag == "table":
            self._table["rows"] = [row for row in self._table["rows"] if row]  # the header row has no <td>
            self._table = None

    def handle_data(self, data):
        if self._cell == "th":
            self._table["headers"][-1] += data
        elif self._cell == "td":
            self._table["rows"][-1][-1] += data


def markdown_tables(text: str) -> list[list[str]]:
    """The Markdown tables, each its lines, sorted (the sections' place on the page may move, their tables not)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return sorted(tables)


def report_tables(run: Path, out: Path) -> dict:
    from prunedrive.report.write import write_report

    html_path, md_path = write_report([run], out)
    return {"html": Tables(html_path.read_text()).tables, "markdown": markdown_tables(md_path.read_text())}


def test_the_report_tables_of_a_bench_and_claims_run_are_unchanged(tmp_path):
    run = bench_like_run(tmp_path / "bench")
    assert set(RunDir(run).attachments()) == {"open_loop", "checkpoints", "sensitivity", "claims"}
    assert not any((run / name).exists() for name in ("open_loop.json", "claims.csv", "sensitivity.csv"))
    got = report_tables(run, tmp_path / "report")
    expected = json.loads(GOLDEN.read_text())
    assert list(got["html"]) == list(expected["html"])  # the same tables in the same order
    for key, table in expected["html"].items():
        assert got["html"][key] == table, key
    assert got["markdown"] == expected["markdown"]
