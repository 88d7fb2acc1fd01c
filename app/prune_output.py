"""Where a pruned model is written, and what is written there: the output directory's safety (it never overlaps
what the prune reads, one prune writes it at a time, it holds a whole model or none) and the checkpoint in its
layout (`save_pruned`); the model card goes through prunedrive.models.card.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from prunedrive.harness import locks
from prunedrive.harness.results import content_hash, default_mode

# <dense>/pruned/<recipe>: the cache of pruned variants the bench and claims share. The one place inside the
# input model's directory an output may go: nothing a prune reads lives there.
PRUNED_CACHE = "pruned"


# Where a training method keeps its resumable checkpoint inside the partial directory (removed when the prune is
# done). Its name predates training plug-ins; a killed DG2PF prune from before still resumes from it.
TRAINING_CHECKPOINT = "dg2pf-checkpoint"


def save_pruned(model, out_dir: Path, layout: str) -> dict:
    """Write the pruned model in `layout`; what sparsity.json records of it: models.checkpoints.checkpoint_record
    (bytes on disk, parameters stored, scheme, execution), the layout, the dense layout's bytes and the ratio to
    them (1.0 for the dense layout) and the compressed format."""
    from prunedrive.models.checkpoints import checkpoint_record
    from prunedrive.models.compressed_save import save_compressed

    if layout == "dense":
        model.save_pretrained(out_dir)
        record = checkpoint_record(out_dir)
        return {**record, "layout": layout, "dense_bytes": record["bytes_on_disk"], "ratio_to_dense": 1.0,
                "compressed_format": "dense"}
    summary = save_compressed(model, out_dir)
    return {**checkpoint_record(out_dir), "layout": layout, "dense_bytes": summary.dense_bytes,
            "ratio_to_dense": summary.ratio_to_dense, "compressed_format": summary.format,
            "compressed_modules": summary.compressed_modules}


def _relation(out: Path, source: Path) -> str | None:
    """How the output directory `out` overlaps the read `source` (both resolved), or None when apart."""
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "contains"
    return None


def check_output_paths(out_dir: Path, model_dir: Path, reads: dict[str, Path | None]) -> Path:
    """The resolved output directory (symlinks followed), after refusing one that is, is inside or contains any
    directory the prune reads (`reads`: {what, for the message: its directory}): --overwrite would delete
    it, and the pruned model's files would mix with what is read. The one exception is the cache of pruned
    variants, `<model_dir>/pruned/<name>` (nothing read lives there). Only paths are looked at: call it before
    anything is loaded or removed."""
    out = out_dir.expanduser().resolve()
    cache = (model_dir.expanduser().resolve() / PRUNED_CACHE)
    for what, path in reads.items():
        if path is None:
            continue
        source = path.expanduser().resolve()
        relation = _relation(out, source)
        if relation is None or (relation == "is inside" and out.parent == cache):
            continue
        raise ValueError(f"--model-out {out_dir} (resolved: {out}) {relation} {what} {path} (resolved: {source}), "
                         "which this prune reads; pick a --model-out outside it")
    return out


def check_empty(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"--model-out {out_dir} exists and is not empty; pick a new directory or pass --overwrite")


@contextlib.contextmanager
def output_lock(out_dir: Path, wait: bool):
    """Hold `.<name>.lock` beside `out_dir` (harness.locks: flock, freed when its process dies). One prune
    writes an output directory at a time; without `wait`, a second one fails at once with exit code 2."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = out_dir.with_name(f".{out_dir.name}.lock")
    with locks.held(lock, wait) as holding:
        if not holding:
            raise FileExistsError(f"--model-out {out_dir}: another prune holds it (lock {lock}, held by the "
                                  "process whose id it holds); wait for that prune to end or pick another directory")
        yield


def _partial_name(out_dir: Path) -> re.Pattern:
    # .<name>.<12 hex: the call>.<mkdtemp's letters, digits, _>.partial; no dot in the last part, so the partial
    # directories of an output named "<name>.<more>" never match.
    return re.compile(rf"\.{re.escape(out_dir.name)}\.(?P<call>[0-9a-f]{{12}})\.[A-Za-z0-9_]+\.partial")


def partial_dir(out_dir: Path, call: str) -> Path:
    """Where the model is written before it is renamed to `out_dir`: a directory of this prune's own (called with
    the output's lock held, so the partial directories of `out_dir` left there belong to killed prunes). One left
    by the same call (`call`: a hash of the inputs and settings) is reused, so a killed DG2PF run resumes from its
    checkpoint; others are removed."""
    pattern, reuse = _partial_name(out_dir), None
    for leftover in sorted(out_dir.parent.iterdir()):
        match = pattern.fullmatch(leftover.name)
        if not match or not leftover.is_dir():
            continue
        if match["call"] == call and reuse is None:
            reuse = leftover
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    if reuse is not None:
        return reuse
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{call}.", suffix=".partial", dir=out_dir.parent))
    partial.chmod(default_mode(directory=True))  # it becomes the model directory: as mkdir would make it
    return partial


def call_key(model_dir: Path, data_dir: Path | None, settings: dict) -> str:
    """12 hex digits naming one prune call: the input's weight files (name, size, mtime), the data directory
    and every setting. A partial directory is only ever resumed by the same call."""
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.glob("*.safetensors"))
    return content_hash({"model": str(model_dir.resolve()), "weights": weights,
                         "data": str(data_dir.resolve()) if data_dir else None, "settings": settings})[:12]


def commit(partial: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished `partial` to `out_dir`, under the output's lock: the destination is checked again
    (something other than a prune may have filled it meanwhile), and a replaced model is moved aside before the
    rename and deleted after it, so `out_dir` always holds a whole model. Its files get the modes the umask gives
    (safetensors and mkstemp write 0600: a model only its writer could read)."""
    for path in partial.rglob("*"):
        path.chmod(default_mode(directory=path.is_dir()))
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(partial, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"--model-out {out_dir} was filled while pruning (not by a prune: it holds no lock); "
                              f"the pruned model is in {partial}")
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".replaced", dir=out_dir.parent))
    os.replace(out_dir, aside / out_dir.name)
    os.replace(partial, out_dir)
    shutil.rmtree(aside, ignore_errors=True)



def structure_fields(report: dict) -> dict:
    """What a structured method did (parameters before/after, widths, removed blocks), for sparsity.json."""
    return {k: v for k, v in report.items() if k not in ("method", "pattern", "structured")}

