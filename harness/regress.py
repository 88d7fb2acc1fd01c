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
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

RULE = ("regression = upper bound of the {level:.0%} paired-bootstrap CI of mean(candidate - baseline) < 0 "
        "and the mean drop > {max_drop:g} DS points")
BOOT_CHUNK = 2_000_000  # resampled indices per chunk: bounds memory for large suites


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


def bootstrap_indices(n: int, n_boot: int, seed: int):
    """Yield (chunk, n) index arrays of paired resamples, `n_boot` rows in all."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, BOOT_CHUNK // max(n, 1))
    left = n_boot
    while left > 0:
        rows = min(per_chunk, left)
        yield rng.integers(0, n, size=(rows, n))
        left -= rows


def paired_bootstrap_ci(differences: np.ndarray, alpha: float = 0.05, n_boot: int = 10000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences."""
    d = np.asarray(differences, np.float64)
    means = np.concatenate([d[idx].mean(axis=1) for idx in bootstrap_indices(len(d), n_boot, seed)])
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _ratio_ci(statistic, arrays: tuple[np.ndarray, ...], alpha: float, n_boot: int, seed: int) -> tuple[float, float]:
    n = len(arrays[0])
    values = np.concatenate([statistic(*(a[idx] for a in arrays)) for idx in bootstrap_indices(n, n_boot, seed)])
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def load_run(path: str | Path) -> tuple[dict, pd.DataFrame]:
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise RegressInputError(f"{path}: no run directory with a manifest.json")
    from prunedrive.harness.results import RunDir

    episodes = RunDir(path).episodes()
    if episodes.empty:
        raise RegressInputError(f"{path}: the run has no finished episodes")
    return json.loads(manifest_path.read_text()), episodes


def _pick_agent(episodes: pd.DataFrame, wanted: str | None, which: str, path: Path) -> str:
    agents = list(dict.fromkeys(episodes["agent"]))
    if wanted is not None:
        if wanted not in agents:
            raise RegressInputError(f"{which} run {path} has no agent {wanted!r}; it has: {', '.join(agents)}")
        return wanted
    if len(agents) > 1:
        raise RegressInputError(f"{which} run {path} has several agents ({', '.join(agents)}); "
                                f"pick one with --agent (or --{which}-agent)")
    return agents[0]


def regress(baseline_dir: str | Path, candidate_dir: str | Path, max_drop: float = 5.0, alpha: float = 0.05,
            n_boot: int = 10000, seed: int = 0, agent: str | None = None, baseline_agent: str | None = None,
            candidate_agent: str | None = None, max_collision_increase: float = 0.5,
            max_slowdown: float | None = None, min_slowdown_ms: float = 0.1) -> Verdict:
    """Compare `candidate_dir` to `baseline_dir` (run directories). Raises RegressInputError when they
    cannot be compared (different suites, missing runs, no common episodes, ambiguous agents).
    The cost check gates only with `max_slowdown` (a ratio, e.g. 1.5); by default it is reported."""
    baseline_dir, candidate_dir = Path(baseline_dir), Path(candidate_dir)
    base_manifest, base = load_run(baseline_dir)
    cand_manifest, cand = load_run(candidate_dir)
    base_suite = (base_manifest.get("config") or {}).get("suite")
    cand_suite = (cand_manifest.get("config") or {}).get("suite")
    if base_suite and cand_suite and base_suite != cand_suite:
        raise RegressInputError(f"different suites: baseline {baseline_dir} ran {base_suite!r}, candidate "
                                f"{candidate_dir} ran {cand_suite!r}; compare runs of the same suite")
    return compare(base, cand, max_drop=max_drop, alpha=alpha, n_boot=n_boot, seed=seed, agent=agent,
                   baseline_agent=baseline_agent, candidate_agent=candidate_agent,
                   max_collision_increase=max_collision_increase, max_slowdown=max_slowdown,
                   min_slowdown_ms=min_slowdown_ms, baseline_name=str(baseline_dir), candidate_name=str(candidate_dir))


