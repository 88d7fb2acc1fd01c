"""Run outputs: one directory per run, one pair of Parquet files per finished episode.

    results/<run-id>/manifest.json          versions, config, identity (what a resume must match), planned episodes
    results/<run-id>/episodes/<key>.parquet one row: scores, infractions, compute aggregates
    results/<run-id>/steps/<key>.parquet    one row per step: the episode's key, controls, ego, compute
    results/<run-id>/episodes.parquet       all episodes, written when the run ends
    results/<run-id>/steps.parquet          all steps, likewise
    results/<run-id>/attachments/           what a command adds beside the episodes (RunDir.attach): <name>.parquet
                                            or <name>.json, listed in attachments/index.json with their producer
                                            and the "module:function" that renders each as a report section
    results/<run-id>/.lock                  held by the one process writing the run

Each episode's files are written to a unique temporary name, flushed to disk and renamed, so a killed
run leaves either a whole episode or none. On resume nothing is trusted: an episode file that cannot be
read, lacks the schema or holds another episode's key is moved to `quarantine/` and its episode re-run;
an episode that failed for infrastructure reasons (simulator, worker, harness time limit) is re-run;
one whose agent failed is a result and stays (unless `retry_failed`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from urllib.parse import quote, unquote

import pandas as pd
import pyarrow.parquet as pq

from prunedrive.harness import locks
from prunedrive.harness.video import VIDEO_SUFFIX

MANIFEST = "manifest.json"
EPISODE_KEY_COLUMNS = ("agent", "scenario", "seed")
REQUIRED_EPISODE_COLUMNS = ("run_id", "agent", "scenario", "seed", "status", "driving_score", "route_completion",
                            "infraction_penalty", "km_driven", "collisions", "error")
SAFE_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,199}")
ATTACHMENTS = "attachments"
ATTACHMENT_INDEX = "index.json"
SAFE_ATTACHMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
ATTACHMENT_SUFFIXES = (".parquet", ".json")


class RunError(ValueError):
    """A run directory that cannot be used as asked (exit code 2); the message says why and what to do."""


def _part(text: str) -> str:
    # Percent-escape everything but letters, digits, "." and "-" ("_" too), so "__" only ever separates parts.
    return quote(str(text), safe="").replace("_", "%5F").replace("~", "%7E")


def episode_key(agent: str, scenario: str, seed: int) -> str:
    """The file stem of an episode: injective (two different episodes never share one) and readable for
    the usual names ("llm-owl-0.7__dense-highway__3")."""
    return f"{_part(agent)}__{_part(scenario)}__{int(seed)}"


# An episode key names files: <key>.parquet, its temporary ".<key>.parquet.XXXXXXXX.tmp" and its quarantined
# "episodes-<key>-<stamp>.parquet" must all fit a 255-byte file name.
MAX_EPISODE_KEY_CHARS = 200


def check_episode_key(key: str, what: str) -> str:
    """`key` if it can name the episode's files, else RunError naming `what` (the agent, route, ... it came from)."""
    if len(key) > MAX_EPISODE_KEY_CHARS:
        raise RunError(f"{what}: its episode key is {len(key)} characters once escaped; at most "
                       f"{MAX_EPISODE_KEY_CHARS} (it names the episode's files): use a shorter name")
    return key


