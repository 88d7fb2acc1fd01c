"""`prunedrive claims`: the four claims of the seed papers, each asked closed-loop with paired CIs.

    (a) OWL's outlier-weighed layerwise sparsity beats uniform Wanda at high sparsity (OWL paper);
        with a lambda sweep that includes 0 (lambda 0 is uniform Wanda with OWL's code path).
    (b) driving calibration data beats generic-text calibration (OWLed), and random token ids.
    (c) the vector encoder is more sensitive to pruning than the LLM (OWLed): encoder-only vs LM-only at the
        same sparsity of the part pruned, and per weight removed: the encoder holds a small share of the
        model's weights, so its sensitivity is the DS drop per 10% of the *model's* weights removed
        (the model card's sparsity), compared paired with the LM's.
    (d) DG2PF keeps accuracy at high sparsity (non-inferior to dense within a margin), and its gain is not
        just more training: vs a one-shot method given the same fine-tuning budget, vs DG2PF's own training
        at ~0 sparsity, and vs its ablations (no distillation, no gradual ramp).
    (e) with `--methods width owl-width depth`: what a real speed-up costs in driving. Each structured method at
        matched parameter counts against Wanda (same share of the LM's prunable parameters removed, or of its
        blocks for depth) and against dense (non-inferiority).

Every variant is a recipe of `prunedrive.app.prune.prune_model_dir`, pruned once and cached like the
bench's. All variants and the dense model drive the same suite into one run directory (resumable), and
every comparison is a paired bootstrap over (scenario, seed). Verdicts:
  superiority ("A beats B"): supported when the 95% CI of mean(A - B) lies above 0, refuted when below 0,
      else inconclusive;
  non-inferiority ("A keeps accuracy"): supported when the CI's lower bound is above -margin, refuted when
      its upper bound is below -margin, else inconclusive.
  Below MIN_PAIRS_FOR_VERDICT paired episodes the verdict is "n too small" (the CI is too narrow to trust).
The table also gives the CI half-width reached, so one can see whether a 5-point difference was resolvable.
The run gets both tables as attachments (`claims`, rendered by app.claims_report in `prunedrive report`, and
`sensitivity`). The second table gives, for OWL with each scope, the paired DS drop from dense per 10% of the
part pruned and per 10% of the model's weights removed, with CIs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.app.bench import DENSE_AGENT, Phases, prune_variants
from prunedrive.app.bench_model import BenchModel
from prunedrive.app.claims_report import CLAIMS_ATTACHMENT, SENSITIVITY_ATTACHMENT
from prunedrive.harness.latency import parse_latency, run_id_suffix
from prunedrive.harness.paired import MIN_PAIRS_FOR_VERDICT

NON_INFERIORITY_MARGIN = 5.0  # DS points a "keeps accuracy" claim may lose
FULL_SPARSITIES = (0.5, 0.7, 0.85, 0.9)
QUICK_SPARSITIES = (0.7,)
LAMBDAS = (0.0, 0.04, 0.16)  # besides OWL's default 0.08
PER_WEIGHTS = 0.1  # sensitivity is the DS drop per this share of weights removed (10%)


@dataclass(frozen=True)
class Comparison:
    claim: str            # "a".."d"; "e" with structured methods
    text: str             # what is compared, for people
    candidate: str        # agent names in the run
    baseline: str
    kind: str = "superiority"  # or "non-inferiority"; "per-weight": A's DS drop from dense per 10% of the
    #                            model's weights removed exceeds B's (a superiority test on that difference)


def plan(sparsities=FULL_SPARSITIES, lambdas=LAMBDAS, quick: bool = False,
         structured=()) -> tuple[dict[str, dict], list[Comparison]]:
    """The variants ({agent name: prune_model_dir kwargs}) and the comparisons of the four claims, and with
    `structured` methods (width, owl-width, depth) the driving price of each real speed-up (`structured_claims`)."""
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
        comparisons.append(Comparison("c", f"encoder vs LM OWL at {s:.0%}: DS drop per 10% of the model's weights",
                                      encoder, lm, "per-weight"))
    # (d) DG2PF: non-inferior to dense; better than one-shot + equal fine-tuning; beyond its own training.
    control = add("dg2pf-0.01", method="dg2pf", sparsity=0.01)
    for s in sparsities:
        dg2pf = add(f"dg2pf-{s:g}", method="dg2pf", sparsity=s)
        comparisons.append(Comparison("d", f"DG2PF at {s:.0%} vs dense (keeps accuracy)", dg2pf, DENSE_AGENT,
                                      "non-inferiority"))
        tuned = add(f"wanda-{s:g}-ft", method="wanda", sparsity=s, finetune=True)
        comparisons.append(Comparison("d", f"DG2PF vs Wanda + equal fine-tuning at {s:.0%}", dg2pf, tuned))
        comparisons.append(Comparison("d", f"DG2PF at {s:.0%} vs DG2PF's training at 1% (non-inferior)", dg2pf,
                                      control, "non-inferiority"))
    s = 0.7 if 0.7 in sparsities else sparsities[0]
    for ablation, option in (("nodistill", {"distill": False}), ("noramp", {"gradual": False})):
        other = add(f"dg2pf-{s:g}-{ablation}", method="dg2pf", sparsity=s, **option)
        comparisons.append(Comparison("d", f"DG2PF vs its ablation {ablation} at {s:.0%}", f"llm-dg2pf-{s:g}", other))
    comparisons.extend(structured_claims(add, structured, sparsities))
    return variants, comparisons


STRUCTURED_MAX = 0.7  # structured variants above this share removed are left out: a fifth of a model cannot drive


def structured_claims(add, methods, sparsities) -> list[Comparison]:
    """(e) at matched parameter counts: a structured method at s removes s of the LM's prunable parameters (width,
    owl-width) or of its blocks (depth), Wanda at s zeroes s of them. Each structured variant against Wanda at
    the same s (what the real speed-up costs in driving against masks that buy none) and against dense
    (non-inferiority); `add` registers a variant as plan() does."""
    comparisons = []
    for method in methods:
        for s in [s for s in sparsities if s <= STRUCTURED_MAX] or [min(sparsities)]:
            variant, wanda = add(f"{method}-{s:g}", method=method, sparsity=s), add(f"wanda-{s:g}", method="wanda",
                                                                                  sparsity=s)
            comparisons.append(Comparison("e", f"{method} vs Wanda at {s:.0%} (matched parameters)", variant, wanda))
            comparisons.append(Comparison("e", f"{method} at {s:.0%} vs dense (keeps accuracy)", variant, DENSE_AGENT,
                                          "non-inferiority"))
    return comparisons


def judge(comparison: Comparison, low: float, high: float, n: int = MIN_PAIRS_FOR_VERDICT) -> str:
    if n < MIN_PAIRS_FOR_VERDICT:  # the percentile bootstrap is too narrow to trust on so few pairs
        return "n too small"
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    if comparison.kind == "non-inferiority":
        return "supported" if low > -NON_INFERIORITY_MARGIN else "refuted" if high < -NON_INFERIORITY_MARGIN \
            else "inconclusive"
    return "supported" if low > 0 else "refuted" if high < 0 else "inconclusive"


def paired_scores(episodes: pd.DataFrame, agents: list[str]) -> pd.DataFrame:
    """Driving scores, one column per agent, one row per (scenario, seed) every agent has a score for."""
    from prunedrive.harness.paired import scored_episodes

    scored = scored_episodes(episodes)
    scored = scored[scored["agent"].isin(agents)]
    table = scored.pivot_table(index=["scenario", "seed"], columns="agent", values="driving_score", aggfunc="first")
    return table.reindex(columns=agents).dropna()


def drop_per_weights(scores: pd.DataFrame, agent: str, removed: float) -> pd.Series:
    """Per episode: the agent's DS drop from dense per PER_WEIGHTS of weights removed (`removed`: a share)."""
    return (scores[DENSE_AGENT] - scores[agent]) / (removed / PER_WEIGHTS)


