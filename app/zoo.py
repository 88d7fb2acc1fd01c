"""Where trained models live: $PRUNEDRIVE_HOME/models/<preset>-<config_hash> (default ~/.cache/prunedrive), and
text-format models (`prunedrive train --format text`, a plain Hugging Face causal LM) as
text-<preset>-<text_hash>.

Nothing is ever downloaded: the default model is trained here on first use and reused while its recipe
(models/presets.py) keeps the same hash.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from prunedrive.models.presets import get_preset


def home() -> Path:
    return Path(os.environ.get("PRUNEDRIVE_HOME", Path.home() / ".cache" / "prunedrive")).expanduser()


FORMATS = ("vector", "text")
TEXT_MARKER = "prunedrive_format"  # train_summary.json of a text-format model: {"prunedrive_format": "text", ...}


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown model format {format!r}; choose from {', '.join(FORMATS)}")


def default_model_dir(preset: str = "small", format: str = "vector") -> Path:
    """The zoo directory of `preset`: <preset>-<hash> (vector encoder + LM), text-<preset>-<text_hash> (text)."""
    _check_format(format)
    if format == "text":
        return home() / "models" / f"text-{preset}-{get_preset(preset).text_hash()}"
    return home() / "models" / f"{preset}-{get_preset(preset).hash()}"


def is_text_model_dir(directory: str | Path) -> bool:
    """A directory written by `prunedrive train --format text` (its train_summary.json carries the marker)."""
    summary = Path(directory) / "train_summary.json"
    try:
        return summary.is_file() and json.loads(summary.read_text()).get(TEXT_MARKER) == "text"
    except (OSError, ValueError, AttributeError):
        return False


def is_trained(directory: str | Path, preset: str = "small", format: str = "vector") -> bool:
    """A finished model whose config hash matches the current recipe of `preset` (for text models the hash is
    in train_summary.json, written last)."""
    _check_format(format)
    directory = Path(directory)
    config = directory / "config.json"
    if not (config.is_file() and (directory / "model.safetensors").is_file()):
        return False
    if format == "text":
        if not is_text_model_dir(directory):
            return False
        summary = json.loads((directory / "train_summary.json").read_text())
        return summary.get("config_hash") == get_preset(preset).text_hash() and not summary.get("init")
    return json.loads(config.read_text()).get("config_hash") == get_preset(preset).hash()