def parse_episode_key(key: str) -> tuple[str, str, int]:
    """(agent, scenario, seed) of an episode key: the inverse of `episode_key`."""
    agent, scenario, seed = key.split("__")
    return unquote(agent), unquote(scenario), int(seed)


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not SAFE_RUN_ID.fullmatch(run_id):
        raise RunError(f"run id {run_id!r}: use 1-200 letters, digits and _.=+- (it names a directory under --out)")
    return run_id


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("prunedrive", "torch", "transformers", "gymnasium", "highway-env", "numpy", "pandas", "carla"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def content_hash(value) -> str:
    """sha256 of a JSON-able value, keys sorted: what `identity` fields are compared by."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    @classmethod
    def under(cls, out: str | Path, run_id: str) -> "RunDir":
        """The run `run_id` inside the results root `out`; the id cannot leave it."""
        return cls(Path(out) / check_run_id(run_id))

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def create(self, config: dict, planned: list[str], identity: dict | None = None) -> None:
        """A new run. `identity`: what a resume must match exactly (suite content, agents, model hashes)."""
        if self.manifest_path.exists():
            raise RunError(f"{self.path} already holds a run; use --resume to finish it or pick another --run-id")
        (self.path / "episodes").mkdir(parents=True, exist_ok=True)
        (self.path / "steps").mkdir(exist_ok=True)
        manifest = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
                    "config": config, "identity": identity or {}, "planned": planned}
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, default=str))

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            raise RunError(f"{self.path}: no {MANIFEST}; not a prunedrive run directory")
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"{self.manifest_path}: unreadable ({exc}); the run cannot be resumed") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
            raise RunError(f"{self.manifest_path}: field 'config' missing; not a prunedrive manifest")
        return manifest

    def check_identity(self, identity: dict) -> None:
        """Refuse to resume with anything different: name each field that differs."""
        recorded = self.manifest().get("identity") or {}
        differ = [key for key in sorted(set(recorded) | set(identity)) if recorded.get(key) != identity.get(key)]
        if differ:
            details = "; ".join(f"{key}: run has {recorded.get(key)!r}, now {identity.get(key)!r}" for key in differ)
            raise RunError(f"{self.path} cannot be resumed with different settings ({details}); "
                           "resume with the same suite, seeds, agents and models, or start a new run")

    # -- one writer ------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the run's lock until `unlock` or process exit; a second writer gets a clear message."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = locks.acquire(self.path / ".lock", wait=False)
        if fd is None:
            raise RunError(f"{self.path} is being written by another prunedrive process; wait for it to end "
                           "(one run directory has one writer at a time)")
        self._lock_fd = fd
        # A writer killed mid-write leaves its temporary file (never the target: see atomic_parquet). Only the
        # lock holder writes here, so any temporary file now is such a leftover.
        for leftover in [*self.path.glob(".*.tmp"), *self.path.glob("*/.*.tmp")]:
            leftover.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            locks.release(self._lock_fd)
            self._lock_fd = None

    # -- episodes --------------------------------------------------------------------------------------
    def finished(self, retry_failed: bool = False) -> set[str]:
        """Keys of the episodes that count as done. Checks every file: unreadable, schema-less or misnamed
        ones, and episodes whose steps file is missing or unreadable, are moved to quarantine/ (with a
        warning) so their episodes run again; infrastructure failures are not done; agent failures are,
        unless `retry_failed`."""
        done = set()
        for path in sorted((self.path / "episodes").glob("*.parquet")):
            row, problem = _read_episode_file(path)
            problem = problem or _steps_file_problem(self.path / "steps" / path.name)
            if problem:
                self._quarantine(path, problem)
                continue
            if row["status"] == "failed" and (retry_failed or row.get("failure", "") != "agent"):
                self._quarantine(path, "a failed episode to be run again", warn=False)
                continue
            done.add(path.stem)
        return done

    def _quarantine(self, path: Path, why: str, warn: bool = True) -> None:
        target = self.path / "quarantine"
        target.mkdir(exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        for kind in ("episodes", "steps"):
            source = self.path / kind / path.name
            if source.exists():
                os.replace(source, target / f"{kind}-{path.stem}-{stamp}.parquet")
        if warn:
            warnings.warn(f"{path}: {why}; moved to {target} and its episode will run again", stacklevel=3)

    def video_path(self, agent: str, scenario: str, seed: int) -> Path:
        return self.path / "videos" / f"{episode_key(agent, scenario, seed)}{VIDEO_SUFFIX}"

    def write_episode(self, key: str, episode: dict, steps: pd.DataFrame) -> None:
        # Every step row says whose it is; the steps of a failed episode are kept, flagged.
        ids = {"episode": key, "agent": episode["agent"], "scenario": episode["scenario"], "seed": episode["seed"],
               "failed": episode["status"] == "failed"}
        steps = pd.concat([pd.DataFrame(ids, index=steps.index), steps], axis=1)
        # Steps first: an episode row is the mark of a finished episode.
        atomic_parquet(steps, self.path / "steps" / f"{key}.parquet")
        atomic_parquet(pd.DataFrame([episode]), self.path / "episodes" / f"{key}.parquet")

    def write_batch(self, episodes: pd.DataFrame, steps: pd.DataFrame) -> None:
        """All episodes of a run that is written at once (an import): episodes.parquet and steps.parquet, two
        fsynced files whatever the number of episodes, instead of a pair per episode. Not resumable: a run
        written this way has no per-episode files."""
        atomic_parquet(steps, self.path / "steps.parquet")
        atomic_parquet(episodes, self.path / "episodes.parquet")

    def episodes(self) -> pd.DataFrame:
        files = sorted((self.path / "episodes").glob("*.parquet"))
        if not files:
            consolidated = self.path / "episodes.parquet"
            return _read_parquet(consolidated) if consolidated.is_file() else pd.DataFrame()
        return pd.concat([_read_parquet(f) for f in files], ignore_index=True)

    # -- attachments: what a command adds beside the episodes -------------------------------------------
    def attach(self, name: str, content, *, producer: str, section: str | None = None) -> Path:
        """Store `content` (a DataFrame: attachments/<name>.parquet; a JSON-able dict or list: <name>.json) and
        list it in attachments/index.json with its `producer` (the writing module) and `section` (the
        "module:function" rendering it as a report section, or None). Re-attaching a name replaces it."""
        check_attachment(name, producer, section)
        folder = self.path / ATTACHMENTS
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(content, pd.DataFrame):
            path = folder / f"{name}.parquet"
            atomic_parquet(content, path)
        elif isinstance(content, (dict, list)):
            path = folder / f"{name}.json"
            atomic_write_text(path, json.dumps(content, indent=2, default=_json_number))
        else:
            raise TypeError(f"attachment {name!r}: content must be a pandas DataFrame or a JSON-able dict or list, "
                            f"got {type(content).__name__}")
        for suffix in ATTACHMENT_SUFFIXES:  # a name has one file: a table replaced by JSON loses its old file
            if suffix != path.suffix:
                (folder / f"{name}{suffix}").unlink(missing_ok=True)
        index = self._attachment_index()
        index[name] = {"file": path.name, "producer": producer, "section": section}
        atomic_write_text(folder / ATTACHMENT_INDEX, json.dumps(index, indent=2))
        return path

    def attachments(self) -> dict[str, "Attachment"]:
        """The run's attachments by name, in the order of the index ({} for a run without any)."""
        folder = self.path / ATTACHMENTS
        return {name: Attachment(name, entry["producer"], entry["section"], folder / entry["file"])
                for name, entry in self._attachment_index().items()}

    def _attachment_index(self) -> dict[str, dict]:
        path = self.path / ATTACHMENTS / ATTACHMENT_INDEX
        if not path.is_file():
            return {}
        try:
            index = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"{path}: unreadable ({exc})") from None
        if not isinstance(index, dict):
            raise RunError(f"{path}: an attachment index is a JSON object, got {type(index).__name__}")
        for name, entry in index.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                    and entry["file"] in {f"{name}{suffix}" for suffix in ATTACHMENT_SUFFIXES}):
                raise RunError(f"{path}: entry {name!r} must name its file {name}.parquet or {name}.json")
            try:
                check_attachment(name, entry.get("producer"), entry.get("section"))
            except ValueError as exc:
                raise RunError(f"{path}: {exc}") from None
        return index

    def consolidate(self) -> None:
        episodes = self.episodes()
        if len(episodes):
            atomic_parquet(episodes, self.path / "episodes.parquet")
        step_files = sorted((self.path / "steps").glob("*.parquet"))
        if step_files:
            atomic_parquet(pd.concat([_read_parquet(f) for f in step_files], ignore_index=True),
                           self.path / "steps.parquet")


