"""Run outputs: one directory per run, one pair of Parquet files per finished episode.

    results/<run-id>/manifest.json          versions, config, planned episodes
    results/<run-id>/episodes/<key>.parquet one row: scores, infractions, compute aggregates
    results/<run-id>/steps/<key>.parquet    one row per step: controls, ego, compute
    results/<run-id>/episodes.parquet       all episodes, written when the run ends
    results/<run-id>/steps.parquet          all steps, likewise

Each episode's files are written to a temporary name and renamed, so a killed run leaves either a
whole episode or none: `--resume` reruns exactly the episodes without a file.
"""
from __future__ import annotations

import json
import os
import platform
import re
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

MANIFEST = "manifest.json"


def episode_key(agent: str, scenario: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", f"{agent}__{scenario}__{seed}")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("prunedrive", "torch", "transformers", "gymnasium", "highway-env", "numpy", "pandas", "carla"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def create(self, config: dict, planned: list[str]) -> None:
        if self.manifest_path.exists():
            raise FileExistsError(f"{self.path} already holds a run; use --resume to finish it or pick another --run-id")
        (self.path / "episodes").mkdir(parents=True, exist_ok=True)
        (self.path / "steps").mkdir(exist_ok=True)
        manifest = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
                    "config": config, "planned": planned}
        _atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2))

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}; not a prunedrive run directory")
        return json.loads(self.manifest_path.read_text())

    def finished(self) -> set[str]:
        return {p.stem for p in (self.path / "episodes").glob("*.parquet")}

    def write_episode(self, key: str, episode: dict, steps: pd.DataFrame) -> None:
        # Steps first: an episode row is the mark of a finished episode.
        _atomic_parquet(steps, self.path / "steps" / f"{key}.parquet")
        _atomic_parquet(pd.DataFrame([episode]), self.path / "episodes" / f"{key}.parquet")

    def episodes(self) -> pd.DataFrame:
        files = sorted((self.path / "episodes").glob("*.parquet"))
        if not files:
            consolidated = self.path / "episodes.parquet"
            return pd.read_parquet(consolidated) if consolidated.is_file() else pd.DataFrame()
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    def consolidate(self) -> None:
        episodes = self.episodes()
        if len(episodes):
            _atomic_parquet(episodes, self.path / "episodes.parquet")
        step_files = sorted((self.path / "steps").glob("*.parquet"))
        if step_files:
            _atomic_parquet(pd.concat([pd.read_parquet(f) for f in step_files], ignore_index=True),
                            self.path / "steps.parquet")


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
