"""`prunedrive claims`: the four claims of the seed papers, each asked closed-loop with paired CIs.

    (a) OWL's outlier-weighed layerwise sparsity beats uniform Wanda at high sparsity (OWL paper);
        with a lambda sweep that includes 0 (lambda 0 is uniform Wanda with OWL's code path).
    (b) driving calibration data beats generic-text calibration (OWLed), and random token ids.
    (c) the vector encoder is more sensitive to pruning than the LLM (OWLed): encoder-only vs LM-only.
    (d) DG2PF keeps accuracy at high sparsity (non-inferior to dense within a margin), and its gain is not
        just more training: vs a one-shot method given the same fine-tuning budget, vs DG2PF's own training
        at ~0 sparsity, and vs its ablations (no distillation, no gradual ramp).

Every variant is a recipe of `prunedrive.app.compress.prune_model_dir`, pruned once and cached like the
bench's. All variants and the dense model drive the same suite into one run directory (resumable), and
every comparison is a paired bootstrap over (scenario, seed). Verdicts:
  superiority ("A beats B"): supported when the 95% CI of mean(A - B) lies above 0, refuted when below 0,
      else inconclusive;
  non-inferiority ("A keeps accuracy"): supported when the CI's lower bound is above -margin, refuted when
      its upper bound is below -margin, else inconclusive.
  Below MIN_PAIRS_FOR_VERDICT paired episodes the verdict is "n too small" (the CI is too narrow to trust).
The table also gives the CI half-width reached, so one can see whether a 5-point difference was resolvable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.app.bench import DENSE, Phases, prune_variants
from prunedrive.harness.regress import MIN_PAIRS_FOR_VERDICT

NON_INFERIORITY_MARGIN = 5.0  # DS points a "keeps accuracy" claim may lose
FULL_SPARSITIES = (0.5, 0.7, 0.85, 0.9)
QUICK_SPARSITIES = (0.7,)
LAMBDAS = (0.0, 0.04, 0.16)  # besides OWL's default 0.08


@dataclass(frozen=True)
class Comparison:
    claim: str            # "a".."d"
    text: str             # what is compared, for people
    candidate: str        # agent names in the run
    baseline: str
    kind: str = "superiority"  # or "non-inferiority"


def plan(sparsities=FULL_SPARSITIES, lambdas=LAMBDAS, quick: bool = False) -> tuple[dict[str, dict], list[Comparison]]:
    """The variants ({agent name: prune_model_dir kwargs}) and the comparisons of the four claims."""
    variants: dict[str, dict] = {}
    comparisons: list[Comparison] = []

    def add(name: str, **recipe) -> str:
        variants.setdefault(f"llm-{name}", recipe)
        return f"llm-{name}"

    # (a) OWL vs uniform Wanda (and SparseGPT) across sparsities; lambda sweep at the highest.
    for s in sparsities:
        owl, wanda = add(f"owl-{s:g}", method="owl", sparsity=s), add(f"wanda-{s:g}", method="wanda", sparsity=s)
        comparisons.append(Comparison("a", f"OWL vs Wanda at {s:.0%}", owl, wanda))
        if not quick:
            sgpt = add(f"sparsegpt-{s:g}", method="sparsegpt", sparsity=s)
            comparisons.append(Comparison("a", f"OWL vs SparseGPT at {s:.0%}", owl, sgpt))
    top = max(sparsities)
    for lam in lambdas:
        other = add(f"owl-{top:g}-lam{lam:g}", method="owl", sparsity=top, lam=lam)
        comparisons.append(Comparison("a", f"OWL lambda 0.08 vs {lam:g} at {top:.0%}", f"llm-owl-{top:g}", other))
    # (b) calibration source at 0.7 (or the one quick sparsity).
    s = 0.7 if 0.7 in sparsities else sparsities[0]
    for method in ("owl", "wanda"):
        driving = add(f"{method}-{s:g}", method=method, sparsity=s)
        for source in ("generic", "random"):
            other = add(f"{method}-{s:g}-{source}", method=method, sparsity=s, calibration=source)
            comparisons.append(Comparison("b", f"{method}: driving vs {source} calibration at {s:.0%}", driving, other))
    # (c) encoder-only vs LM-only (and both): the claim is that pruning the encoder costs more.
    for s in ([0.5, 0.7] if not quick else list(sparsities)):
        lm = add(f"owl-{s:g}", method="owl", sparsity=s)
        encoder = add(f"owl-{s:g}-encoder", method="owl", sparsity=s, scope="encoder")
        add(f"owl-{s:g}-all", method="owl", sparsity=s, scope="all")
        comparisons.append(Comparison("c", f"LM-only vs encoder-only OWL at {s:.0%} (encoder more sensitive)",
                                      lm, encoder))
    # (d) DG2PF: non-inferior to dense; better than one-shot + equal fine-tuning; beyond its own training.
    control = add("dg2pf-0.01", method="dg2pf", sparsity=0.01)
    for s in sparsities:
        dg2pf = add(f"dg2pf-{s:g}", method="dg2pf", sparsity=s)
        comparisons.append(Comparison("d", f"DG2PF at {s:.0%} vs dense (keeps accuracy)", dg2pf, DENSE,
                                      "non-inferiority"))
        tuned = add(f"wanda-{s:g}-ft", method="wanda", sparsity=s, finetune=True)
        comparisons.append(Comparison("d", f"DG2PF vs Wanda + equal fine-tuning at {s:.0%}", dg2pf, tuned))
        comparisons.append(Comparison("d", f"DG2PF at {s:.0%} vs DG2PF's training at 1% (non-inferior)", dg2pf,
                                      control, "non-inferiority"))
    s = 0.7 if 0.7 in sparsities else sparsities[0]
    for ablation, option in (("nodistill", {"distill": False}), ("noramp", {"gradual": False})):
        other = add(f"dg2pf-{s:g}-{ablation}", method="dg2pf", sparsity=s, **option)
        comparisons.append(Comparison("d", f"DG2PF vs its ablation {ablation} at {s:.0%}", f"llm-dg2pf-{s:g}", other))
    return variants, comparisons


def judge(comparison: Comparison, low: float, high: float, n: int = MIN_PAIRS_FOR_VERDICT) -> str:
    if n < MIN_PAIRS_FOR_VERDICT:  # the percentile bootstrap is too narrow to trust on so few pairs
        return "n too small"
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    if comparison.kind == "non-inferiority":
        return "supported" if low > -NON_INFERIORITY_MARGIN else "refuted" if high < -NON_INFERIORITY_MARGIN \
            else "inconclusive"
    return "supported" if low > 0 else "refuted" if high < 0 else "inconclusive"


def claims_table(episodes: pd.DataFrame, comparisons: list[Comparison], n_boot: int = 10000) -> pd.DataFrame:
    """One row per comparison: paired DS difference and 95% CI, collisions/km difference, n, verdict."""
    from prunedrive.harness.metrics import per_km
    from prunedrive.harness.regress import compare_to_baseline

    rows = []
    for c in comparisons:
        pair = episodes[episodes["agent"].isin([c.candidate, c.baseline])]
        versus = compare_to_baseline(pair, c.baseline, n_boot=n_boot).set_index("agent")
        r = versus.loc[c.candidate] if c.candidate in versus.index else None
        low, high = (r["ci_low"], r["ci_high"]) if r is not None else (np.nan, np.nan)
        rate = {a: per_km(float(g["collisions"].sum()), float(g["km_driven"].sum())) for a, g in pair.groupby("agent")}
        rows.append({"claim": c.claim, "comparison": c.text, "candidate": c.candidate, "baseline": c.baseline,
                     "kind": c.kind, "n": int(r["n_pairs"]) if r is not None else 0,
                     "ds_diff": r["diff"] if r is not None else np.nan, "ci_low": low, "ci_high": high,
                     "ci_half_width": (high - low) / 2, "coll_per_km_diff": rate.get(c.candidate, np.nan) -
                     rate.get(c.baseline, np.nan),
                     "verdict": judge(c, low, high, int(r["n_pairs"]) if r is not None else 0)})
    return pd.DataFrame(rows)


def print_claims(table: pd.DataFrame, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=100 if not Console().is_terminal else min(Console().width, 120))
    out = Table(title="The seeds' claims, closed loop (paired by scenario and seed)", box=box.SIMPLE_HEAD,
                pad_edge=False, title_justify="left")
    for header in ("claim", "comparison", "n", "ΔDS [95% CI]", "Δcoll/km", "verdict"):
        out.add_column(header, justify="right" if header in ("n", "ΔDS [95% CI]", "Δcoll/km") else "left")
    for r in table.itertuples():
        diff = "–" if not np.isfinite(r.ds_diff) else f"{r.ds_diff:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}]"
        coll = "–" if not np.isfinite(r.coll_per_km_diff) else f"{r.coll_per_km_diff:+.2f}"
        out.add_row(r.claim, r.comparison, str(r.n), diff, coll, r.verdict)
    console.print(out)
    widths = table["ci_half_width"].dropna()
    if len(widths):
        console.print(f"CI half-width reached: median {widths.median():.1f} DS points (a 5-point difference is "
                      f"resolvable where it is below 5). Non-inferiority margin: {NON_INFERIORITY_MARGIN:g} DS.",
                      style="dim")


def run_claims(suite_name: str, preset: str, out: Path, run_id: str | None = None, workers: int | None = None,
               quick: bool = False, progress: bool = True, model: str | None = None, batch: int = 1) -> int:
    from prunedrive.agents.registry import AgentSpec
    from prunedrive.app.drive import drive, exit_code
    from prunedrive.app.train import ensure_default_model
    from prunedrive.scenarios.loader import load_suite

    say = Phases()
    suite = load_suite(suite_name)
    dense_dir = Path(model) if model else ensure_default_model(preset, progress=progress)
    variants, comparisons = plan(QUICK_SPARSITIES if quick else FULL_SPARSITIES, LAMBDAS[:1] if quick else LAMBDAS,
                                 quick)
    say(f"claims: {len(variants)} pruned variants of {dense_dir}, {len(comparisons)} paired comparisons")
    models = prune_variants(dense_dir, variants, progress, say)
    specs = [AgentSpec("llm", str(path), label=name) for name, (_, _, path) in models.items()]
    say(f"driving {len(specs) * len(suite.episodes())} episodes ({len(specs)} models x {len(suite.episodes())} "
        f"scenario-seeds of {suite.name})")
    config = {"model": str(dense_dir), "claims": True, "quick": quick,
              "models": {name: str(path) for name, (_, _, path) in models.items()},
              "method": {name: method for name, (method, _, _) in models.items()},
              "sparsity": {name: sparsity for name, (_, sparsity, _) in models.items()}}
    run_dir, episodes = drive(suite, specs, out, run_id=run_id,
                              default_run_id=f"claims-{suite.name}-{dense_dir.name}" + ("-quick" if quick else ""),
                              workers=workers, progress=progress, config=config, batch=batch)
    table = claims_table(episodes, comparisons)
    table.to_csv(run_dir.path / "claims.csv", index=False)
    (run_dir.path / "claims.json").write_text(json.dumps(table.to_dict("records"), indent=2, default=float))
    print_claims(table)
    say(f"results: {run_dir.path.resolve()} (claims.csv; `prunedrive report {run_dir.path.resolve()}` plots them)")
    return exit_code(episodes, run_dir)