def compare(base: pd.DataFrame, cand: pd.DataFrame, max_drop: float = 5.0, alpha: float = 0.05, n_boot: int = 10000,
            seed: int = 0, agent: str | None = None, baseline_agent: str | None = None,
            candidate_agent: str | None = None, max_collision_increase: float = 0.5,
            max_slowdown: float | None = None, min_slowdown_ms: float = 0.1, baseline_name: str = "baseline",
            candidate_name: str = "candidate") -> Verdict:
    """`regress` on two episode tables (columns agent, scenario, seed, driving_score, collisions,
    km_driven, agent_wall_s_p50)."""
    if not 0 < alpha < 1:
        raise RegressInputError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 100:
        raise RegressInputError(f"n_boot must be at least 100, got {n_boot}")
    baseline_dir, candidate_dir = baseline_name, candidate_name
    base_agent = _pick_agent(base, baseline_agent or agent, "baseline", baseline_dir)
    cand_agent = _pick_agent(cand, candidate_agent or agent, "candidate", candidate_dir)
    base = base[base.agent == base_agent].drop_duplicates(["scenario", "seed"], keep="last")
    cand = cand[cand.agent == cand_agent].drop_duplicates(["scenario", "seed"], keep="last")
    paired = base.merge(cand, on=["scenario", "seed"], suffixes=("_b", "_c"))
    if paired.empty:
        raise RegressInputError(f"no common episodes: {baseline_dir} and {candidate_dir} share no (scenario, seed)")
    if len(paired) < 2:
        raise RegressInputError(f"only {len(paired)} common episode: a confidence interval needs at least 2 pairs")
    paired = paired.sort_values(["scenario", "seed"]).reset_index(drop=True)
    verdict = Verdict(baseline_dir, candidate_dir, base_agent, cand_agent, len(paired),
                      len(base) - len(paired), len(cand) - len(paired), alpha, max_drop)

    # Driving score: paired mean difference.
    ds_b, ds_c = paired.driving_score_b.to_numpy(float), paired.driving_score_c.to_numpy(float)
    d = ds_c - ds_b
    low, high = paired_bootstrap_ci(d, alpha, n_boot, seed)
    verdict.differences = d
    verdict.checks.append(Check("driving score", float(ds_b.mean()), float(ds_c.mean()), float(d.mean()), low, high,
                                f"drop > {max_drop:g}", bool(high < 0 and -d.mean() > max_drop)))

    # Collisions per km: ratio of sums over the same resampled pairs.
    col_b, col_c = paired.collisions_b.to_numpy(float), paired.collisions_c.to_numpy(float)
    km_b, km_c = paired.km_driven_b.to_numpy(float), paired.km_driven_c.to_numpy(float)

    def per_km_increase(cb, cc, kb, kc):
        return cc.sum(axis=-1) / np.maximum(kc.sum(axis=-1), 0.001) - cb.sum(axis=-1) / np.maximum(kb.sum(axis=-1), 0.001)

    rate_b, rate_c = col_b.sum() / max(km_b.sum(), 0.001), col_c.sum() / max(km_c.sum(), 0.001)
    low, high = _ratio_ci(per_km_increase, (col_b, col_c, km_b, km_c), alpha, n_boot, seed + 1)
    increase = rate_c - rate_b
    verdict.checks.append(Check("collisions/km", rate_b, rate_c, increase, low, high,
                                f"increase > {max_collision_increase:g}",
                                bool(low > 0 and increase > max_collision_increase)))

    # Per-step cost: ratio of the medians of per-episode p50 agent wall time.
    t_b, t_c = paired.agent_wall_s_p50_b.to_numpy(float), paired.agent_wall_s_p50_c.to_numpy(float)
    ok = np.isfinite(t_b) & np.isfinite(t_c)
    if ok.sum() >= 2 and np.median(t_b[ok]) > 0:
        t_b, t_c = t_b[ok], t_c[ok]
        med_b, med_c = float(np.median(t_b)), float(np.median(t_c))

        def median_ratio(tb, tc):
            return np.median(tc, axis=-1) / np.median(tb, axis=-1)

        low, high = _ratio_ci(median_ratio, (t_b, t_c), alpha, n_boot, seed + 2)
        ratio = med_c / med_b
        gating = bool(max_slowdown)
        slower = bool(gating and low > 1 and ratio > max_slowdown and 1000 * (med_c - med_b) > min_slowdown_ms)
        verdict.checks.append(Check("agent ms/step (p50)", 1000 * med_b, 1000 * med_c, ratio, low, high,
                                    f"ratio > {max_slowdown:g} and +{min_slowdown_ms:g} ms" if gating else "-",
                                    slower, gating, ratio=True))
    return verdict


