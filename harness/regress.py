"""Regression gate: is a candidate run significantly worse than a baseline run on the same episodes?

    prunedrive regress BASELINE CANDIDATE [--max-drop 5] [--alpha 0.05] [--agent NAME]
    exit 1: significant regression; 0: none; 2: unusable input (message on stderr)

Episodes are paired by (scenario, seed): the same traffic, the same route, so the per-episode
difference cancels scenario difficulty and a paired test is far more sensitive than comparing means.
With one agent per run the two agents are paired (they may differ in name: `expert` vs `llm-owl50`);
with several, `--agent` (both runs) or `--baseline-agent`/`--candidate-agent` pick them.

The rule (driving score, the Leaderboard's main metric), with d_i = DS_candidate_i - DS_baseline_i:

    regression  <=>  upper bound of the (1 - alpha) paired-bootstrap CI of mean(d) < 0     (significant)
                     and  -mean(d) > max_drop                                             (large enough)

i.e. the drop is statistically significant (the two-sided (1 - alpha) CI excludes no-change; a
one-sided test at alpha/2) and its point estimate exceeds the practical margin `max_drop` DS points.
Neither half alone is a good gate: "CI excludes 0" alone fails on drops of a fraction of a point once
there are enough episodes; "CI entirely below -max_drop" (significantly worse *by more than* the margin)
needs so many episodes that on a 5- or 50-episode suite it practically never fires, so a real 10-point
drop would pass. The CI is the percentile bootstrap over resampled episode pairs (`n_boot` resamples,
`seed` fixed, so a verdict is reproducible). Below about 10 pairs the percentile bootstrap is too
narrow (it ignores that the spread itself is estimated): treat a verdict on a smoke suite as a smoke test.
Identical per-episode differences (a deterministic simulator, an agent shifted by a constant) give a
zero-width CI: then the rule reduces to the margin, which is what one wants.

Two more checks:
  collisions per km  (sum of collisions / sum of km driven, over the paired episodes; the bootstrap
                      resamples pairs): regression when the CI of the increase excludes 0 and the
                      increase exceeds `max_collision_increase` per km. A gate.
  per-step cost      (ratio of the medians of the episodes' p50 agent wall time per step): reported
                      with its CI; a gate only with `max_slowdown` (e.g. 1.5): regression when the CI of
                      the ratio lies above 1, the ratio exceeds `max_slowdown` and the absolute increase
                      exceeds `min_slowdown_ms` (timer noise on microsecond agents). Not a gate by
                      default because wall time depends on the machine and its load: the same expert on
                      the same machine measured x1.4 (CI x1.1-x1.9) slower per step when two Ray workers
                      shared the 2 cores. Effective FLOPs (deterministic) are in the report.

The checks are the metrics `harness.metrics` marks as gated, in its order; how two runs are compared
on one follows from how it aggregates episodes: a mean -> paired mean difference, a per-km rate ->
difference of sum/sum, a median of per-episode values -> ratio of medians.

Unusable input is exit 2 with a message naming the run, agent, file or metric, never a verdict: a
missing run or an unreadable manifest or episode file; suites that differ (by content,
`identity.suite_hash`, where both manifests record one; else by name); no common episodes; a side
whose paired episodes all failed; a NaN or missing value of a gated metric.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.harness.metrics import GATE, KM_FLOOR, Metric, gated, per_km
from prunedrive.harness.paired import bootstrap_statistic_ci, paired_bootstrap_ci

RULE = ("regression = upper bound of the {level:.0%} paired-bootstrap CI of mean(candidate - baseline) < 0 "
        "and the mean drop > {max_drop:g} DS points")


class RegressInputError(ValueError):
    """The two runs cannot be compared (exit code 2)."""


@dataclass
class Check:
    name: str                # "driving score", "collisions/km", "agent ms/step (p50)"
    baseline: float
    candidate: float
    diff: float              # candidate - baseline (a ratio for the cost check)
    ci_low: float
    ci_high: float
    threshold: str           # the margin, as text
    regressed: bool
    gating: bool = True      # False: reported only
    ratio: bool = False      # diff and CI are candidate / baseline ratios

    def cells(self) -> tuple[str, str]:
        """The difference and its CI as text."""
        if self.ratio:
            return f"×{self.diff:.3g}", f"[×{self.ci_low:.3g}, ×{self.ci_high:.3g}]"
        return f"{self.diff:+.4g}", f"[{self.ci_low:+.4g}, {self.ci_high:+.4g}]"


@dataclass
class Verdict:
    baseline: str
    candidate: str
    baseline_agent: str
    candidate_agent: str
    n_paired: int
    baseline_only: int
    candidate_only: int
    alpha: float
    max_drop: float
    checks: list[Check] = field(default_factory=list)
    differences: np.ndarray = field(default_factory=lambda: np.array([]), repr=False)

    @property
    def regression(self) -> bool:
        return any(c.regressed and c.gating for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 1 if self.regression else 0

    @property
    def rule(self) -> str:
        return RULE.format(level=1 - self.alpha, max_drop=self.max_drop)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "candidate": self.candidate, "baseline_agent": self.baseline_agent,
                "candidate_agent": self.candidate_agent, "n_paired": self.n_paired,
                "baseline_only": self.baseline_only, "candidate_only": self.candidate_only, "alpha": self.alpha,
                "rule": self.rule, "regression": self.regression,
                "checks": [c.__dict__ for c in self.checks]}

    def text(self) -> str:
        lines = [f"baseline  {self.baseline} ({self.baseline_agent})", f"candidate {self.candidate} ({self.candidate_agent})",
                 f"{self.n_paired} paired episodes" + self._unpaired(), self.rule]
        for c in self.checks:
            diff, ci = c.cells()
            lines.append(f"  {c.name}: baseline {c.baseline:.4g} candidate {c.candidate:.4g} diff {diff} "
                         f"CI {ci} margin {c.threshold} -> "
                         f"{'REGRESSION' if c.regressed else 'ok'}{'' if c.gating else ' (report only)'}")
        lines.append("verdict: " + ("REGRESSION" if self.regression else "no significant regression"))
        return "\n".join(lines)

    def _unpaired(self) -> str:
        if not (self.baseline_only or self.candidate_only):
            return ""
        return f" (unpaired, ignored: {self.baseline_only} baseline-only, {self.candidate_only} candidate-only)"

    def print(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        if console is None:
            console = Console()
            if not console.is_terminal:  # logs and CI: don't squeeze the table to 80 columns
                console = Console(width=160)
        level = f"{1 - self.alpha:.0%}"
        table = Table(title=f"Regression check: {self.candidate_agent} ({Path(self.candidate).name}) vs "
                            f"{self.baseline_agent} ({Path(self.baseline).name}), {self.n_paired} paired episodes"
                            + self._unpaired(), caption=self.rule)
        for column in ("check", "baseline", "candidate", "difference", f"{level} CI", "margin", "verdict"):
            table.add_column(column, justify="left" if column in ("check", "verdict") else "right")
        for c in self.checks:
            verdict = "[red]REGRESSION[/red]" if c.regressed else "[green]ok[/green]"
            if not c.gating:
                verdict += " (report only)"
            table.add_row(c.name, f"{c.baseline:.4g}", f"{c.candidate:.4g}", *c.cells(), c.threshold, verdict)
        console.print(table)
        console.print("[bold red]significant regression[/bold red]" if self.regression
                      else "[bold green]no significant regression[/bold green]")


def load_run(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """(manifest, episodes) of a run directory; RegressInputError (exit 2) naming the file when either
    cannot be read."""
    from prunedrive.harness.results import RunDir, RunError

    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise RegressInputError(f"{path}: no run directory with a manifest.json")
    run = RunDir(path)
    try:
        manifest, episodes = run.manifest(), run.episodes()
    except RunError as exc:  # a torn or foreign file: unusable input, never a verdict or a traceback
        raise RegressInputError(str(exc)) from None
    if episodes.empty:
        raise RegressInputError(f"{path}: the run has no finished episodes")
    return manifest, episodes


def check_same_suite(base_manifest: dict, cand_manifest: dict, baseline_dir: Path, candidate_dir: Path) -> None:
    """Refuse runs of different suites. Runs record a hash of their suite's content (`identity.suite_hash`):
    two suites may share a `name:` and differ in traffic, routes or seeds, and their episodes are then not
    the same episodes. Runs without one (older, or imported) are compared by suite name."""
    base_suite, cand_suite = _suite_name(base_manifest), _suite_name(cand_manifest)
    base_hash, cand_hash = _suite_hash(base_manifest), _suite_hash(cand_manifest)
    if base_hash and cand_hash:
        if base_hash != cand_hash:
            raise RegressInputError(
                f"different suites: baseline {baseline_dir} ran {base_suite!r} (suite hash {base_hash}), candidate "
                f"{candidate_dir} ran {cand_suite!r} (suite hash {cand_hash}); the suites differ in content "
                "(scenarios, settings or seeds), so their episodes cannot be paired")
        return
    if base_suite and cand_suite and base_suite != cand_suite:
        raise RegressInputError(f"different suites: baseline {baseline_dir} ran {base_suite!r}, candidate "
                                f"{candidate_dir} ran {cand_suite!r}; compare runs of the same suite")


def check_same_latency(base_manifest: dict, cand_manifest: dict, baseline_dir: Path, candidate_dir: Path) -> None:
    """Refuse runs driven under different latency models (`identity.latency`, harness.latency; absent: none):
    a late control changes what the car does, so their episodes are not the same episodes."""
    base, cand = _latency(base_manifest), _latency(cand_manifest)
    if base != cand:
        raise RegressInputError(
            f"different latency settings: baseline {baseline_dir} ran --latency {base}, candidate {candidate_dir} "
            f"ran --latency {cand}; compare runs driven under the same latency model")


def _latency(manifest: dict) -> str:
    identity = manifest.get("identity")
    return (identity.get("latency") if isinstance(identity, dict) else None) or "none"


def _suite_name(manifest: dict):
    config = manifest.get("config")
    return config.get("suite") if isinstance(config, dict) else None


def _suite_hash(manifest: dict):
    identity = manifest.get("identity")
    return identity.get("suite_hash") if isinstance(identity, dict) else None


def _pick_agent(episodes: pd.DataFrame, wanted: str | None, which: str, path: Path) -> str:
    agents = list(dict.fromkeys(episodes["agent"]))
    if wanted is not None:
        if wanted not in agents:
            raise RegressInputError(f"{which} run {path} has no agent {wanted!r}; "
                                    f"it has: {', '.join(map(str, agents))}")
        return wanted
    if len(agents) > 1:
        raise RegressInputError(f"{which} run {path} has several agents ({', '.join(map(str, agents))}); "
                                f"pick one with --agent (or --{which}-agent)")
    return agents[0]


def regress(baseline_dir: str | Path, candidate_dir: str | Path, max_drop: float = 5.0, alpha: float = 0.05,
            n_boot: int = 10000, seed: int = 0, agent: str | None = None, baseline_agent: str | None = None,
            candidate_agent: str | None = None, max_collision_increase: float = 0.5,
            max_slowdown: float | None = None, min_slowdown_ms: float = 0.1,
            margins: dict[str, float] | None = None) -> Verdict:
    """Compare `candidate_dir` to `baseline_dir` (run directories). Raises RegressInputError when they
    cannot be compared (different suites, missing or unreadable runs, no common or no scored episodes, a
    NaN or missing metric, ambiguous agents). The cost check gates only with `max_slowdown` (a ratio, e.g.
    1.5); by default it is reported. `margins`: {metric key: margin} for other gated metrics of
    `harness.metrics`."""
    baseline_dir, candidate_dir = Path(baseline_dir), Path(candidate_dir)
    base_manifest, base = load_run(baseline_dir)
    cand_manifest, cand = load_run(candidate_dir)
    check_same_suite(base_manifest, cand_manifest, baseline_dir, candidate_dir)
    check_same_latency(base_manifest, cand_manifest, baseline_dir, candidate_dir)
    return compare(base, cand, max_drop=max_drop, alpha=alpha, n_boot=n_boot, seed=seed, agent=agent,
                   baseline_agent=baseline_agent, candidate_agent=candidate_agent,
                   max_collision_increase=max_collision_increase, max_slowdown=max_slowdown,
                   min_slowdown_ms=min_slowdown_ms, baseline_name=str(baseline_dir), candidate_name=str(candidate_dir),
                   margins=margins)


@dataclass(frozen=True)
class Side:
    """One side of the comparison, as messages name it."""

    which: str    # "baseline" or "candidate"
    run: str
    agent: str
    suffix: str   # of its columns in the paired table

    def __str__(self) -> str:
        return f"{self.which} run {self.run} (agent {self.agent})"


PAIR_KEYS = ["scenario", "seed"]


def compare(base: pd.DataFrame, cand: pd.DataFrame, max_drop: float = 5.0, alpha: float = 0.05, n_boot: int = 10000,
            seed: int = 0, agent: str | None = None, baseline_agent: str | None = None,
            candidate_agent: str | None = None, max_collision_increase: float = 0.5,
            max_slowdown: float | None = None, min_slowdown_ms: float = 0.1, baseline_name: str = "baseline",
            candidate_name: str = "candidate", margins: dict[str, float] | None = None) -> Verdict:
    """`regress` on two episode tables (columns agent, scenario, seed and the episode columns of the
    gated metrics: driving_score, collisions, km_driven, agent_wall_s_p50; `status` when known)."""
    if not 0 < alpha < 1:
        raise RegressInputError(f"alpha must be in (0, 1), got {alpha}")
    _check_thresholds(max_drop=max_drop, max_collision_increase=max_collision_increase, max_slowdown=max_slowdown)
    if n_boot < 100:
        raise RegressInputError(f"n_boot must be at least 100, got {n_boot}")
    for frame, which, name in ((base, "baseline", baseline_name), (cand, "candidate", candidate_name)):
        missing = [c for c in ("agent", *PAIR_KEYS) if c not in frame]
        if missing:
            raise RegressInputError(f"{which} run {name}: its episodes have no {', '.join(missing)} column; "
                                    "not a prunedrive episodes table")
    b = Side("baseline", baseline_name, _pick_agent(base, baseline_agent or agent, "baseline", baseline_name), "_b")
    c = Side("candidate", candidate_name, _pick_agent(cand, candidate_agent or agent, "candidate", candidate_name),
             "_c")
    base = base[base.agent == b.agent].drop_duplicates(PAIR_KEYS, keep="last")
    cand = cand[cand.agent == c.agent].drop_duplicates(PAIR_KEYS, keep="last")
    # Suffix every column ourselves: merge() leaves a column only one side has unsuffixed.
    paired = _suffixed(base, b.suffix).merge(_suffixed(cand, c.suffix), on=PAIR_KEYS)
    if paired.empty:
        raise RegressInputError(f"no common episodes: {b.run} and {c.run} share no (scenario, seed)")
    if len(paired) < 2:
        raise RegressInputError(f"only {len(paired)} common episode: a confidence interval needs at least 2 pairs")
    paired = paired.sort_values(PAIR_KEYS).reset_index(drop=True)
    for side in (b, c):
        _require_scored(paired, side)
    verdict = Verdict(b.run, c.run, b.agent, c.agent, len(paired), len(base) - len(paired), len(cand) - len(paired),
                      alpha, max_drop)
    margins = {"driving_score": max_drop, "collisions_per_km": max_collision_increase, "agent_ms_p50": max_slowdown,
               **(margins or {})}
    for i, m in enumerate(gated()):  # one bootstrap seed per check, in table order: verdicts stay reproducible
        gating = m.gate == GATE or bool(margins.get(m.key))
        check = STATISTICS[m.aggregate.how](m, paired, b, c, margins.get(m.key) or 0.0, gating, alpha, n_boot,
                                            seed + i, min_slowdown_ms)
        if check is not None:
            verdict.checks.append(check)
    verdict.differences = _values(paired, "driving_score", c) - _values(paired, "driving_score", b)
    return verdict


def _check_thresholds(max_drop: float, max_collision_increase: float, max_slowdown: float | None) -> None:
    """Finite margins only: NaN compares False with everything, so a NaN margin passed every regression."""
    def finite(value) -> bool:
        return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and bool(np.isfinite(value))

    for name, value in (("max_drop", max_drop), ("max_collision_increase", max_collision_increase)):
        if not (finite(value) and value >= 0):
            raise RegressInputError(f"{name} must be a finite number >= 0, got {value}")
    if max_slowdown is not None and not (finite(max_slowdown) and max_slowdown > 0):
        raise RegressInputError(f"max_slowdown must be a finite ratio > 0 (or None: not a gate), got {max_slowdown}")


def _suffixed(frame: pd.DataFrame, suffix: str) -> pd.DataFrame:
    return frame.rename(columns={column: column + suffix for column in frame.columns if column not in PAIR_KEYS})


def _require_scored(paired: pd.DataFrame, side: Side) -> None:
    """A side whose paired episodes all failed has no driving to compare: its scores are those of crashes."""
    status = paired.get("status" + side.suffix)
    if status is not None and (status == "failed").all():
        raise RegressInputError(f"{side}: all {len(paired)} paired episodes failed; no scored episode to compare "
                                "(see the run's errors, or `prunedrive summary`)")


def _values(paired: pd.DataFrame, column: str, side: Side) -> np.ndarray:
    """The paired episodes' `column` of one side as floats (anything not a number: NaN)."""
    return pd.to_numeric(paired[column + side.suffix], errors="coerce").to_numpy(float)


