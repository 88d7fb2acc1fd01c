"""A model that `prunedrive bench` or `prunedrive claims` drives: its agent name, how it was made and where it is."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchModel:
    """name: the agent label it is driven as (llm-owl-0.7); method: the pruning method (models.card.DENSE for the
    dense model, app.bench_variants.VARIANT for a user's variant); sparsity: the target sparsity (NaN when unknown:
    a user's variant that does not say); directory: the model directory."""

    name: str
    method: str
    sparsity: float
    directory: Path
