"""The user's own variants in `prunedrive bench` (`--variant NAME=DIR`), and what every model's checkpoint costs.

A variant is a model directory the user made (llm-compressor, another pruner, `prunedrive prune`): it is driven
beside the dense model like the variants the bench prunes, with the same tables. Each is checked before anything
runs (models.checkpoints.check_variant_dir: config.json, safetensors weights, a supported compression scheme, the
dense model's architecture); a bad one is refused naming its directory and what is wrong (exit 2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from prunedrive.agents.registry import check_agent_name
from prunedrive.app.bench_model import BenchModel
from prunedrive.models.card import read_model_card

VARIANT = "variant"  # the method column of a user's variant


def parse_variant(text: str) -> tuple[str, str]:
    """NAME=DIR of `--variant`; NAME follows the agent-name rule (agents.registry.check_agent_name)."""
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise ValueError(f"--variant {text!r}: expected NAME=DIR, e.g. owl70=./small-owl70")
    check_agent_name(name, f"--variant {text}")
    return name, directory


def check_variants(variants: dict[str, str], dense_dir: Path, taken: set[str]) -> dict[str, BenchModel]:
    """{name: BenchModel(name, VARIANT, known sparsity or NaN, directory)} for the user's variants, each checked
    against the dense model (models.checkpoints.check_variant_dir); names must differ from the bench's own agents."""
    from prunedrive.models.checkpoints import check_variant_dir

    out = {}
    for name, directory in variants.items():
        if name.lower() in {t.lower() for t in taken}:
            raise ValueError(f"--variant {name}={directory}: {name!r} is an agent name the bench uses itself "
                             f"({', '.join(sorted(taken))}); pick another name")
        path = Path(directory).expanduser()
        try:
            check_variant_dir(path, dense_dir)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"--variant {name}={directory}: {exc}") from None
        out[name] = BenchModel(name, VARIANT, _known_sparsity(path), path)
    return out


def _known_sparsity(directory: Path) -> float:
    """The variant's global sparsity where its model card says so (prunedrive's own, else the compressed-tensors
    sparsity_config), NaN otherwise: the table's non-zero column measures it anyway."""
    try:
        sparsity = read_model_card(directory).sparsity
    except ValueError:  # an unreadable card: the sparsity is not known
        return float("nan")
    return float("nan") if sparsity is None else sparsity


def checkpoint_records(models: dict[str, BenchModel]) -> dict[str, dict]:
    """{agent: models.checkpoints.checkpoint_record} for every model of the bench, with `ratio_to_dense`: its
    bytes on disk over the dense model's (the first one, llm-dense)."""
    from prunedrive.models.checkpoints import checkpoint_record

    records = {name: checkpoint_record(model.directory) for name, model in models.items()}
    dense_bytes = next(iter(records.values()))["bytes_on_disk"] if records else 0
    for record in records.values():
        record["ratio_to_dense"] = record["bytes_on_disk"] / dense_bytes if dense_bytes else float("nan")
    return records


# Columns with_checkpoints adds to the bench table (bench.csv keeps them).
CHECKPOINT_COLUMNS = ("bytes_on_disk", "ratio_to_dense", "parameters_stored", "scheme", "compression_scheme",
                      "execution")


def with_checkpoints(table: pd.DataFrame, records: dict[str, dict]) -> pd.DataFrame:
    """The bench table with each model's checkpoint columns (NaN / "" for agents without a model)."""
    table = table.copy()
    for column in CHECKPOINT_COLUMNS:
        text = column in ("scheme", "compression_scheme", "execution")
        table[column] = [records.get(agent, {}).get(column, "" if text else np.nan) for agent in table["agent"]]
    return table
