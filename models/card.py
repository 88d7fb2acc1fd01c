"""The model card: what a model directory says about how it was made, written by `prunedrive prune` and read
by one function, `read_model_card`, wherever a table, the bench or the claims need it.

The card lives in the directory's `sparsity.json` (the name prune has always written, so every pruned model
already has one). A directory without it is described from what it has: a compressed-tensors checkpoint
(llm-compressor's) by its `quantization_config`, anything else as a dense model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_FILE = "sparsity.json"
DENSE = "dense"


@dataclass(frozen=True)
class ModelCard:
    """method: the pruning method (`dense` when nothing was pruned or nothing says so); sparsity: the share of
    the model's weights that are zero (None when the directory does not say); target_sparsity: what was asked;
    pattern: an N:M pattern or None; scope: `lm` or `all` (what prune touched); parts: share of zeros per part
    (encoder, lm); recipe_hash: the bench's key of the pruning recipe, when it made the model; checkpoint: bytes on
    disk, layout and scheme (models.checkpoints.checkpoint_record); source: `prunedrive` (a card was written),
    `compressed-tensors` (read from config.json) or `none`; record: the whole card as written."""

    directory: Path
    method: str = DENSE
    sparsity: float | None = None
    target_sparsity: float | None = None
    pattern: str | None = None
    scope: str | None = None
    parts: dict[str, float] = field(default_factory=dict)
    recipe_hash: str | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)
    source: str = "none"
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def written(self) -> bool:
        """True when prunedrive wrote this card (the directory is one of its pruned models)."""
        return self.source == "prunedrive"


class ModelCardError(ValueError):
    """A card that exists but cannot be read (names the file)."""


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def write_model_card(directory: str | Path, record: dict[str, Any], default=None) -> Path:
    """Write `record` as the directory's card; returns its path. `default` converts what JSON cannot hold."""
    path = Path(directory) / CARD_FILE
    path.write_text(json.dumps(record, indent=2, default=default))
    return path


def _card_from_record(directory: Path, record: dict[str, Any]) -> ModelCard:
    parts = {name: float(value) for name, value in (record.get("parts") or {}).items()
             if _number(value) is not None} if isinstance(record.get("parts"), dict) else {}
    checkpoint = record.get("checkpoint") if isinstance(record.get("checkpoint"), dict) else {}
    sparsity = _number(record.get("global", record.get("target_sparsity")))
    return ModelCard(directory=directory, method=str(record.get("method") or DENSE), sparsity=sparsity,
                     target_sparsity=_number(record.get("target_sparsity")), pattern=record.get("pattern"),
                     scope=record.get("scope"), parts=parts, recipe_hash=record.get("recipe_hash"),
                     checkpoint=checkpoint, source="prunedrive", record=record)


def _compressed_tensors_card(directory: Path) -> ModelCard | None:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict):
        return None
    sparsity_config = quantization.get("sparsity_config") or {}
    sparsity = _number(sparsity_config.get("global_sparsity")) if isinstance(sparsity_config, dict) else None
    return ModelCard(directory=directory, method="compressed-tensors", sparsity=sparsity,
                     source="compressed-tensors", record={"quantization_config": quantization})


def read_model_card(directory: str | Path) -> ModelCard:
    """The card of a model directory: prunedrive's own, else what a compressed-tensors config says, else a dense
    card (`source` tells which). A card that is not a JSON object is an error naming the file."""
    directory = Path(directory)
    path = directory / CARD_FILE
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelCardError(f"{path}: not a readable model card ({exc})") from None
        if not isinstance(record, dict):
            raise ModelCardError(f"{path}: a model card is a JSON object, got {type(record).__name__}")
        return _card_from_record(directory, record)
    return _compressed_tensors_card(directory) or ModelCard(directory=directory)


def has_model_card(directory: str | Path) -> bool:
    """True when prunedrive wrote a card into the directory (a finished prune)."""
    return (Path(directory) / CARD_FILE).is_file()
