"""The report's tables: the comparison (one row per agent, split into a driving and a cost table that fit a
page) and the driving score per scenario kind. Metrics are those of `harness.metrics`' report view; "–" marks
what does not apply."""
from __future__ import annotations

import numpy as np
import pandas as pd

from prunedrive.harness.metrics import REPORT, in_view
from prunedrive.report.data import Series, dense_differences

# What a checkpoint costs on disk (models.checkpoints.checkpoint_record, in the model card or a producer's section).
CHECKPOINT_COLUMNS = [("disk_mb", "MB on disk"), ("disk_ratio", "× dense bytes"), ("scheme", "scheme / execution")]
# What the report knows about the agent itself (manifest config or model card): (column id, header).
AGENT_COLUMNS = [("method", "method"), ("sparsity", "sparsity %"), *CHECKPOINT_COLUMNS]
# The paired difference of the driving score to the dense baseline (harness.paired.compare_to_baseline).
DIFF_COLUMNS = [("ds_diff", "ΔDS vs dense"), ("ds_ci", "95% CI"), ("verdict", "verdict")]


def metric_text(m, summary: dict) -> str | None:
    """A report metric as the tables print it (a mean/std metric as mean ± standard error); None: NaN."""
    value = m.value(summary)
    if not np.isfinite(value):
        return None
    if m.std_column:
        n = summary.get("episodes", np.nan)
        se = m.spread(summary) / np.sqrt(n) if n and n > 1 else np.nan
        return m.text(value, se)
    return m.text(value)


def signed(value: float) -> str:
    return f"{value:+.1f}".replace("-", "−")


def _agent_cells(s: Series, known: dict[str, str] | None) -> dict[str, str]:
    """Method, sparsity and the checkpoint's cost: `known` (a producer's cells) or else the model card's."""
    cells = {}
    if s.sparsity is not None:
        cells["sparsity"] = f"{100 * s.sparsity:.3g}"
    if s.method is not None:
        cells["method"] = str(s.method)
    cells.update(known if known is not None else checkpoint_cells(s.extra.get("checkpoint") or {}))
    return cells


def checkpoint_cells(checkpoint: dict) -> dict[str, str]:
    """CHECKPOINT_COLUMNS' cells of a checkpoint record (bytes_on_disk, ratio_to_dense, scheme, execution)."""
    cells = {}
    if isinstance(checkpoint.get("bytes_on_disk"), (int, float)):
        cells["disk_mb"] = f"{checkpoint['bytes_on_disk'] / 1e6:.2f}"
    if isinstance(checkpoint.get("ratio_to_dense"), (int, float)) and np.isfinite(checkpoint["ratio_to_dense"]):
        cells["disk_ratio"] = f"{checkpoint['ratio_to_dense']:.3f}"
    if checkpoint.get("execution"):
        cells["scheme"] = f"{checkpoint.get('scheme', '')} / {checkpoint['execution']}"
    return cells


def _diff_cells(s: Series, diffs: dict[str, dict]) -> dict[str, str]:
    if not diffs:
        return {}
    d = diffs.get(s.label)
    if d is None:  # the baseline itself
        return {"verdict": "baseline"}
    if not np.isfinite(d["diff"]):
        return {"verdict": d["verdict"]}
    ci = f"[{signed(d['ci_low'])}, {signed(d['ci_high'])}]"
    verdict = d["verdict"] + (f" ({d['n_pairs']} pairs)" if d["n_pairs"] != s.summary.get("episodes") else "")
    return {"ds_diff": signed(d["diff"]), "ds_ci": ci, "verdict": verdict}


def comparison_table(series: list[Series], diffs: dict[str, dict] | None = None,
                     agent_cells: dict[str, dict[str, str]] | None = None
                     ) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(columns present, rows): rows map column id -> formatted text; a column shows only when some row has
    it. The metrics are harness.metrics' report view, in its order (a mean/std metric as mean ± standard
    error), the difference to dense right after the driving score, then method, sparsity and the checkpoint's
    cost. agent_cells: {label: cells} the runs' sections know better than the model cards (report.section)."""
    diffs = dense_differences(series) if diffs is None else diffs
    rows = []
    for s in series:
        cells = {m.key: text for m in in_view(REPORT) if (text := metric_text(m, s.summary)) is not None}
        rows.append({"agent": s.label, "run": s.run, **cells, **_diff_cells(s, diffs),
                     **_agent_cells(s, (agent_cells or {}).get(s.label))})
    runs = [("run", "run")] if len({s.run for s in series}) > 1 else []  # one run: named above the table
    columns = []
    for m in in_view(REPORT):
        columns.append((m.key, m.label))
        if m.key == "driving_score":
            columns += DIFF_COLUMNS
    columns += AGENT_COLUMNS
    present = [("agent", "agent")] + runs + [(c, h) for c, h in columns if any(c in r for r in rows)]
    return present, rows


HEADERS = {"episodes": "n", "driving_score": "DS (mean ± SE)", "route_completion": "RC % (mean ± SE)"}


def split_table(columns: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The comparison columns as two tables that fit a page: driving (how it drove) and cost (what it spent,
    and what the agent is: method, sparsity)."""
    cost_keys = {m.key for m in in_view(REPORT) if m.cost} | {c for c, _ in AGENT_COLUMNS}
    ident = [(c, h) for c, h in columns if c in ("agent", "run")]
    header = {c: HEADERS.get(c, h) for c, h in columns}
    # The run only in the cost table: the driving table is the wide one (an agent in several runs has the
    # run in its label anyway).
    driving = ident[:1] + [(c, header[c]) for c, _ in columns if c not in cost_keys and c not in ("agent", "run")]
    agent = [(c, h) for c, h in columns if c in ("method", "sparsity")]
    spent = [(c, header[c]) for c, _ in columns if c in cost_keys and c not in ("method", "sparsity")]
    timed = {m.key for m in in_view(REPORT) if m.unit == "ms"}  # wall time, the machine-dependent cost, last
    cost = ident + agent + [x for x in spent if x[0] not in timed] + [x for x in spent if x[0] in timed]
    if len(cost) == len(ident):
        cost = []
    return driving, cost



def kind_table(series: list[Series]) -> pd.DataFrame:
    """Agents (rows, in the report's order) x scenario kinds: mean driving score."""
    frame = pd.concat([s.episodes.assign(series=s.label) for s in series])
    table = frame.pivot_table(index="series", columns="kind", values="driving_score", aggfunc="mean", sort=False)
    kinds = list(dict.fromkeys(k for s in series for k in s.episodes["kind"]))
    return table.reindex(index=[s.label for s in series], columns=kinds)


