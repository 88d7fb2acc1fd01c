"""Pruning the driving LLM's vector encoder (models.driving_llm.VectorEncoder) with validity masks.

The encoder runs per-object MLPs and attention over fixed object slots; absent objects are padded slots (zeros in
the observation, which featurise to one constant vector: most vehicle rows and, on highways, every pedestrian
row). Those rows are masked out of attention and never influence the output, so here they are kept out of every
calibration statistic (Wanda's column norms, SparseGPT's Hessian, OWL's outlier ratios): each Linear sees only
the rows of its input that belong to a valid object:

  ego, route MLPs                       every row (one per sample)
  light MLP                             rows whose traffic light is present (traffic_light_mask)
  vehicles / pedestrians MLPs           rows of valid slots (vehicles_mask / pedestrians_mask)
  objects block k, v (the context)      valid object tokens (the encoder's attention mask)
  objects block q, o, mlp (queries)     valid object tokens, plus the first `direct_tokens` tokens (they reach the LM)
  cross block k, v                      valid object tokens
  cross block q, o, mlp, and proj       every row (latent queries and latent tokens)

Blocks (OWL's unit here): the five per-type MLPs, the object self-attention block, the Perceiver cross-attention
block and the output projection. Pruning is sequential by stage (MLPs -> objects -> cross -> proj): each stage's
statistics come from a forward of the encoder whose earlier stages are already pruned, as Wanda and SparseGPT
do over decoder blocks. OWL's outlier ratios come from the dense encoder, pooled per block, and its per-block
sparsities are centred on the parameter-weighted mean so that the encoder's global sparsity is the target.

A layer that sees no valid row at all (e.g. the pedestrian MLP when no calibration scene has a pedestrian) has no
activation statistics: it is pruned by |W| within each row (Wanda with equal column norms) and listed under
`no_valid_rows`.
"""
from __future__ import annotations

import torch
from torch import nn

from prunedrive.models.pruning.calibration import eval_mode, feed_linears
from prunedrive.models.pruning.masks import (apply_mask, block_plan, check_sparsity, find_linears, nm_skipped,
                                             parse_pattern, select_mask, weight_matrix)
from prunedrive.models.pruning.registry import PRUNING_METHODS, method_names
from prunedrive.models.pruning.wanda import ColumnNorms, wanda_scores

BLOCKS = ("ego", "route", "light", "vehicles", "pedestrians", "objects", "cross", "proj")
STAGES = (("ego", "route", "light", "vehicles", "pedestrians"), ("objects",), ("cross",), ("proj",))
_QUERY_SIDE = ("q", "o", "mlp")  # attention-block layers whose rows are the queries (the rest: k, v = context)