@dataclass(frozen=True)
class Attachment:
    """One attachment of a run: its name, the module that wrote it, the "module:function" rendering it as a
    report section (None: data only) and its file."""

    name: str
    producer: str
    section: str | None
    path: Path

    def load(self):
        """The stored content: a DataFrame (.parquet) or the JSON value (.json)."""
        if self.path.suffix == ".parquet":
            return _read_parquet(self.path)
        try:
            return json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"{self.path}: attachment {self.name!r} is unreadable ({exc})") from None


def check_attachment(name, producer, section) -> None:
    """ValueError naming the field unless the name can name a file, the producer is a module name and the section
    (if any) a "module:function" reference."""
    if not isinstance(name, str) or not SAFE_ATTACHMENT_NAME.fullmatch(name):
        raise ValueError(f"attachment name {name!r}: use 1-100 letters, digits, _ and - (it names a file)")
    if not isinstance(producer, str) or not producer:
        raise ValueError(f"attachment {name!r}: producer must be the writing module's name, got {producer!r}")
    if section is not None and (not isinstance(section, str) or section.count(":") != 1
                                or not all(section.split(":"))):
        raise ValueError(f"attachment {name!r}: section must be a 'package.module:function' reference or None, "
                         f"got {section!r}")


def _json_number(value):
    """What json.dumps cannot hold itself: numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises several types for a torn file
        raise RunError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None


def _read_episode_file(path: Path) -> tuple[dict, str]:
    """(row, "") for a sound episode file, else ({}, what is wrong)."""
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        return {}, f"unreadable ({type(exc).__name__})"
    missing = [c for c in REQUIRED_EPISODE_COLUMNS if c not in frame.columns]
    if missing or len(frame) != 1:
        return {}, f"not an episode row (missing {', '.join(missing)})" if missing else f"{len(frame)} rows, not 1"
    row = frame.iloc[0].to_dict()
    try:
        key = episode_key(row["agent"], row["scenario"], int(row["seed"]))
    except (TypeError, ValueError):
        return {}, "its agent/scenario/seed are not valid"
    if key != path.stem:
        return {}, f"holds episode {key}, not {path.stem}"
    return row, ""


def _steps_file_problem(path: Path) -> str:
    """What is wrong with an episode's steps file: missing, or a Parquet footer that does not read (a torn
    file's does not); empty when it is sound. The footer only: reading every step of every episode would make a resume slow."""
    if not path.is_file():
        return f"its steps file {path.name} is missing"
    try:
        pq.read_metadata(path)
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises several types for a torn file
        return f"its steps file {path.name} is unreadable ({type(exc).__name__})"
    return ""


def default_mode(directory: bool = False) -> int:
    """The mode a plain open() or mkdir() gets under the process's umask. mkstemp and mkdtemp make 0600 files and
    0700 directories: renamed into place as they are, results and models would be private to their writer."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, default_mode())
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        _fsync_replace(Path(tmp), path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, default_mode())
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
