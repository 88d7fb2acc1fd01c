"""Paired statistics over episodes: two agents (or two runs) driven on the same (scenario, seed) pairs.

The per-episode difference cancels scenario difficulty, so the statistics here resample episode pairs:
the percentile bootstrap CI of the mean paired difference (`paired_bootstrap_ci`), of any statistic of
paired arrays (`bootstrap_statistic_ci`), and every agent of a run against a baseline agent
(`compare_to_baseline`, the bench and claims tables and the report). The regression gate
(harness/regress.py) uses the same functions. Resamples come from one generator seeded with `seed`, in
chunks of BOOT_CHUNK indices, so a CI is reproducible and bounded in memory.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

BOOT_CHUNK = 2_000_000  # resampled indices per chunk: bounds memory for large suites


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


MIN_PAIRS_FOR_VERDICT = 10  # below this the percentile bootstrap is too narrow to conclude anything


def scored_episodes(episodes: pd.DataFrame) -> pd.DataFrame:
    """The episodes that carry a score: an agent's own failure is a result (DS 0); only infrastructure
    failures (simulator, worker) say nothing about the agent and are left out."""
    if "status" not in episodes:
        return episodes
    failure = episodes["failure"] if "failure" in episodes else pd.Series("", index=episodes.index)
    return episodes[~(episodes["status"].eq("failed") & failure.ne("agent"))]


def compare_to_baseline(episodes: pd.DataFrame, baseline: str, metric: str = "driving_score", alpha: float = 0.05,
                        n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Every other agent of `episodes` against `baseline` on `metric`, paired by (scenario, seed): one row
    per agent with n (paired, scored episodes), the mean paired difference, its (1 - alpha) percentile
    bootstrap CI and a verdict: "better" / "worse" when the CI excludes 0, "no sig. difference" when it
    does not ("no sig. diff"), "n too small" below MIN_PAIRS_FOR_VERDICT pairs (the CI would be too narrow to trust)."""
    scored = scored_episodes(episodes)
    base = scored[scored["agent"] == baseline].set_index(["scenario", "seed"])[metric]
    rows = []
    for agent, group in scored.groupby("agent", sort=False):
        if agent == baseline:
            continue
        paired = group.set_index(["scenario", "seed"])[metric].to_frame("candidate").join(
            base.rename("baseline"), how="inner").dropna()
        d = (paired["candidate"] - paired["baseline"]).to_numpy(np.float64)
        if len(d) == 0:
            rows.append({"agent": agent, "n_pairs": 0, "diff": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                         "verdict": "no pairs"})
            continue
        low, high = paired_bootstrap_ci(d, alpha, n_boot, seed)
        verdict = ("n too small" if len(d) < MIN_PAIRS_FOR_VERDICT else "better" if low > 0 else "worse" if high < 0
                   else "no sig. diff")
        rows.append({"agent": agent, "n_pairs": len(d), "diff": float(d.mean()), "ci_low": low, "ci_high": high,
                     "verdict": verdict})
    return pd.DataFrame(rows, columns=["agent", "n_pairs", "diff", "ci_low", "ci_high", "verdict"])


def bootstrap_statistic_ci(statistic, arrays: tuple[np.ndarray, ...], alpha: float, n_boot: int,
                           seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic(*arrays)` over resampled pairs; resamples where it is not finite
    are dropped (NaN, NaN when none is left)."""
    n = len(arrays[0])
    values = np.concatenate([statistic(*(a[idx] for a in arrays)) for idx in bootstrap_indices(n, n_boot, seed)])
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)
