"""Where trained models live: $PRUNEDRIVE_HOME/models/<preset>-<config_hash> (default ~/.cache/prunedrive).

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


def default_model_dir(preset: str = "small") -> Path:
    return home() / "models" / f"{preset}-{get_preset(preset).hash()}"


def is_trained(directory: str | Path, preset: str = "small") -> bool:
    """A finished model whose config hash matches the current recipe of `preset`."""
    config = Path(directory) / "config.json"
    if not (config.is_file() and (Path(directory) / "model.safetensors").is_file()):
        return False
    return json.loads(config.read_text()).get("config_hash") == get_preset(preset).hash()
