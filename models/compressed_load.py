"""Read a compressed-tensors checkpoint (llm-compressor's output, or ours) back as dense float weights on the CPU.

    if is_compressed_checkpoint(directory):
        loaded = load_dense_state_dict(directory)        # .state_dict, .scheme, .execution, bytes on disk / in memory
        model, loaded = load_compressed_causal_lm(directory)   # an HF causal LM, built from its config

A checkpoint is compressed-tensors when config.json's `quantization_config` (older files: `compression_config`)
says `quant_method: "compressed-tensors"` or holds its `sparsity_config` / `config_groups`. Supported:
sparsity formats sparse-bitmask and sparse-24-bitmask (models.sparse_codec), quantization formats int-quantized
(W8A8 int8), pack-quantized (W4A16 packed int4) and naive-quantized with integer weights, alone or stacked
(sparse over quantized: the sparse layer is undone first). Integer weights are dequantized by compressed-tensors'
own compressors into the scales' float dtype: there is no integer kernel here, every matmul runs in float
("decompressed: no kernel"), and quantized activations (the A8 of W8A8) are not emulated. Anything else (an
FP8/FP4 format, online transforms, a corrupt or incomplete tensor set) is refused with a ValueError naming the
directory or file, the field and the supported values. Weights are read with safetensors only, from the files
models.weight_files.weight_files allows (plain files inside the directory); nothing runs remote code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from prunedrive.models import sparse_codec
from prunedrive.models.weight_files import weight_files

CONFIG_NAME = "config.json"
CONFIG_KEYS = ("quantization_config", "compression_config")  # the second: compressed-tensors < 0.6 wrote it
QUANT_METHOD = "compressed-tensors"
EXECUTION = "decompressed: no kernel"
SUPPORTED_SPARSITY = ("dense", sparse_codec.SPARSE_BITMASK, sparse_codec.SPARSE_24_BITMASK)
SUPPORTED_QUANTIZATION = ("dense", "int-quantized", "pack-quantized", "naive-quantized")
SUPPORTED_STRATEGIES = ("tensor", "channel", "group")
ACTIVATION_QPARAMS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
                      "k_scale", "v_scale", "q_scale")  # runtime quantization of activations / KV cache: dropped


@dataclass
class LoadedCheckpoint:
    directory: str
    state_dict: dict[str, torch.Tensor]
    sparsity_format: str                  # "dense" when the checkpoint is only quantized
    quantization_format: str              # "dense" when it is only sparse
    scheme: str                           # one line for tables, e.g. "sparse-bitmask + int-quantized W8A8 ..."
    execution: str = EXECUTION
    bytes_on_disk: int = 0                # the safetensors files read
    bytes_in_memory: int = 0              # the dense state dict
    decompressed_tensors: int = 0
    dropped: list[str] = field(default_factory=list)  # activation / KV-cache qparams not emulated

    def record(self) -> dict:
        """The JSON-able fields (no tensors) for manifests and cost tables."""
        return {"compression_scheme": self.scheme, "execution": self.execution,
                "sparsity_format": self.sparsity_format, "quantization_format": self.quantization_format,
                "bytes_on_disk": self.bytes_on_disk, "bytes_in_memory": self.bytes_in_memory,
                "decompressed_tensors": self.decompressed_tensors, "dropped_activation_qparams": len(self.dropped)}


# -- detection -------------------------------------------------------------------------------------
def read_config(directory: Path) -> dict:
    config_file = directory / CONFIG_NAME
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{config_file} is missing: {str(directory)!r} is not a model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    return config


def compression_entry(directory: str | Path) -> tuple[str, dict] | None:
    """(config.json key, its compressed-tensors entry) or None for a checkpoint in the dense layout."""
    config = read_config(Path(directory).expanduser())
    for key in CONFIG_KEYS:
        entry = config.get(key)
        if isinstance(entry, dict) and (entry.get("quant_method") == QUANT_METHOD
                                        or "sparsity_config" in entry or "config_groups" in entry):
            return key, entry
    return None


def is_compressed_checkpoint(directory: str | Path) -> bool:
    """True when config.json declares a compressed-tensors checkpoint (see the module docstring)."""
    return compression_entry(directory) is not None


# -- what is supported ------------------------------------------------------------------------------
def _refuse(directory: Path, field_name: str, value, supported) -> ValueError:
    return ValueError(f"{directory / CONFIG_NAME}: {field_name} is {value!r}, not supported here; supported: "
                      f"{', '.join(map(str, supported))} (int weights are decompressed to float: no kernel)")


def sparsity_format(directory: Path, key: str, entry: dict) -> str:
    sparsity = entry.get("sparsity_config") or {}
    if not isinstance(sparsity, dict):
        raise _refuse(directory, f"{key}.sparsity_config", sparsity, ["an object"])
    fmt = sparsity.get("format", "dense") if sparsity else "dense"
    if fmt not in SUPPORTED_SPARSITY:
        raise _refuse(directory, f"{key}.sparsity_config.format", fmt, SUPPORTED_SPARSITY)
    return fmt


def quantization_config_of(directory: Path, key: str, entry: dict):
    """The validated compressed-tensors QuantizationConfig and each scheme's format, or (None, []) if none."""
    if not entry.get("config_groups"):
        return None, []
    import pydantic
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig

    if entry.get("transform_config"):
        raise _refuse(directory, f"{key}.transform_config", "(online rotations)", ["{} (no transforms)"])
    try:
        config = QuantizationConfig.model_validate({k: v for k, v in entry.items()
                                                    if k not in ("sparsity_config", "transform_config", "version")})
    except pydantic.ValidationError as exc:
        raise ValueError(f"{directory / CONFIG_NAME}: {key} is not a compressed-tensors quantization config "
                         f"({exc.errors()[0].get('loc')}: {exc.errors()[0].get('msg')})") from None
    formats = []
    for group, scheme in config.config_groups.items():
        where = f"{key}.config_groups.{group}"
        top = config.format if config.format not in (None, "mixed-precision") else None
        fmt = str(getattr(scheme.format, "value", scheme.format) or top
                  or infer_module_format(torch.nn.Linear, scheme).value)
        if fmt not in SUPPORTED_QUANTIZATION:
            raise _refuse(directory, f"{where}.format", fmt, SUPPORTED_QUANTIZATION)
        weights = scheme.weights
        if weights is not None and (weights.type != "int" or weights.strategy not in SUPPORTED_STRATEGIES):
            raise _refuse(directory, f"{where}.weights", f"{weights.type} {weights.strategy}",
                          [f"int {s}" for s in SUPPORTED_STRATEGIES])
        scheme.format = fmt
        formats.append(fmt)
    return config, formats


