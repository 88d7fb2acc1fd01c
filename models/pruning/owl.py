"""OWL (Yin et al., ICML 2024): non-uniform per-block sparsity from the outlier distribution.

1. Dense calibration pass, block by block; Wanda scores A = |W| * ||X_j||_2 for every linear of a block,
   pooled; outlier ratio D_l = share of A above M x mean(A).
2. D min-max normalised to [0, 2*lam]; sparsity_l = S - (D_l - mean(D)): mean is S, more outliers ->
   less pruning. (OWL writes density_l = D_l - mean(D) + (1 - S), sparsity_l = 1 - density_l: the same.)
3. Prune with the base method at sparsity_l, sequentially.

Cross-check against luuyin/OWL lib/prune_all.py and llm-compressor `_infer_owl_layer_sparsity`:
- same formula in both; both keep D in percent, which min-max normalisation cancels.
- llm-compressor's activation norm is the mean over samples of per-sample ||X_j||_2, not the norm over
  all tokens (OWL/Wanda, and here): a slightly different score, same idea.
- neither guards max(D) == min(D) (division by zero); here every block then gets S.
- neither clips; here sparsities are clipped to [0, 0.99], which only bites (and breaks mean == S)
  when S < lam or S > 0.99 - lam.
- defaults: OWL's code M=3, its README's 70% runs M=5; llm-compressor owl_m=5. Here M=5, lam=0.08.
- N:M: OWL's `*_structure` variants shift N per block by a rounded, un-doubled lam-scaled ratio; here
  block l prunes round(sparsity_l * m) of every m (via `block_plan`), which for small lam is plain N:M.
"""
from __future__ import annotations

import torch
from torch import nn

from prunedrive.models.pruning.calibration import sequential_blocks
from prunedrive.models.pruning.magnitude import prune_magnitude
from prunedrive.models.pruning.masks import block_plan, parse_pattern
from prunedrive.models.pruning.method import BlockWeighting, PruneRequest, PruningMethod
from prunedrive.models.pruning.sparsegpt import prune_sparsegpt
from prunedrive.models.pruning.wanda import ColumnNorms, prune_wanda, wanda_scores

BASES = {"wanda": prune_wanda, "sparsegpt": prune_sparsegpt, "magnitude": prune_magnitude}


@torch.no_grad()
def owl_outlier_ratios(lm: nn.Module, calibration: list[dict], M: float = 5.0) -> list[float]:
    """D_l per decoder block on the dense model (nothing is pruned, so dense outputs feed the next block)."""
    ratios = []
    for _, linears, stats in sequential_blocks(lm, calibration, ColumnNorms):
        ratios.append(pooled_outlier_ratio([wanda_scores(lin, stats[name]) for name, lin in linears.items()], M))
    return ratios


def pooled_outlier_ratio(scores: list[torch.Tensor], M: float) -> float:
    """OWL's D for one block: the scores of all its layers pooled, share above M x their mean."""
    pooled = torch.cat([s.flatten() for s in scores])
    return (pooled > M * pooled.mean()).float().mean().item()


def owl_sparsities_from_ratios(ratios: list[float], sparsity: float, lam: float = 0.08,
                               weights: list[float] | None = None) -> list[float]:
    """D min-max normalised to [0, 2 lam]; sparsity_l = S - (D_l - mean D). `weights` (e.g. parameters per block,
    for blocks of unequal size such as the encoder's): the weighted mean, so the parameter-weighted mean sparsity
    is S (as the global sparsity should be); without them, the plain mean (OWL's decoder blocks are equal)."""
    D = torch.tensor(ratios, dtype=torch.float64)
    span = D.max() - D.min()
    if span == 0:
        return [float(sparsity)] * len(ratios)
    D = (D - D.min()) / span * 2 * lam
    if weights is None:
        centre = D.mean()
    else:
        w = torch.tensor(weights, dtype=torch.float64)
        centre = (D * w).sum() / w.sum()
    return (sparsity - (D - centre)).clamp(0.0, 0.99).tolist()


def owl_layer_sparsities(lm: nn.Module, calibration: list[dict], sparsity: float, M: float = 5.0,
                         lam: float = 0.08) -> list[float]:
    return owl_sparsities_from_ratios(owl_outlier_ratios(lm, calibration, M), sparsity, lam)


def prune_owl(lm: nn.Module, calibration: list[dict], sparsity: float | None, base: str = "wanda", M: float = 5.0,
              lam: float = 0.08, pattern=None, **base_kwargs) -> list[float]:
    """Prune with OWL per-block sparsities; returns the per-block sparsities applied (with a pattern:
    round(sparsity_l * m) / m, see `block_plan`)."""
    return owl_prune_report(lm, calibration, sparsity, base, M, lam, pattern, **base_kwargs)["layer_sparsities"]


def owl_prune_report(lm: nn.Module, calibration: list[dict], sparsity: float | None, base: str = "wanda",
                     M: float = 5.0, lam: float = 0.08, pattern=None, **base_kwargs) -> dict:
    """`prune_owl`, returning what it did: layer_sparsities (applied), outlier_ratios (raw D per block, on the
    dense model) and the settings (M, lam, base)."""
    if base not in BASES:
        raise ValueError(f"OWL base must be one of {sorted(BASES)}, got {base!r}")
    nm = parse_pattern(pattern)
    target = nm[0] / nm[1] if nm else sparsity
    ratios = owl_outlier_ratios(lm, calibration, M)
    layer_sparsities = owl_sparsities_from_ratios(ratios, target, lam)
    if base == "magnitude":
        prune_magnitude(lm, target, pattern, layer_sparsities)
    else:
        BASES[base](lm, calibration, target, pattern, layer_sparsities, **base_kwargs)
    return {"layer_sparsities": [s for s, _ in block_plan(len(layer_sparsities), target, pattern, layer_sparsities)],
            "outlier_ratios": ratios, "owl": {"M": M, "lam": lam, "base": base, **base_kwargs}}


def owl_settings(options: dict) -> dict:
    """OWL's settings as the encoder's pruner uses them: M, lam, base (defaults filled in, the base checked)."""
    settings = {"M": options.get("M", 5.0), "lam": options.get("lam", 0.08), "base": options.get("base", "wanda")}
    if settings["base"] not in BASES:
        raise ValueError(f"OWL base must be one of {', '.join(sorted(BASES))}, got {settings['base']!r}")
    return settings


def run(lm: nn.Module, request: PruneRequest) -> dict:
    return owl_prune_report(lm, request.calibration, request.sparsity, pattern=request.pattern, **request.options)


WEIGHTING = BlockWeighting(
    settings=owl_settings,
    outlier_ratio=lambda scores, settings: pooled_outlier_ratio(scores, settings["M"]),
    sparsities=lambda ratios, target, weights, settings: owl_sparsities_from_ratios(ratios, target, settings["lam"],
                                                                                    weights=weights))
METHOD = PruningMethod("owl", run, weighting=WEIGHTING)