def _inputs(m: Metric, paired: pd.DataFrame, side: Side, gating: bool) -> dict[str, np.ndarray] | None:
    """{episode column: values} that `m` is computed from, for one side. A missing column, or a NaN
    where the metric does not skip episodes without a value, is unusable input for a gating check; a
    report-only check is then left out (None)."""
    columns = m.aggregate.sources + (("km_driven",) if m.aggregate.how == "per_km" else ())
    missing = [column for column in columns if column + side.suffix not in paired]
    if missing:
        if not gating:
            return None
        raise RegressInputError(f"{side}: no {', '.join(missing)} in its episodes, needed for {m.label}")
    values = {column: _values(paired, column, side) for column in columns}
    if not m.aggregate.skips_missing:
        for column, v in values.items():
            bad = ~np.isfinite(v)
            if bad.any():
                first = paired.loc[bad, PAIR_KEYS].head(3).itertuples(index=False)
                episodes = ", ".join(f"{scenario} seed {seed}" for scenario, seed in first)
                raise RegressInputError(f"{side}: {m.label} is NaN or missing ({column}) in {int(bad.sum())} of "
                                        f"{len(v)} paired episodes ({episodes}{', ...' if bad.sum() > 3 else ''})")
    return values


def _worse(m: Metric, change: float) -> float:
    """How much worse a change is (positive: worse) in the metric's direction."""
    return -change if m.higher_is_better else change


