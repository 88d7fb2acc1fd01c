"""The report's data: every agent of every run as a `Series` (its episodes, summary, method and sparsity, its
checkpoint's cost), the dense baseline and each agent's paired driving-score difference to it, and the
`ReportContext` a section renderer gets.

Sparsity and method of an agent come from the run manifest's config (`sparsity`, `method`: a value, or a mapping
agent -> value) or, for a model-backed agent (one whose episodes report a model's compute: params, non-zero params
or effective FLOPs; its name does not matter), from its model directory's model card (models.card); a model
directory without one is the dense model (sparsity 0, method "dense").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.harness.paired import compare_to_baseline
from prunedrive.harness.results import RunDir
from prunedrive.harness.summary import summarize
from prunedrive.models.card import DENSE as DENSE_METHOD
from prunedrive.models.card import ModelCardError, read_model_card

# Episode columns only a model-backed agent fills (harness.compute leaves them NaN for any other agent):
# whether an agent runs a model is read from its data, not from its name (plug-in agents have any name).
MODEL_COMPUTE_COLUMNS = ("params", "nonzero_params", "effective_flops_mean")
ALPHA = 0.05  # of the CIs of the differences to dense


@dataclass
class Series:
    """One agent of one run: a row of the comparison tables, a point or bar in each plot."""

    label: str
    agent: str
    run: str
    run_path: Path
    episodes: pd.DataFrame
    summary: dict
    sparsity: float | None = None
    method: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def reference(self) -> bool:
        """An agent without a model (the expert, constant/random baselines): drawn grey, listed last."""
        return self.method is None and self.sparsity is None and not model_backed(self.episodes)

    @property
    def dense(self) -> bool:
        return self.method == DENSE_METHOD


@dataclass
class ReportContext:
    """What a section renderer (report.section) gets beside its attachment: every loaded series, in the report's
    order, and the run the attachment belongs to."""

    series: list[Series]
    run_path: Path | None = None

    @property
    def run(self) -> str:
        return self.run_path.name if self.run_path is not None else ""

    def run_series(self) -> list[Series]:
        """The series of the attachment's run, in the report's order."""
        return [s for s in self.series if s.run_path == self.run_path]


def load_series(run_dirs: list[str | Path]) -> list[Series]:
    """Every agent of every run, sorted: dense first, then by method and sparsity, reference agents last."""
    runs = []
    for path in run_dirs:
        run = RunDir(path)
        manifest = run.manifest()
        episodes = run.episodes()
        if episodes.empty:
            raise ValueError(f"{run.path}: the run has no finished episodes")
        runs.append((run.path, manifest, episodes))
    agent_runs: dict[str, int] = {}
    for _, _, episodes in runs:
        for agent in episodes.agent.unique():
            agent_runs[agent] = agent_runs.get(agent, 0) + 1
    series = []
    for path, manifest, episodes in runs:
        config = manifest.get("config") or {}
        for agent, group in episodes.groupby("agent", sort=False):
            summary = summarize(group, ["agent"]).iloc[0].to_dict()
            label = agent if agent_runs[agent] == 1 else f"{agent} [{path.name}]"  # same agent in several runs
            s = Series(label, agent, path.name, path, group.reset_index(drop=True), summary)
            s.sparsity, s.method = _sparsity(agent, group, config)
            s.extra["checkpoint"] = _card_checkpoint(agent, config)
            series.append(s)
    return sorted(series, key=_order)


def _order(s: Series):
    group = 0 if s.dense else 2 if s.reference else 1
    return group, s.method or "", -1.0 if s.sparsity is None else s.sparsity, s.label


def _sparsity(agent: str, episodes: pd.DataFrame, config: dict) -> tuple[float | None, str | None]:
    def per_agent(value):
        return value.get(agent) if isinstance(value, dict) else value

    sparsity, method = per_agent(config.get("sparsity")), per_agent(config.get("method"))
    if sparsity is not None:
        return float(sparsity), (str(method) if method is not None else None)
    model = per_agent(config.get("models")) if isinstance(config.get("models"), dict) else None
    if model is None and model_backed(episodes):
        model = config.get("model")
    if model:
        card = read_model_card(model)
        if card.written:
            return card.sparsity, (card.record.get("method") or method)
        if Path(model).is_dir():  # no card: the dense model, unless the manifest names another method
            return (0.0 if method in (None, DENSE_METHOD) else None), method or DENSE_METHOD
    return None, (str(method) if method is not None else None)


def _card_checkpoint(agent: str, config: dict) -> dict:
    """What the agent's checkpoint costs on disk: the `checkpoint` entry of its model directory's card (models.card;
    the directory from the manifest config's `models`); {} without one. A producer that knows more (bench: the
    ratio to the dense model's bytes) says so in its section's agent_cells."""
    models = config.get("models")
    model = models.get(agent) if isinstance(models, dict) else None
    if not model:
        return {}
    try:
        card = read_model_card(model)
    except ModelCardError:
        return {}
    return card.checkpoint if card.written else {}


def model_backed(episodes: pd.DataFrame) -> bool:
    """True when the agent's episodes report a model's compute (some finite value in a model-only column)."""
    return any(column in episodes and np.isfinite(pd.to_numeric(episodes[column], errors="coerce")).any()
               for column in MODEL_COMPUTE_COLUMNS)


def dense_baseline(series: list[Series]) -> Series | None:
    """The agent the differences are measured against: the first whose method is "dense"."""
    return next((s for s in series if s.dense), None)


def _suite_id(run_path: Path) -> tuple:
    manifest = RunDir(run_path).manifest()
    identity, config = manifest.get("identity") or {}, manifest.get("config") or {}
    return (identity.get("suite_hash"),) if identity.get("suite_hash") else (None, config.get("suite"))


def dense_differences(series: list[Series], alpha: float = ALPHA, n_boot: int = 10000,
                      seed: int = 0) -> dict[str, dict]:
    """{label: {n_pairs, diff, ci_low, ci_high, verdict}} of each agent's driving score against the dense
    baseline, paired by (scenario, seed) over the agents of runs of the same suite; {} without a baseline.
    Agents of a run of another suite get the verdict "other suite" (their episodes cannot be paired)."""
    base = dense_baseline(series)
    if base is None:
        return {}
    suite = _suite_id(base.run_path)
    same = [s for s in series if _suite_id(s.run_path) == suite]
    frame = pd.concat([s.episodes.assign(agent=s.label) for s in same], ignore_index=True)
    table = compare_to_baseline(frame, base.label, "driving_score", alpha, n_boot, seed)
    out = {row["agent"]: {k: row[k] for k in ("n_pairs", "diff", "ci_low", "ci_high", "verdict")}
           for _, row in table.iterrows()}
    for s in series:
        if s is not base and s.label not in out:
            out[s.label] = {"n_pairs": 0, "diff": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                            "verdict": "other suite"}
    return out