def describe_scheme(sparsity_format: str, config) -> str:
    parts = [] if sparsity_format == "dense" else [sparsity_format]
    for scheme in (config.config_groups.values() if config is not None else []):
        w, a = scheme.weights, scheme.input_activations
        text = f"{scheme.format} W{w.num_bits if w else 16}A{a.num_bits if a else 16}"
        if w is not None:
            group = f" {w.group_size}" if w.strategy == "group" else ""
            text += f" (int{w.num_bits} weights, {w.strategy}{group}, {'sym' if w.symmetric else 'asym'})"
        if a is not None:
            text += " (activations not quantized)"
        parts.append(text)
    return " + ".join(parts) or "dense"


# -- decompression ----------------------------------------------------------------------------------
def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], int]:
    tensors, size = {}, 0
    for file in weight_files(directory):
        try:
            part = load_file(str(file))
        except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error types for a bad file
            raise ValueError(f"{file} is not a readable safetensors file ({exc})") from None
        tensors.update(part)
        size += file.stat().st_size
    return tensors, size


def _undo_sparsity(tensors: dict[str, torch.Tensor], fmt: str, directory: Path) -> int:
    """Replace every PREFIX.{shape, compressed, bitmask[, row_offsets]} set by PREFIX.weight, in place."""
    if fmt == "dense":
        return 0
    params = sparse_codec.PARAMS[fmt]
    prefixes = sorted({name.rsplit(".", 1)[0] for name in tensors if name.endswith(".bitmask")})
    for prefix in prefixes:
        missing = [p for p in params if f"{prefix}.{p}" not in tensors]
        if missing:
            raise ValueError(f"{directory}: {prefix}.bitmask is stored without {prefix}.{missing[0]} "
                             f"(a {fmt} weight needs {', '.join(params)})")
        parts = {p: tensors.pop(f"{prefix}.{p}") for p in params}
        tensors[f"{prefix}.weight"] = sparse_codec.decode(parts, f"{directory}: {prefix}")
    orphans = [n for n in tensors if n.rsplit(".", 1)[-1] in ("compressed", "row_offsets")]
    if orphans:
        raise ValueError(f"{directory}: {orphans[0]} is stored without its bitmask ({fmt} needs "
                         f"{', '.join(params)})")
    return len(prefixes)