def assert_no_regression(baseline: str | Path, candidate: str | Path, max_drop: float = 5.0, **options) -> Verdict:
    """For tests: raise AssertionError with the verdict when `candidate` significantly regresses on
    `baseline` (see `regress` for the rule and options); return the verdict otherwise."""
    verdict = regress(baseline, candidate, max_drop=max_drop, **options)
    if verdict.regression:
        raise AssertionError("significant regression\n" + verdict.text())
    return verdict


# -- CLI ------------------------------------------------------------------------------------------

def add_regress_parser(sub) -> None:
    parser = sub.add_parser("regress", help="gate: is CANDIDATE significantly worse than BASELINE? (exit 1 if so)",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="baseline run (id under --out, or directory)")
    parser.add_argument("candidate", help="candidate run (id under --out, or directory)")
    parser.add_argument("--out", default="results", help="where run ids are looked up; default results/")
    parser.add_argument("--max-drop", type=float, default=5.0, help="driving-score points of drop tolerated (5)")
    parser.add_argument("--alpha", type=float, default=0.05, help="the CI is 1-alpha, two-sided (0.05)")
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    parser.add_argument("--agent", help="the agent to compare, in both runs (needed when a run has several)")
    parser.add_argument("--baseline-agent", help="the baseline's agent, when it differs from the candidate's")
    parser.add_argument("--candidate-agent", help="the candidate's agent")
    parser.add_argument("--max-collision-increase", type=float, default=0.5, help="collisions per km tolerated (0.5)")
    parser.add_argument("--max-slowdown", type=float, metavar="RATIO",
                        help="make the per-step agent time a gate: fail above this candidate/baseline ratio "
                             "(e.g. 1.5; default: reported only, since wall time depends on machine and load)")
    parser.add_argument("--json", metavar="FILE", help="also write the verdict as JSON")
    parser.set_defaults(func=cmd_regress)


def cmd_regress(args) -> int:
    try:
        verdict = regress(_resolve(args.baseline, args.out), _resolve(args.candidate, args.out),
                          max_drop=args.max_drop, alpha=args.alpha, n_boot=args.n_boot, seed=args.seed,
                          agent=args.agent, baseline_agent=args.baseline_agent, candidate_agent=args.candidate_agent,
                          max_collision_increase=args.max_collision_increase, max_slowdown=args.max_slowdown)
    except RegressInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdict.print()
    if args.json:
        Path(args.json).write_text(json.dumps(verdict.to_dict(), indent=2, default=float))
    return verdict.exit_code


def _resolve(run: str, out: str) -> Path:
    path = Path(run)
    if (path / "manifest.json").is_file():
        return path
    if (Path(out) / run / "manifest.json").is_file():
        return Path(out) / run
    places = dict.fromkeys([str(path), str(Path(out) / run)])
    raise RegressInputError(f"{run}: no run directory with a manifest.json (looked in {' and '.join(places)})")
