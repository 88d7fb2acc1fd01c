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


# The trained default model ships with the package (models/zoo/<preset>/), so a first run copies it into the zoo
# instead of training for 7-60 minutes. What the bench reads from a model directory: the model itself, the train
# and val splits it was trained on (pruning calibration, DG2PF, open-loop eval), the training record and log.
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "train_summary.json", "train_log.jsonl",
                 "data/train.parquet", "data/train.json", "data/val.parquet", "data/val.json")
SHIP_COMMAND = ("prunedrive train --preset {preset} --model-out /tmp/{preset}-ship && "
                "python -m prunedrive.app.zoo ship /tmp/{preset}-ship --preset {preset}")


def shipped_model_dir(preset: str = "small") -> Path:
    """Where the package keeps the trained `preset` (it may be absent or stale: see shipped_is_current)."""
    from importlib.resources import files

    return Path(str(files("prunedrive.models"))) / "zoo" / preset


def shipped_hash(preset: str = "small") -> str | None:
    """The recipe hash the shipped `preset` was trained with, or None when none is shipped."""
    config = shipped_model_dir(preset) / "config.json"
    return json.loads(config.read_text()).get("config_hash") if config.is_file() else None


def shipped_is_current(preset: str = "small") -> bool:
    """A shipped `preset` trained with the current recipe (a changed recipe makes it stale: it is then not used)."""
    directory = shipped_model_dir(preset)
    return is_trained(directory, preset) and all((directory / name).is_file() for name in SHIPPED_FILES)


def _copy_atomically(source: Path, target: Path) -> None:
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def install_shipped(preset: str = "small", directory: str | Path | None = None) -> bool:
    """Copy the shipped `preset` into `directory` (default: its zoo directory) when it is current; False when none
    is shipped or it is stale. config.json is written last, so an interrupted copy is never taken for a model."""
    if not shipped_is_current(preset):
        return False
    source, target = shipped_model_dir(preset), Path(directory) if directory else default_model_dir(preset)
    for name in SHIPPED_FILES:
        if name not in ("config.json", "train_summary.json"):
            _copy_atomically(source / name, target / name)
    summary = json.loads((source / "train_summary.json").read_text())
    # The bench finds a model's training data through train_summary.json's data_dir: here, the copy beside it.
    summary.update(data_dir=str((target / "data").resolve()), shipped=True)
    from prunedrive.harness.results import atomic_write_text

    atomic_write_text(target / "train_summary.json", json.dumps(summary, indent=2))
    _copy_atomically(source / "config.json", target / "config.json")
    return True


def ship(model_dir: str | Path, preset: str = "small") -> Path:
    """Developer side: put a freshly trained `preset` (`prunedrive train --preset <preset> --model-out DIR`) into the
    package as the shipped model. Refuses a directory that is not a finished model of the current recipe."""
    model_dir = Path(model_dir)
    if not is_trained(model_dir, preset):
        raise ValueError(f"{model_dir}: not a finished {preset} model of the current recipe (config.json's "
                         f"config_hash must be {get_preset(preset).hash()}); train one with "
                         f"`prunedrive train --preset {preset} --model-out {model_dir}`")
    summary = json.loads((model_dir / "train_summary.json").read_text())
    data_dir = Path(summary["data_dir"])
    target = shipped_model_dir(preset)
    for name in SHIPPED_FILES:
        source = data_dir / name.split("/", 1)[1] if name.startswith("data/") else model_dir / name
        if not source.is_file():
            raise ValueError(f"{source}: missing; the shipped model needs {', '.join(SHIPPED_FILES)}")
        if name == "train_summary.json":
            summary["data_dir"] = "data"  # rewritten to the zoo copy's absolute path on install
            target.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(json.dumps(summary, indent=2))
        else:
            _copy_atomically(source, target / name)
    return target


def sizes(directory: str | Path) -> dict[str, int]:
    """Bytes of each shipped file in `directory`."""
    directory = Path(directory)
    return {name: (directory / name).stat().st_size for name in SHIPPED_FILES if (directory / name).is_file()}


if __name__ == "__main__":  # python -m prunedrive.app.zoo ship DIR [--preset small]
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m prunedrive.app.zoo")
    commands = parser.add_subparsers(dest="command", required=True)
    ship_parser = commands.add_parser("ship", help="put a trained model into the package as the shipped model")
    ship_parser.add_argument("model_dir")
    ship_parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    try:
        where = ship(args.model_dir, args.preset)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    total = sum(sizes(where).values())
    print(f"shipped {args.preset}-{get_preset(args.preset).hash()} -> {where} ({total / 1e6:.1f} MB)")