def _undo_quantization(tensors: dict[str, torch.Tensor], config, directory: Path) -> int:
    """Dequantize every quantized weight with compressed-tensors' own compressor for its scheme, in place."""
    if config is None:
        return 0
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.utils.match import match_quantizable_tensors

    count = 0
    for scheme in config.config_groups.values():
        if scheme.weights is None:
            continue
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        names = compressor.compression_param_names(scheme)
        matched = list(match_quantizable_tensors(tensors, ignore=config.ignore or [], targets=scheme.targets,
                                                 param_targets=[names[0]]))
        for module, root in matched:
            if f"{module}.weight_scale" not in tensors and tensors[root].is_floating_point():
                continue  # a targeted name that was never quantized (an embedding, a float head)
            missing = [n for n in names if f"{module}.{n}" not in tensors]
            if missing:
                raise ValueError(f"{directory}: {root} is quantized ({scheme.format}) but {module}.{missing[0]} "
                                 f"is missing (needs {', '.join(names)})")
            state = {n: tensors.pop(f"{module}.{n}") for n in names}
            tensors[f"{module}.weight"] = compressor.decompress(state, scheme)["weight"]
            count += 1
    return count


def _drop_activation_qparams(tensors: dict[str, torch.Tensor], directory: Path) -> list[str]:
    dropped = [n for n in tensors if n.rsplit(".", 1)[-1] in ACTIVATION_QPARAMS]
    for name in dropped:
        del tensors[name]
    leftover = [n for n, t in tensors.items() if n.rsplit(".", 1)[-1].startswith("weight_") or not t.is_floating_point()]
    if leftover:
        raise ValueError(f"{directory}: {leftover[0]} ({tensors[leftover[0]].dtype}) is left after decompression: "
                         "its scheme's targets or ignore list in config.json do not cover it")
    return dropped


def load_dense_state_dict(directory: str | Path) -> LoadedCheckpoint:
    """The dense float state dict of a compressed-tensors checkpoint, on the CPU (see the module docstring)."""
    path = Path(directory).expanduser()
    found = compression_entry(path)
    if found is None:
        raise ValueError(f"{path / CONFIG_NAME} has no compressed-tensors entry ({' or '.join(CONFIG_KEYS)} with "
                         f"quant_method {QUANT_METHOD!r}): load it as a dense checkpoint")
    key, entry = found
    layout = sparsity_format(path, key, entry)
    config, formats = quantization_config_of(path, key, entry)
    tensors, on_disk = _read_tensors(path)
    decompressed = _undo_sparsity(tensors, layout, path)
    decompressed += _undo_quantization(tensors, config, path)
    dropped = _drop_activation_qparams(tensors, path)
    in_memory = sum(t.numel() * t.element_size() for t in tensors.values())
    return LoadedCheckpoint(directory=str(path), state_dict=tensors, sparsity_format=layout,
                            quantization_format=" + ".join(sorted(set(formats))) or "dense",
                            scheme=describe_scheme(layout, config), bytes_on_disk=on_disk,
                            bytes_in_memory=in_memory, decompressed_tensors=decompressed, dropped=dropped)


def stored_dense_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Each weight's dense shape from the safetensors headers (and the small shape tensors of compressed weights)
    without decompressing anything: for comparing a checkpoint with the model its config describes."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(Path(directory).expanduser()):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                prefix, _, part = name.rpartition(".")
                if part == "shape":
                    shapes[f"{prefix}.weight"] = tuple(int(x) for x in handle.get_tensor(name).flatten().tolist())
                elif part == "weight_shape":
                    shapes[f"{prefix}.weight"] = tuple(int(x) for x in handle.get_tensor(name).flatten().tolist())
                elif part in ("weight", "weight_packed") and f"{prefix}.weight" not in shapes:
                    shapes[f"{prefix}.weight"] = tuple(handle.get_slice(name).get_shape())
                elif part not in ("compressed", "bitmask", "row_offsets", "weight_scale", "weight_zero_point",
                                  "weight_global_scale", *ACTIVATION_QPARAMS):
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


# -- an HF causal LM --------------------------------------------------------------------------------
def load_state_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict that allows only tied weights to be absent (stored once under another name)."""
    result = model.load_state_dict(state_dict, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[n].data_ptr() for n in state_dict if n in params}
    missing = [n for n in result.missing_keys if n not in params or params[n].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        problem = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
        raise ValueError(f"{where}: the decompressed weights do not match the model its config describes ({problem})")


def load_compressed_causal_lm(directory: str | Path, dtype: torch.dtype = torch.float32):
    """(HF causal LM in eval mode on the CPU, LoadedCheckpoint); the model is built from config.json without
    its quantization entry (local files only, no remote code) and gets the decompressed weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = load_dense_state_dict(directory)
    path = Path(loaded.directory)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    for key in CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = _renamed_for(model, loaded.state_dict)
    load_state_into(model, {k: v.to(dtype) for k, v in state.items()}, str(path))
    model.eval()
    return model, loaded


def _renamed_for(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's names as the model has them: transformers saves some architectures under their original
    checkpoint names (GPT-NeoX's lm_head as embed_out) and renames them when it loads; the same renamings here
    (renamings only: a checkpoint needing a converter is refused by load_state_into, naming the key)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return state_dict
    return {rename_source_key(name, renamings, [])[0]: tensor for name, tensor in state_dict.items()}
