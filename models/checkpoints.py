"""What a model directory's checkpoint is and what it costs to store, read without loading the model.

    record = checkpoint_record(directory)     # bytes on disk, parameters stored, scheme, execution
    check_variant_dir(variant, dense)         # a user's variant of `dense`, refused early when it cannot drive

Sizes come from models.hf_causal.weight_bytes (the weight files only); parameters stored from the safetensors
headers (a compressed weight counts its dense shape: zeros included, so a structured variant stores fewer and an
unstructured one as many); the scheme and its execution from config.json's compressed-tensors entry, validated by
models.compressed_load (an unsupported scheme is refused here, before anything is driven).
"""
from __future__ import annotations

import math
from pathlib import Path

from prunedrive.models import compressed_load
from prunedrive.models.hf_causal import NotACausalLM, check_weights, weight_bytes

DENSE_EXECUTION = "dense kernels"
# config.json fields that must agree between a variant and its dense model: (what it is, the keys that hold it).
ARCHITECTURE_FIELDS = (("model_type", ("model_type",)), ("hidden size", ("hidden_size", "n_embd", "d_model")),
                       ("vocabulary size", ("vocab_size",)))


def _scheme(directory: Path) -> tuple[str, str, str]:
    """(one-line scheme, short scheme for narrow tables, execution) from config.json; ValueError when unsupported."""
    found = compressed_load.compression_entry(directory)
    if found is None:
        return "dense", "dense", DENSE_EXECUTION
    key, entry = found
    sparsity = compressed_load.sparsity_format(directory, key, entry)
    config, _ = compressed_load.quantization_config_of(directory, key, entry)
    short = [] if sparsity == "dense" else [sparsity]
    for scheme in (config.config_groups.values() if config is not None else []):
        weights, activations = scheme.weights, scheme.input_activations
        short.append(f"W{weights.num_bits if weights else 16}A{activations.num_bits if activations else 16}")
    return compressed_load.describe_scheme(sparsity, config), " + ".join(short) or "dense", compressed_load.EXECUTION


def checkpoint_record(directory: str | Path) -> dict:
    """{bytes_on_disk, parameters_stored, compression_scheme, scheme, execution} of a model directory (see the
    module docstring); a ValueError names the file and field of a checkpoint that cannot be read."""
    path = Path(directory).expanduser()
    full, short, execution = _scheme(path)
    shapes = compressed_load.stored_dense_shapes(path)
    return {"bytes_on_disk": weight_bytes(path), "parameters_stored": sum(math.prod(s) for s in shapes.values()),
            "compression_scheme": full, "scheme": short, "execution": execution}


def architecture(config: dict) -> dict[str, object]:
    """The ARCHITECTURE_FIELDS of a parsed config.json (a nested text_config counts for multimodal configs)."""
    sources = [config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}]
    out = {}
    for what, keys in ARCHITECTURE_FIELDS:
        out[what] = next((source[k] for source in sources for k in keys if k in source), None)
    return out


def check_variant_dir(directory: str | Path, dense_dir: str | Path) -> dict:
    """The checkpoint_record of a variant directory that can stand beside `dense_dir`: an error names the
    directory and what is wrong (not a directory, config.json missing, pickled weights only, an unsupported
    compression scheme, another architecture than the dense model's)."""
    path, dense = Path(directory).expanduser(), Path(dense_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a model directory (it does not exist or is a file)")
    config = compressed_load.read_config(path)
    try:
        check_weights(path)
    except NotACausalLM as exc:
        raise ValueError(str(exc)) from None
    record = checkpoint_record(path)
    mine, theirs = architecture(config), architecture(compressed_load.read_config(dense))
    differing = [f"{what} {mine[what]!r} (the dense model {dense}: {theirs[what]!r})" for what in mine
                 if mine[what] != theirs[what]]
    if differing:
        raise ValueError(f"{path / compressed_load.CONFIG_NAME}: not a variant of the dense model: "
                         + "; ".join(differing))
    return record