def encoder_blocks(encoder: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """{block: {qualified name under the encoder: Linear}}; every Linear of the encoder belongs to one block."""
    blocks = {b: {(f"{b}.{n}" if n else b): m for n, m in find_linears(getattr(encoder, b), ()).items()}
              for b in BLOCKS}
    known = {id(m) for linears in blocks.values() for m in linears.values()}
    unknown = [n for n, m in find_linears(encoder, ()).items() if id(m) not in known]
    if unknown:
        raise ValueError(f"encoder layers outside the known blocks: {', '.join(unknown)}")
    return blocks


def token_validity(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, 3 + vehicles + pedestrians] bool: the encoder's own attention mask over its object tokens
    (ego, route always; light, vehicle and pedestrian slots when present)."""
    b = batch["ego"].shape[0]
    ones = torch.ones(b, 2, dtype=torch.bool, device=batch["ego"].device)
    return torch.cat([ones, batch["traffic_light_mask"].reshape(b, -1)[:, :1] > 0, batch["vehicles_mask"] > 0,
                      batch["pedestrians_mask"] > 0], 1)


def encoder_valid_rows(encoder: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{Linear name: bool [rows of its flattened input]}: which rows are real objects (see the module docstring)."""
    b = batch["ego"].shape[0]
    tokens = token_validity(batch)
    queries = tokens.clone()
    queries[:, :getattr(encoder, "direct_tokens", 0)] = True
    n_latents = encoder.latents.shape[0]
    every = lambda n: torch.ones(b * n, dtype=torch.bool, device=tokens.device)  # noqa: E731
    per_block = {
        "ego": every(1), "route": every(1), "light": tokens[:, 2].reshape(-1),
        "vehicles": batch["vehicles_mask"].reshape(-1) > 0, "pedestrians": batch["pedestrians_mask"].reshape(-1) > 0,
        "proj": every(n_latents + getattr(encoder, "direct_tokens", 0)),
    }
    rows = {}
    for block, linears in encoder_blocks(encoder).items():
        for name in linears:
            if block in per_block:
                rows[name] = per_block[block]
            else:  # an attention block
                query_side = name.split(".")[1] in _QUERY_SIDE
                if block == "objects":
                    rows[name] = (queries if query_side else tokens).reshape(-1)
                else:
                    rows[name] = every(n_latents) if query_side else tokens.reshape(-1)
    return rows


@torch.no_grad()
def _gather(encoder: nn.Module, batch: dict, linears: dict[str, nn.Module], stat_cls, rows: dict) -> tuple[dict, dict]:
    stats = {n: stat_cls(lin) for n, lin in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def add(name, x):
        stats[name].add(x)
        counts[name] += x.shape[0]

    with eval_mode(encoder):
        feed_linears(lambda: encoder(batch), linears, add, rows)
    return stats, counts


def _norm_or_ones(linear: nn.Module, stats: ColumnNorms, count: int) -> ColumnNorms:
    if count == 0:  # no valid row: equal column norms, i.e. |W|
        stats.sq = torch.ones_like(stats.sq)
    return stats


def encoder_methods() -> list[str]:
    """The registered methods that can prune the encoder (`PruningMethod.prunes_linears`)."""
    return method_names(lambda spec: spec.prunes_linears)


def _linear_method(method: str, options: dict) -> tuple:
    """(the LinearRule that prunes each layer, the method's block weighting or None, its settings): asked of the
    registered method; one with a weighting prunes with its base method's rule."""
    spec = PRUNING_METHODS.get(method)
    if not spec.prunes_linears:
        raise ValueError(f"encoder pruning: method must be one of {', '.join(encoder_methods())}, got {method!r}")
    if spec.weighting is None:
        return spec.linear, None, {}
    settings = spec.weighting.settings(options)
    base = PRUNING_METHODS.get(settings["base"])
    if base.linear is None:
        raise ValueError(f"{method}: base {settings['base']!r} does not prune Linear by Linear")
    return base.linear, spec.weighting, settings


@torch.no_grad()
def prune_encoder(encoder: nn.Module, batch: dict[str, torch.Tensor] | None, method: str, sparsity: float | None,
                  pattern=None, **options) -> dict:
    """Prune every Linear of the vector encoder in place, calibrated on the observation `batch` (collated),
    padded object slots excluded from every statistic. `method`: a registered method that prunes Linear by Linear
    (magnitude: one |W| threshold per matrix; wanda; sparsegpt) or weighs blocks over such a base (owl: per-block
    sparsities from outlier ratios over the encoder's blocks); `options`: the method's own (owl: M, lam, base;
    sparsegpt: blocksize, percdamp). `batch` may be None for a method without input statistics. Returns
    block_sparsities, outlier_ratios (owl), nm_skipped, no_valid_rows, valid_row_share."""
    rule, weighting, settings = _linear_method(method, options)
    nm = parse_pattern(pattern)
    target = nm[0] / nm[1] if nm else check_sparsity(sparsity)
    blocks = encoder_blocks(encoder)
    all_linears = {n: lin for linears in blocks.values() for n, lin in linears.items()}
    if batch is None and (rule.statistics is not None or weighting is not None):
        raise ValueError(f"{method} needs a calibration batch of observations")
    rows = encoder_valid_rows(encoder, batch) if batch is not None else {}
    report: dict = {"valid_row_share": {n: float(r.float().mean()) for n, r in rows.items()}}

    if weighting is not None:
        stats, counts = _gather(encoder, batch, all_linears, ColumnNorms, rows)  # dense encoder
        ratios = {b: weighting.outlier_ratio([wanda_scores(lin, _norm_or_ones(lin, stats[n], counts[n]))
                                              for n, lin in blocks[b].items()], settings) for b in BLOCKS}
        sizes = [sum(lin.weight.numel() for lin in blocks[b].values()) for b in BLOCKS]
        sparsities = weighting.sparsities([ratios[b] for b in BLOCKS], target, sizes, settings)
        plan = dict(zip(BLOCKS, block_plan(len(BLOCKS), target, pattern, sparsities)))
        report.update(outlier_ratios=ratios, owl=settings)
    else:
        plan = dict(zip(BLOCKS, block_plan(len(BLOCKS), target, pattern)))

    report.update(block_sparsities={b: plan[b][0] for b in BLOCKS},
                  no_valid_rows=_prune_stages(encoder, batch, blocks, plan, rule, rule.options_of(options), rows),
                  nm_skipped=nm_skipped(all_linears, pattern) if nm else {})
    return report


def _prune_stages(encoder: nn.Module, batch: dict | None, blocks: dict, plan: dict, rule, options: dict,
                  rows: dict) -> dict[str, str]:
    """Each stage's layers pruned by `rule` at their block's sparsity, on statistics gathered through the
    earlier, already pruned stages; returns the layers that saw no valid row (pruned by |W| per row)."""
    no_rows = {}
    for stage in STAGES:
        linears = {n: lin for b in stage for n, lin in blocks[b].items()}
        if rule.statistics is None:  # the weights alone: nothing to gather
            stats, counts = dict.fromkeys(linears), None
        else:
            stats, counts = _gather(encoder, batch, linears, rule.statistics, rows)  # earlier stages already pruned
        for b in stage:
            s, block_nm = plan[b]
            for n, lin in blocks[b].items():
                if counts is not None and counts[n] == 0:
                    no_rows[n] = "no valid calibration row (every slot padded): pruned by |W| per row"
                    apply_mask(lin, select_mask(weight_matrix(lin).abs(), s, block_nm, per_row=True))
                else:
                    rule.prune(lin, stats[n], s, block_nm, **options)
    return no_rows
