"""Width pruning: remove whole attention heads (key-value groups) and MLP channels, ranked by calibration statistics,
so every decoder block becomes a smaller dense block (models.pruning.surgery does the surgery and the saving).

Importance (Wanda-sp, the structured Wanda baseline in FLAP's comparisons: An et al., "Fluctuation-based Adaptive
Structured Pruning for Large Language Models", AAAI 2024, arXiv 2312.11983; grouping as LLM-Pruner's dependency
groups: Ma et al., NeurIPS 2023, arXiv 2305.11627): a group's score is the Wanda score |W_ij| * ||X_j||_2 (X_j: input
channel j of that layer over all calibration tokens; models.pruning.wanda.wanda_scores) summed over every weight of
the group:
- MLP channel c of a Llama block: gate_proj row c + up_proj row c + down_proj column c (down_proj's input norm is
  the norm of channel c's activation act(gate) * up); GPT-2: c_fc row c + c_proj column c.
- attention: one key-value group g (kv head g with the num_attention_heads / num_key_value_heads query heads that
  read it; without GQA a group is one head): q_proj rows of those heads + k_proj and v_proj rows of kv head g +
  o_proj columns of those heads. Whole groups go, so the query-per-kv ratio the attention code relies on is kept.
  GPT-2 keeps its heads (models.pruning.surgery: its config cannot express fewer heads of the same width).
Each block keeps the highest-scoring max(1, n - round(ratio * n)) groups of each kind. Blocks are pruned
sequentially: block l is scored on the outputs of the already pruned blocks before it (as Wanda does).
No bias compensation and no recovery training (FLAP folds removed channels' means into a bias; not done here).

Ratios per block: `prune_width` removes the same share from every block (uniform); `prune_owl_width` lets OWL's
outlier-weighed layerwise ratios (Yin et al., ICML 2024; models.pruning.owl) decide each block's share: blocks with
more outlier Wanda scores (share of scores above M x their block mean) lose less width, mean share = the target.
"""
from __future__ import annotations

import torch
from torch import nn

from prunedrive.models.pruning.calibration import sequential_blocks
from prunedrive.models.pruning.masks import check_sparsity, decoder_layers
from prunedrive.models.pruning.method import PruneRequest, PruningMethod
from prunedrive.models.pruning.owl import owl_outlier_ratios, owl_sparsities_from_ratios
from prunedrive.models.pruning.wanda import ColumnNorms, wanda_scores
from prunedrive.models.pruning.surgery import (block_layout, block_widths, head_dim, keep_heads, keep_mlp_channels,
                                               kv_groups)


def mlp_channel_scores(block: nn.Module, stats: dict[str, ColumnNorms], activations: bool = True) -> torch.Tensor:
    """Wanda-sp importance of each MLP channel of `block` [channels]. `stats`: ColumnNorms per linear (names relative
    to the block); activations=False gives the weight-only |W| sum (the magnitude variant, for comparison)."""
    layout = block_layout(block)
    score = _scores(block, stats, layout.mlp_out, activations).sum(0)          # down column c
    for path in layout.mlp_in:
        score = score + _scores(block, stats, path, activations).sum(1)     # gate / up row c
    return score


def kv_group_scores(block: nn.Module, stats: dict[str, ColumnNorms], head_width: int,
                    activations: bool = True) -> torch.Tensor:
    """Wanda-sp importance of each key-value group of a Llama-style `block` [groups] (see the module docstring)."""
    layout = block_layout(block)
    kv, _ = kv_groups(block, head_width)
    q = _scores(block, stats, layout.q, activations).sum(1).reshape(kv, -1).sum(1)  # a group's query heads are adjacent
    k = _scores(block, stats, layout.k, activations).sum(1).reshape(kv, -1).sum(1)
    v = _scores(block, stats, layout.v, activations).sum(1).reshape(kv, -1).sum(1)
    o = _scores(block, stats, layout.o, activations).sum(0).reshape(kv, -1).sum(1)
    return q + k + v + o


def _scores(block: nn.Module, stats: dict[str, ColumnNorms], path: str, activations: bool) -> torch.Tensor:
    layer = block.get_submodule(path)
    if activations:
        return wanda_scores(layer, stats[path])
    ones = ColumnNorms(layer)
    ones.sq.fill_(1.0)
    return wanda_scores(layer, ones)


def keep_count(n: int, ratio: float) -> int:
    """How many of n groups a block keeps when it loses `ratio` of them: at least one."""
    return max(1, n - round(check_sparsity(ratio) * n))


def top_groups(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the `keep` highest scores, in their original order."""
    return sorted(torch.topk(scores, keep).indices.tolist())


@torch.no_grad()
def prune_width_by_ratios(lm: nn.Module, calibration: list[dict], block_ratios: list[float], heads: bool = True,
                          activations: bool = True) -> dict:
    """Remove `block_ratios[l]` of block l's MLP channels and key-value groups (heads=False: MLP channels only), in
    place. Returns the per-block ratios asked for and the widths reached."""
    layers = decoder_layers(lm)
    if len(block_ratios) != len(layers):
        raise ValueError(f"{len(block_ratios)} block ratios for {len(layers)} decoder blocks")
    prunes_heads = heads and block_layout(layers[0]).q is not None
    head_width = head_dim(lm) if prunes_heads else None
    for i, _linears, stats in sequential_blocks(lm, calibration, ColumnNorms):
        block = layers[i]
        channels = mlp_channel_scores(block, stats, activations)
        groups = kv_group_scores(block, stats, head_width, activations) if prunes_heads else None
        # the generator re-runs this block after we return to it: the next block sees the pruned block's outputs
        keep_mlp_channels(block, top_groups(channels, keep_count(len(channels), block_ratios[i])))
        if groups is not None:
            keep_heads(block, top_groups(groups, keep_count(len(groups), block_ratios[i])), head_width)
    return {"block_ratios": [float(r) for r in block_ratios], "heads_pruned": prunes_heads,
            "widths": block_widths(lm), "importance": "wanda-sp" if activations else "weight-magnitude"}


def prune_width(lm: nn.Module, calibration: list[dict], ratio: float, heads: bool = True) -> dict:
    """Uniform width pruning: every block loses `ratio` of its MLP channels and key-value groups."""
    return prune_width_by_ratios(lm, calibration, [check_sparsity(ratio)] * len(decoder_layers(lm)), heads)


def prune_owl_width(lm: nn.Module, calibration: list[dict], ratio: float, M: float = 5.0, lam: float = 0.08,
                    heads: bool = True) -> dict:
    """Width pruning with OWL's per-block ratios (mean = `ratio`; more outliers, less width removed)."""
    outlier_ratios = owl_outlier_ratios(lm, calibration, M)
    block_ratios = owl_sparsities_from_ratios(outlier_ratios, check_sparsity(ratio), lam)
    report = prune_width_by_ratios(lm, calibration, block_ratios, heads)
    return {**report, "outlier_ratios": outlier_ratios, "owl": {"M": M, "lam": lam, "base": "wanda-sp"}}


def run_width(lm: nn.Module, request: PruneRequest) -> dict:
    return prune_width(lm, request.calibration, request.sparsity, **request.options)


def run_owl_width(lm: nn.Module, request: PruneRequest) -> dict:
    return prune_owl_width(lm, request.calibration, request.sparsity, **request.options)


METHOD = PruningMethod("width", run_width, structured=True)
OWL_METHOD = PruningMethod("owl-width", run_owl_width, structured=True)
