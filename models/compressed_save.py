"""Write a pruned model as a compressed-tensors checkpoint whose size shrinks with sparsity.

    summary = save_compressed(model, out_dir)   # an HF causal LM or a DrivingLLM

The model's own `save_pretrained` writes the directory (config, tokenizer, side files, model.safetensors);
then every sparse Linear weight in model.safetensors is replaced by its compressed tensors (models.sparse_codec)
and config.json gets the `quantization_config` entry that compressed-tensors, llm-compressor and vLLM read:

    {"quant_method": "compressed-tensors", "version": ...,  "transform_config": {},
     "sparsity_config": {"format": "sparse-bitmask" | "sparse-24-bitmask", "sparsity_structure": ...,
                         "global_sparsity": ..., "targets": [compressed module names], "ignore": []}}

Format: sparse-24-bitmask when every pruned Linear of the decoder blocks is 2:4 (then the 2:4 Linears are
compressed), else sparse-bitmask for the Linears it makes smaller (embeddings, norms, the output head and
dense or barely sparse Linears stay as they are). Reading the dense tensors back from the file the model wrote
keeps its naming (tied weights stored once) for the loader (models.compressed_load).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import compressed_tensors
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from prunedrive.harness.results import atomic_write_text
from prunedrive.models import sparse_codec
from prunedrive.models.pruning.masks import EXCLUDE, decoder_layers

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
QUANTIZATION_CONFIG = "quantization_config"


@dataclass
class CompressedSave:
    format: str                   # the sparsity_config format written, or "dense" when nothing was sparse
    compressed_modules: int
    global_sparsity: float        # zeros / entries over every stored float tensor
    bytes_on_disk: int            # model.safetensors as written
    dense_bytes: int              # model.safetensors in the dense layout
    ratio_to_dense: float

    def to_dict(self) -> dict:
        return asdict(self)


def _linear_weights(model: nn.Module, stored: dict[str, torch.Tensor]) -> dict[str, str]:
    """Stored weight name -> module name for every nn.Linear whose weight is stored under its own name (a weight
    tied to an embedding is stored once, under one name, and stays dense with it)."""
    return {f"{name}.weight": name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and f"{name}.weight" in stored and not set(name.split(".")) & set(EXCLUDE)
            and stored[f"{name}.weight"].dim() == 2 and stored[f"{name}.weight"].is_floating_point()}


def _decoder_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module-name prefixes of the decoder blocks (a DrivingLLM's LM is `model.lm`)."""
    for owner, prefix in ((getattr(model, "lm", None), "lm."), (model, "")):
        if isinstance(owner, nn.Module):
            try:
                layers = decoder_layers(owner)
            except ValueError:
                continue
            names = {id(m): n for n, m in owner.named_modules()}
            return tuple(f"{prefix}{names[id(block)]}." for block in layers)
    raise ValueError(f"{type(model).__name__}: no decoder blocks found to choose the compressed format for")


def choose_format(model: nn.Module, stored: dict[str, torch.Tensor]) -> tuple[str, list[str]]:
    """(sparsity format, stored weight names to compress) - see the module docstring."""
    linears = _linear_weights(model, stored)
    prefixes = _decoder_prefixes(model)
    pruned_decoder = [w for w in linears if w.startswith(prefixes) and not bool(sparse_codec.kept(stored[w]).all())]
    if pruned_decoder and all(sparse_codec.is_24(stored[w]) for w in pruned_decoder):
        chosen = [w for w in linears if sparse_codec.is_24(stored[w]) and not bool(sparse_codec.kept(stored[w]).all())]
        return sparse_codec.SPARSE_24_BITMASK, chosen
    chosen = [w for w in linears if _bitmask_bytes(stored[w]) < _bytes(stored[w])]
    return (sparse_codec.SPARSE_BITMASK if chosen else "dense"), chosen


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _bitmask_bytes(weight: torch.Tensor) -> int:
    """What sparse_codec.encode_bitmask(weight) stores: kept values, packed mask, int64 row offsets and shape."""
    rows, cols = weight.shape
    kept = int(sparse_codec.kept(weight).sum())
    return kept * weight.element_size() + rows * ((cols + 7) // 8) + rows * 8 + 2 * 8


def compress_tensors(stored: dict[str, torch.Tensor], fmt: str, chosen: list[str]) -> dict[str, torch.Tensor]:
    """The stored tensors with each chosen weight NAME.weight replaced by NAME.shape, NAME.compressed, ..."""
    encode = {sparse_codec.SPARSE_BITMASK: sparse_codec.encode_bitmask,
              sparse_codec.SPARSE_24_BITMASK: sparse_codec.encode_24}.get(fmt)
    out = {}
    for name, tensor in stored.items():
        if name in chosen:
            prefix = name.removesuffix(".weight")
            out.update({f"{prefix}.{part}": t.contiguous() for part, t in encode(tensor).items()})
        else:
            out[name] = tensor
    return out


def sparsity_config(fmt: str, chosen: list[str], global_sparsity: float) -> dict:
    return {"format": fmt, "global_sparsity": round(global_sparsity, 6),
            "sparsity_structure": "2:4" if fmt == sparse_codec.SPARSE_24_BITMASK else "unstructured",
            "targets": sorted(name.removesuffix(".weight") for name in chosen), "ignore": [],
            "registry_requires_subclass": False}


def _global_sparsity(stored: dict[str, torch.Tensor]) -> float:
    floats = [t for t in stored.values() if t.is_floating_point()]
    total = sum(t.numel() for t in floats)
    return sum(int((~sparse_codec.kept(t)).sum()) for t in floats) / max(total, 1)


def _replace_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Write under a unique temporary name in the same directory, then rename: never a torn weights file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _update_config(config_file: Path, entry: dict) -> None:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config[QUANTIZATION_CONFIG] = entry
    atomic_write_text(config_file, json.dumps(config, indent=2, sort_keys=True))


def save_compressed(model: nn.Module, directory: str | Path) -> CompressedSave:
    """`model.save_pretrained(directory)`, then the weights compressed in place (see the module docstring)."""
    directory = Path(directory)
    kwargs = {"max_shard_size": "1000GB"} if isinstance(model, PreTrainedModel) else {}  # one file, never shards
    model.save_pretrained(directory, **kwargs)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{type(model).__name__}.save_pretrained did not write {weights}")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    stored = load_file(str(weights))
    dense_bytes = weights.stat().st_size
    fmt, chosen = choose_format(model, stored)
    sparsity = _global_sparsity(stored)
    if chosen:
        _replace_file(weights, compress_tensors(stored, fmt, chosen), metadata)
        _update_config(directory / CONFIG_NAME, {
            "quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
            "sparsity_config": sparsity_config(fmt, chosen, sparsity), "transform_config": {}})
    on_disk = weights.stat().st_size
    return CompressedSave(format=fmt, compressed_modules=len(chosen), global_sparsity=sparsity,
                          bytes_on_disk=on_disk, dense_bytes=dense_bytes, ratio_to_dense=on_disk / dense_bytes)