def _margin_text(m: Metric, margin: float) -> str:
    return f"{'drop' if m.higher_is_better else 'increase'} > {margin:g}"


def mean_difference(m: Metric, paired, b: Side, c: Side, margin: float, gating: bool, alpha: float, n_boot: int,
                    seed: int, min_increase: float) -> Check | None:
    """A mean over episodes: the paired mean difference, its bootstrap CI over episode pairs."""
    inputs_b, inputs_c = _inputs(m, paired, b, gating), _inputs(m, paired, c, gating)
    if inputs_b is None or inputs_c is None:
        return None
    (values_b,), (values_c,) = inputs_b.values(), inputs_c.values()
    d = values_c - values_b
    low, high = paired_bootstrap_ci(d, alpha, n_boot, seed)
    significant = low > 0 if not m.higher_is_better else high < 0  # the CI excludes no change, on the worse side
    return Check(m.label, float(values_b.mean()), float(values_c.mean()), float(d.mean()), low, high,
                 _margin_text(m, margin), bool(gating and significant and _worse(m, d.mean()) > margin), gating)


def rate_difference(m: Metric, paired, b: Side, c: Side, margin: float, gating: bool, alpha: float, n_boot: int,
                    seed: int, min_increase: float) -> Check | None:
    """A per-km rate: the difference of sum(count) / sum(km) over the same resampled pairs."""
    inputs_b, inputs_c = _inputs(m, paired, b, gating), _inputs(m, paired, c, gating)
    if inputs_b is None or inputs_c is None:
        return None
    count_b, count_c = (np.add.reduce([v[s] for s in m.aggregate.sources]) for v in (inputs_b, inputs_c))
    km_b, km_c = inputs_b["km_driven"], inputs_c["km_driven"]

    def rate_increase(cb, cc, kb, kc):
        return (cc.sum(axis=-1) / np.maximum(kc.sum(axis=-1), KM_FLOOR)
                - cb.sum(axis=-1) / np.maximum(kb.sum(axis=-1), KM_FLOOR))

    rate_b, rate_c = per_km(count_b.sum(), km_b.sum()), per_km(count_c.sum(), km_c.sum())
    low, high = bootstrap_statistic_ci(rate_increase, (count_b, count_c, km_b, km_c), alpha, n_boot, seed)
    change = rate_c - rate_b
    significant = low > 0 if not m.higher_is_better else high < 0
    return Check(m.label, rate_b, rate_c, change, low, high, _margin_text(m, margin),
                 bool(gating and significant and _worse(m, change) > margin), gating)


