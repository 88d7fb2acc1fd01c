"""Which files of a model directory hold its weights, and their size on disk: the one place that says so, for
every loader (models.hf_causal, models.compressed_load, models.driving_llm's checks) and every size in a table.

Kept apart from models.hf_causal so that models.compressed_load can use it while hf_causal loads compressed
checkpoints through compressed_load (no import loop); hf_causal re-exports these names.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")


class NotACausalLM(ValueError):
    """The directory is not a loadable local causal LM; the message names the file at fault."""


def _plain_file_inside(root: Path, file: Path, listed_in: str | None = None) -> Path:
    """`file` when it is a regular file inside `root` (a symlink may point within `root` only), else an error
    naming it: a device, a FIFO or a link out of the directory must never be read (/dev/zero never ends)."""
    try:
        info = os.lstat(file)
        if stat.S_ISLNK(info.st_mode):
            target = file.resolve()
            if not target.is_relative_to(root.resolve()):
                raise NotACausalLM(f"{file} is a symlink to {target}, outside the model directory {str(root)!r}; "
                                   "copy the file into the directory (e.g. huggingface-cli download --local-dir)")
            info = os.stat(file)
    except (FileNotFoundError, NotADirectoryError):
        raise NotACausalLM(f"{file} is missing" + (f" (listed in {listed_in})" if listed_in else "")) from None
    if not stat.S_ISREG(info.st_mode):
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "a socket")
        raise NotACausalLM(f"{file} is {kind}, not a regular file: weights are read from plain files only")
    return file


def _shard_names(index: Path) -> list[str]:
    """The shard file names model.safetensors.index.json's weight_map lists (sorted, unique): plain names in
    the directory, never a path that leaves it."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NotACausalLM(f"{index} is not a safetensors index ({exc!r})") from None
    for name in shards:
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise NotACausalLM(f"{index}: weight_map names {name!r}, not a file name in the model directory")
    return shards


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files a loader reads from a model directory, the one place that says which:
    model.safetensors when it is there (transformers and models.driving_llm read it first), else the shards
    that model.safetensors.index.json's weight_map names. Each is checked to be a regular file inside the
    directory; other *.safetensors files in it are never read."""
    path = Path(directory).expanduser()
    single, index = (path / name for name in SAFETENSORS_NAMES)
    if os.path.lexists(single):
        return [_plain_file_inside(path, single)]
    if os.path.lexists(index):
        _plain_file_inside(path, index)
        return [_plain_file_inside(path, path / name, listed_in=index.name) for name in _shard_names(index)]
    raise NotACausalLM(f"{single} is missing (no weights in {str(path)!r})")


def weight_bytes(directory: str | Path) -> int:
    """Bytes on disk of a model directory's checkpoint: its weight files (`weight_files`) only, not the tokenizer,
    the config or side files; the one definition every size in a table or record uses."""
    return sum(file.stat().st_size for file in weight_files(directory))