def _per_weight_row(episodes: pd.DataFrame, c: Comparison, model_sparsity: dict[str, float], n_boot: int) -> dict:
    from prunedrive.harness.paired import paired_bootstrap_ci

    scores = paired_scores(episodes, [DENSE_AGENT, c.candidate, c.baseline])
    shares = [model_sparsity.get(a, np.nan) for a in (c.candidate, c.baseline)]
    if not len(scores) or not all(np.isfinite(x) and x > 0 for x in shares):
        return {"n": len(scores), "ds_diff": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    d = (drop_per_weights(scores, c.candidate, shares[0]) - drop_per_weights(scores, c.baseline, shares[1])).to_numpy()
    low, high = paired_bootstrap_ci(d, n_boot=n_boot)
    return {"n": len(d), "ds_diff": float(d.mean()), "ci_low": low, "ci_high": high}


def claims_table(episodes: pd.DataFrame, comparisons: list[Comparison], n_boot: int = 10000,
                 model_sparsity: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per comparison: paired DS difference and 95% CI, collisions/km difference, n, verdict.
    A "per-weight" comparison's difference is in DS points per 10% of the model's weights (`model_sparsity`:
    {agent: share of the model's weights that are zero}); it has no collision difference."""
    from prunedrive.harness.metrics import per_km
    from prunedrive.harness.paired import compare_to_baseline

    rows = []
    for c in comparisons:
        if c.kind == "per-weight":
            r = _per_weight_row(episodes, c, model_sparsity or {}, n_boot)
            rows.append({"claim": c.claim, "comparison": c.text, "candidate": c.candidate, "baseline": c.baseline,
                         "kind": c.kind, **r, "ci_half_width": (r["ci_high"] - r["ci_low"]) / 2,
                         "coll_per_km_diff": np.nan, "margin": np.nan,
                         "verdict": judge(c, r["ci_low"], r["ci_high"], r["n"])})
            continue
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
                     "margin": NON_INFERIORITY_MARGIN if c.kind == "non-inferiority" else np.nan,
                     "verdict": judge(c, low, high, int(r["n_pairs"]) if r is not None else 0),
                     "step_ratio": step_ratio(pair, c.candidate, c.baseline)})
    return pd.DataFrame(rows)


def step_ratio(episodes: pd.DataFrame, candidate: str, baseline: str) -> float:
    """The candidate's measured per-step agent time over the baseline's, in this run (median over episodes of each
    episode's p50): what the candidate's pruning bought in time (claim e: structured against masks). NaN without
    times."""
    if "agent_wall_s_p50" not in episodes:
        return np.nan
    times = pd.to_numeric(episodes["agent_wall_s_p50"], errors="coerce").groupby(episodes["agent"]).median()
    mine, theirs = times.get(candidate, np.nan), times.get(baseline, np.nan)
    return float(mine / theirs) if np.isfinite(mine) and np.isfinite(theirs) and theirs > 0 else np.nan


def sensitivity_agents(variants: dict[str, dict]) -> list[tuple[str, str, float]]:
    """(agent, scope, target sparsity) of claim (c): the plain OWL variants (no other option than the scope) at
    the sparsities where some variant prunes another scope than the LM."""
    scoped = {v["sparsity"] for v in variants.values() if v.get("scope")}
    return [(name, v.get("scope", "lm"), v["sparsity"]) for name, v in variants.items()
            if v["method"] == "owl" and v["sparsity"] in scoped and set(v) <= {"method", "sparsity", "scope"}]


def sensitivity_table(episodes: pd.DataFrame, agents: list[tuple[str, str, float]],
                      model_sparsity: dict[str, float], n_boot: int = 10000) -> pd.DataFrame:
    """Claim (c)'s sensitivities: per agent, the paired DS drop from dense (95% CI), and that drop per 10% of the
    part pruned (the target) and per 10% of the model's weights removed (`model_sparsity`)."""
    from prunedrive.harness.paired import compare_to_baseline

    rows = []
    for agent, scope, target in agents:
        pair = episodes[episodes["agent"].isin([DENSE_AGENT, agent])]
        versus = compare_to_baseline(pair, DENSE_AGENT, n_boot=n_boot)
        r = versus.set_index("agent").loc[agent] if agent in set(versus["agent"]) else None
        n = int(r["n_pairs"]) if r is not None else 0
        # a drop is the difference to dense with its sign turned: dense - agent, CI (-high, -low)
        drop, low, high = (-r["diff"], -r["ci_high"], -r["ci_low"]) if n else (np.nan, np.nan, np.nan)
        row = {"agent": agent, "scope": scope, "target_sparsity": target,
               "model_sparsity": model_sparsity.get(agent, np.nan), "n": n, "ds_drop": drop, "ci_low": low,
               "ci_high": high}
        for key, share in (("per_part", target), ("per_model", row["model_sparsity"])):
            scale = PER_WEIGHTS / share if np.isfinite(share) and share > 0 else np.nan
            row.update({f"drop_{key}": row["ds_drop"] * scale, f"drop_{key}_low": low * scale,
                        f"drop_{key}_high": high * scale})
        rows.append(row)
    columns = ["agent", "scope", "target_sparsity", "model_sparsity", "n", "ds_drop", "ci_low", "ci_high"] + [
        f"drop_{key}{end}" for key in ("per_part", "per_model") for end in ("", "_low", "_high")]
    return pd.DataFrame(rows, columns=columns)


def model_sparsities(models: dict[str, BenchModel]) -> dict[str, float]:
    """{agent: share of the model's weights that are zero} from each pruned model's card (models.card)."""
    from prunedrive.models.card import read_model_card

    out = {}
    for name, model in models.items():
        card = read_model_card(model.directory)
        if card.written and card.sparsity is not None:
            out[name] = card.sparsity
    return out


def attach_claims(run_dir, table: pd.DataFrame, sensitivity: pd.DataFrame) -> None:
    """The claims table as the run's `claims` attachment (rendered by app.claims_report.claims_section, which also
    draws the `sensitivity` attachment beside it)."""
    run_dir.attach(SENSITIVITY_ATTACHMENT, sensitivity, producer=__name__)
    run_dir.attach(CLAIMS_ATTACHMENT, table, producer=__name__, section="prunedrive.app.claims_report:claims_section")


def _console():
    from rich.console import Console

    return Console(width=100 if not Console().is_terminal else min(Console().width, 120))


def print_claims(table: pd.DataFrame, console=None) -> None:
    from rich import box
    from rich.table import Table

    console = console or _console()
    out = Table(title="The seeds' claims, closed loop (paired by scenario and seed)", box=box.SIMPLE_HEAD,
                pad_edge=False, title_justify="left")
    for header in ("claim", "comparison", "n", "ΔDS [95% CI]", "Δcoll/km", "step ×", "verdict"):
        out.add_column(header, justify="right" if header in ("n", "ΔDS [95% CI]", "Δcoll/km", "step ×") else "left")
    for r in table.itertuples():
        diff = "–" if not np.isfinite(r.ds_diff) else f"{r.ds_diff:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}]"
        coll = "–" if not np.isfinite(r.coll_per_km_diff) else f"{r.coll_per_km_diff:+.2f}"
        ratio = getattr(r, "step_ratio", np.nan)
        out.add_row(r.claim, r.comparison, str(r.n), diff, coll, "–" if not np.isfinite(ratio) else f"{ratio:.2f}",
                    r.verdict)
    console.print(out)
    widths = table.loc[table["kind"] != "per-weight", "ci_half_width"].dropna()
    if len(widths):
        console.print(f"CI half-width reached: median {widths.median():.1f} DS points (a 5-point difference is "
                      f"resolvable where it is below 5). Non-inferiority margin: {NON_INFERIORITY_MARGIN:g} DS. "
                      "step ×: the candidate's measured step time over the baseline's in this run.",
                      style="dim")


def print_sensitivity(table: pd.DataFrame, console=None) -> None:
    from rich import box
    from rich.table import Table

    if table.empty:
        return
    console = console or _console()
    out = Table(title="Claim (c): sensitivity, OWL by scope (DS drop from dense, paired)", box=box.SIMPLE_HEAD,
                pad_edge=False, title_justify="left")
    for header in ("scope", "part", "model", "n", "DS drop [95% CI]", "per 10% of part", "per 10% of model"):
        out.add_column(header, justify="left" if header == "scope" else "right", no_wrap=True)

    def ci(r, key):
        value, low, high = (getattr(r, f"{key}"), getattr(r, f"{key}_low"), getattr(r, f"{key}_high"))
        return "–" if not np.isfinite(value) else f"{value:+.1f} [{low:+.1f}, {high:+.1f}]"

    for r in table.itertuples():
        drop = "–" if not np.isfinite(r.ds_drop) else f"{r.ds_drop:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}]"
        out.add_row(r.scope, f"{r.target_sparsity:.0%}", f"{r.model_sparsity:.1%}", str(r.n), drop,
                    ci(r, "drop_per_part"), ci(r, "drop_per_model"))
    console.print(out)
    console.print("OWL with each scope (the run's sensitivity attachment names the agents). part: the target "
                  "sparsity of the part "
                  "pruned; model: the share of all the model's weights that are zero. A positive drop is a loss of "
                  "DS.", style="dim")


def run_claims(suite_name: str, preset: str, out: Path, run_id: str | None = None, workers: int | None = None,
               quick: bool = False, progress: bool = True, model: str | None = None, batch: int = 1,
               latency: str | None = None, device: str = "cpu", dtype: str = "float32", structured=()) -> int:
    """The four claims (module docstring). device/dtype (models.device): pruning on the device in float32 (DG2PF
    trains in float32 only), driving on the device in the dtype."""
    from prunedrive.agents.registry import AgentSpec
    from prunedrive.app.run import drive, exit_code
    from prunedrive.app.train import ensure_default_model
    from prunedrive.harness.backends import check_suite
    from prunedrive.scenarios.loader import load_suite

    say = Phases()
    suite = check_suite(load_suite(suite_name))  # kinds and options too: refused before anything is trained
    parse_latency(latency)  # a bad --latency or profile is refused before anything is trained, pruned or driven
    dense_dir = Path(model) if model else ensure_default_model(preset, progress=progress)
    variants, comparisons = plan(QUICK_SPARSITIES if quick else FULL_SPARSITIES, LAMBDAS[:1] if quick else LAMBDAS,
                                 quick, structured)
    say(f"claims: {len(variants)} pruned variants of {dense_dir}, {len(comparisons)} paired comparisons")
    models = prune_variants(dense_dir, variants, progress, say, device)
    specs = [AgentSpec("llm", str(model.directory), label=name) for name, model in models.items()]
    say(f"driving {len(specs) * len(suite.episodes())} episodes ({len(specs)} models x {len(suite.episodes())} "
        f"scenario-seeds of {suite.name})")
    config = {"model": str(dense_dir), "claims": True, "quick": quick,
              "models": {name: str(model.directory) for name, model in models.items()},
              "method": {name: model.method for name, model in models.items()},
              "sparsity": {name: model.sparsity for name, model in models.items()}}
    run_dir, episodes = drive(suite, specs, out, run_id=run_id,
                              default_run_id=f"claims-{suite.name}-{dense_dir.name}" + ("-quick" if quick else "")
                              + run_id_suffix(latency),
                              workers=workers, progress=progress, config=config, batch=batch, latency=latency,
                              device=device, dtype=dtype)
    shares = model_sparsities(models)
    table = claims_table(episodes, comparisons, model_sparsity=shares)
    sensitivity = sensitivity_table(episodes, sensitivity_agents(variants), shares)
    attach_claims(run_dir, table, sensitivity)
    print_claims(table)
    print_sensitivity(sensitivity)
    say(f"results: {run_dir.path.resolve()} (attachments/claims.parquet; "
        f"`prunedrive report {run_dir.path.resolve()}` plots them)")
    return exit_code(episodes, run_dir)