def median_ratio(m: Metric, paired, b: Side, c: Side, margin: float, gating: bool, alpha: float, n_boot: int,
                 seed: int, min_increase: float) -> Check | None:
    """A median over episodes of a per-episode statistic (step time p50): the ratio of the medians, over
    the pairs where both episodes have a value. A regression is a ratio above `margin` whose CI lies
    above 1 and whose absolute increase exceeds `min_increase` (timer noise on microsecond agents)."""
    inputs_b, inputs_c = _inputs(m, paired, b, gating), _inputs(m, paired, c, gating)
    if inputs_b is None or inputs_c is None:
        return None
    (t_b,), (t_c,) = inputs_b.values(), inputs_c.values()
    ok = np.isfinite(t_b) & np.isfinite(t_c)
    if ok.sum() < 2 or not np.median(t_b[ok]) > 0:
        if not gating:
            return None
        raise RegressInputError(f"{m.label}: {int(ok.sum())} paired episodes have a value on both sides "
                                f"(baseline median {np.median(t_b[ok]) if ok.any() else float('nan'):.3g}); "
                                "a ratio needs at least 2 and a positive baseline")
    t_b, t_c = t_b[ok], t_c[ok]
    med_b, med_c = float(np.median(t_b)), float(np.median(t_c))

    def ratio_of_medians(tb, tc):
        return np.median(tc, axis=-1) / np.median(tb, axis=-1)

    low, high = bootstrap_statistic_ci(ratio_of_medians, (t_b, t_c), alpha, n_boot, seed)
    ratio = med_c / med_b
    convert = m.aggregate.convert
    regressed = bool(gating and low > 1 and ratio > margin and convert(med_c - med_b) > min_increase)
    return Check(m.label, convert(med_b), convert(med_c), ratio, low, high,
                 f"ratio > {margin:g} and +{min_increase:g} {m.unit}" if gating else "-", regressed, gating, ratio=True)


# How the gate compares two runs on a metric follows from how the metric aggregates episodes.
STATISTICS = {"mean_std": mean_difference, "per_km": rate_difference, "median": median_ratio}


def assert_no_regression(baseline: str | Path, candidate: str | Path, max_drop: float = 5.0, **options) -> Verdict:
    """For tests: raise AssertionError with the verdict when `candidate` significantly regresses on
    `baseline` (see `regress` for the rule and options); return the verdict otherwise."""
    verdict = regress(baseline, candidate, max_drop=max_drop, **options)
    if verdict.regression:
        raise AssertionError("significant regression\n" + verdict.text())
    return verdict
