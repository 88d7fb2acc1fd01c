"""Structural surgery on a causal LM's decoder blocks: remove attention heads, MLP channels and whole blocks, so
the result is a genuinely smaller dense model (fewer stored parameters, smaller matmuls), then save and load it.

    keep_heads(block, kv_groups_to_keep); keep_mlp_channels(block, channels_to_keep)
    remove_blocks(lm, [2, 5])                   # depth: later blocks renumbered (layer_idx, KV cache slots)
    save_structured(lm, directory)              # safetensors + config.json
    lm = load_structured(directory)             # AutoModelForCausalLM.from_pretrained when the widths are uniform

Which blocks are understood (`block_layout`): Llama-style blocks (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj:
Llama, Qwen2, Mistral, Gemma, ...) and GPT-2 blocks (attn.c_attn/c_proj, mlp.c_fc/c_proj: transformers' Conv1D,
weights stored [in, out]). A Llama-style head is removed with its q rows and o_proj columns; with grouped-query
attention (num_key_value_heads < num_attention_heads) only whole key-value groups are removed (the kv head's k/v rows
with every query head that reads it), so num_attention_heads / num_key_value_heads, which the attention code uses to
repeat the kv heads, stays the same. head_dim is kept and written into the config (Qwen2 otherwise derives it from
hidden_size / num_attention_heads). GPT-2's head width is always n_embd / n_head (no head_dim field), so no stock
GPT-2 config can express fewer heads of the same width: GPT-2 blocks lose MLP channels only.

How the result loads:
- every block has the same widths: the stock config fields are updated (intermediate_size / n_inner,
  num_attention_heads, num_key_value_heads, head_dim, num_hidden_layers, per-layer lists such as layer_types) and
  the directory loads with `AutoModelForCausalLM.from_pretrained`;
- widths differ per block (OWL ratios): no stock config expresses that. config.json then records the per-block
  widths under STRUCTURE_KEY, the stock fields hold the widest block, and `load_structured` (the one loader) builds
  the stock model, shrinks each block to its recorded widths (`apply_structure`) and loads the safetensors weights.
  `AutoModelForCausalLM.from_pretrained` refuses such a directory (the weight shapes differ from the config's).
  DrivingLLM builds its LM through `apply_structure` too, so its save_pretrained/from_pretrained round-trip.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from prunedrive.models.pruning.masks import Conv1D, decoder_layers, is_conv1d, weight_matrix

STRUCTURE_KEY = "prunedrive_structure"
# Config lists with one entry per decoder block, filtered with the blocks (Qwen2/Gemma: layer_types; SmolLM3-style
# models: no_rope_layers).
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")


@dataclass(frozen=True)
class BlockLayout:
    """Where a family's prunable groups live inside one decoder block (attribute paths)."""

    family: str
    q: str | None          # separate projections (Llama-style); None where heads are not pruned
    k: str | None
    v: str | None
    o: str | None
    mlp_in: tuple[str, ...]  # layers whose output rows are the MLP channels
    mlp_out: str             # the layer whose input columns are the MLP channels
    mlp_config_field: str    # the stock config field of the MLP width


LLAMA = BlockLayout("llama", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size")
GPT2 = BlockLayout("gpt2", None, None, None, None, ("mlp.c_fc",), "mlp.c_proj", "n_inner")
LAYOUTS = (LLAMA, GPT2)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, module)


def block_layout(block: nn.Module) -> BlockLayout:
    """The layout of a decoder block, or a ValueError naming the block class and what is supported."""
    for layout in LAYOUTS:
        paths = [p for p in (layout.q, layout.k, layout.v, layout.o, *layout.mlp_in, layout.mlp_out) if p]
        if all(isinstance(_get(block, p), (nn.Linear, Conv1D)) for p in paths):
            return layout
    raise ValueError(f"structured pruning does not know the decoder block {type(block).__name__}: supported are "
                     "Llama-style blocks (self_attn.q/k/v/o_proj + mlp.gate/up/down_proj) and GPT-2 blocks "
                     "(attn.c_attn/c_proj + mlp.c_fc/c_proj)")


def head_dim(lm: nn.Module) -> int:
    """The width of one attention head (kept by every structural edit)."""
    block = decoder_layers(lm)[0]
    attention = getattr(block, "self_attn", None) or getattr(block, "attn", None)
    value = getattr(attention, "head_dim", None)
    if not isinstance(value, int):
        raise ValueError(f"{type(lm).__name__}: cannot tell the attention head width (no head_dim on the attention)")
    return value


# -- module surgery ---------------------------------------------------------------------------------------------------
def _out_dim(layer: nn.Module) -> int:
    return weight_matrix(layer).shape[0]


@torch.no_grad()
def take_outputs(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of `layer` (nn.Linear or Conv1D) with only the output features `keep` (its rows of [out, in])."""
    matrix = weight_matrix(layer)[keep]
    bias = None if layer.bias is None else layer.bias[keep]
    return _new_layer(layer, matrix, bias)


@torch.no_grad()
def take_inputs(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of `layer` with only the input features `keep` (its columns of [out, in]); the bias is kept whole."""
    matrix = weight_matrix(layer)[:, keep]
    return _new_layer(layer, matrix, layer.bias)


def _new_layer(layer: nn.Module, matrix: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    out_features, in_features = matrix.shape
    factory = {"device": matrix.device, "dtype": matrix.dtype}
    if is_conv1d(layer):
        new = Conv1D(out_features, in_features)
        new.weight = nn.Parameter(matrix.t().contiguous().to(**factory), requires_grad=layer.weight.requires_grad)
        new.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=layer.bias.requires_grad)
        return new
    new = nn.Linear(in_features, out_features, bias=bias is not None, **factory)
    new.weight = nn.Parameter(matrix.contiguous().clone(), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=layer.bias.requires_grad)
    return new


def _as_index(keep, size: int, what: str) -> torch.Tensor:
    # On the CPU whatever the default device: DrivingLLM's shape check builds the model under torch.device("meta"),
    # where an index tensor would have no values to check.
    keep = torch.as_tensor(sorted({int(i) for i in keep}), dtype=torch.long, device="cpu")
    if not len(keep):
        raise ValueError(f"cannot remove every {what} of a block (keep at least one)")
    if int(keep.min()) < 0 or int(keep.max()) >= size:
        raise ValueError(f"{what} indices must be in [0, {size}), got {keep.tolist()}")
    return keep


def keep_mlp_channels(block: nn.Module, keep) -> None:
    """Keep only MLP channels `keep` of `block` (gate/up rows and down columns; GPT-2: c_fc rows, c_proj columns)."""
    layout = block_layout(block)
    out = _get(block, layout.mlp_out)
    index = _as_index(keep, weight_matrix(out).shape[1], "MLP channel")
    for path in layout.mlp_in:
        _set(block, path, take_outputs(_get(block, path), index))
    _set(block, layout.mlp_out, take_inputs(out, index))


def kv_groups(block: nn.Module, head_width: int) -> tuple[int, int]:
    """(key-value heads, query heads per key-value head) of a Llama-style block, read from its weights."""
    layout = block_layout(block)
    if layout.q is None:
        raise ValueError(f"{layout.family} blocks keep their attention heads (head width is derived from the "
                         "hidden size in their config)")
    heads, kv = _out_dim(_get(block, layout.q)) // head_width, _out_dim(_get(block, layout.k)) // head_width
    return kv, heads // kv


def keep_heads(block: nn.Module, keep_groups, head_width: int) -> None:
    """Keep only key-value groups `keep_groups`: k/v rows of those kv heads, q rows and o_proj columns of every query
    head reading them (query head h reads kv head h // per_group, as transformers' repeat_kv lays them out)."""
    layout = block_layout(block)
    kv, per_group = kv_groups(block, head_width)
    groups = _as_index(keep_groups, kv, "key-value group")
    kv_rows = (groups[:, None] * head_width + torch.arange(head_width, device="cpu")).reshape(-1)
    heads = (groups[:, None] * per_group + torch.arange(per_group, device="cpu")).reshape(-1)
    q_rows = (heads[:, None] * head_width + torch.arange(head_width, device="cpu")).reshape(-1)
    _set(block, layout.q, take_outputs(_get(block, layout.q), q_rows))
    _set(block, layout.k, take_outputs(_get(block, layout.k), kv_rows))
    _set(block, layout.v, take_outputs(_get(block, layout.v), kv_rows))
    _set(block, layout.o, take_inputs(_get(block, layout.o), q_rows))


def remove_blocks(lm: nn.Module, drop) -> list[int]:
    """Remove decoder blocks `drop` (indices) in place; the rest are renumbered 0..n-1 (every `layer_idx` inside
    them: attention modules index the KV cache by it) and the config's num_hidden_layers and per-layer lists follow.
    Returns the kept original indices."""
    layers = decoder_layers(lm)
    n = len(layers)
    drop = sorted({int(i) for i in drop})
    if any(not 0 <= i < n for i in drop):
        raise ValueError(f"block indices must be in [0, {n}), got {drop}")
    if len(drop) >= n:
        raise ValueError(f"cannot remove all {n} decoder blocks")
    config = _text_config(lm)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and drop:
        raise ValueError("this GPT-2 config scales attention by 1 / (layer_idx + 1) (scale_attn_by_inverse_layer_idx):"
                         " renumbered blocks would change their scaling; depth pruning is not supported for it")
    kept = [i for i in range(n) if i not in drop]
    for i in reversed(drop):
        del layers[i]  # ModuleList renumbers its keys: state-dict names follow the new indices
    for new_index, block in enumerate(layers):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    if config is not None:
        for field in PER_LAYER_LISTS:
            values = getattr(config, field, None)
            if isinstance(values, list) and len(values) == n:
                setattr(config, field, [values[i] for i in kept])
        config.num_hidden_layers = len(kept)
    return kept


def _text_config(lm: nn.Module):
    config = getattr(lm, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


# -- widths, config, save and load ------------------------------------------------------------------------------------
def block_widths(lm: nn.Module) -> list[dict[str, int]]:
    """Per decoder block, its widths as stock config fields (read from the weights)."""
    head_width = None
    widths = []
    for block in decoder_layers(lm):
        layout = block_layout(block)
        entry = {layout.mlp_config_field: weight_matrix(_get(block, layout.mlp_out)).shape[1]}
        if layout.q is not None:
            head_width = head_width or head_dim(lm)
            kv, per_group = kv_groups(block, head_width)
            entry.update(num_attention_heads=kv * per_group, num_key_value_heads=kv)
        widths.append(entry)
    return widths


def sync_config(lm: nn.Module) -> dict:
    """Write the model's actual structure into its config (see the module docstring); returns the per-block widths
    recorded under STRUCTURE_KEY, or {} when the widths are uniform (stock fields only)."""
    config = _text_config(lm)
    widths = block_widths(lm)
    config.num_hidden_layers = len(widths)
    if block_layout(decoder_layers(lm)[0]).q is not None:
        config.head_dim = head_dim(lm)  # Qwen2 derives it from hidden_size / num_attention_heads otherwise
    for field in widths[0]:
        setattr(config, field, max(w[field] for w in widths))  # the widest block: apply_structure only shrinks
    uniform = all(w == widths[0] for w in widths)
    structure = {} if uniform else {"blocks": widths}
    if structure:
        setattr(config, STRUCTURE_KEY, structure)
    elif hasattr(config, STRUCTURE_KEY):
        delattr(config, STRUCTURE_KEY)
    return structure


def recorded_structure(config) -> list[dict[str, int]] | None:
    """The per-block widths recorded in a config (object or dict), checked; None when there are none."""
    structure = config.get(STRUCTURE_KEY) if isinstance(config, dict) else getattr(config, STRUCTURE_KEY, None)
    if structure is None:
        return None
    blocks = structure.get("blocks") if isinstance(structure, dict) else None
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise ValueError(f"config field {STRUCTURE_KEY} must be {{'blocks': [{{field: width, ...}}, ...]}}, "
                         f"got {structure!r}")
    for i, block in enumerate(blocks):
        for field, width in block.items():
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise ValueError(f"config field {STRUCTURE_KEY}.blocks[{i}].{field} must be a positive integer, "
                                 f"got {width!r}")
    return blocks


def apply_structure(lm: nn.Module) -> nn.Module:
    """Shrink a model built from its (widest-block) config to the per-block widths its config records (a no-op
    without STRUCTURE_KEY). Which channels are kept does not matter: the weights are loaded afterwards."""
    blocks = recorded_structure(_text_config(lm))
    if blocks is None:
        return lm
    layers = decoder_layers(lm)
    if len(blocks) != len(layers):
        raise ValueError(f"config field {STRUCTURE_KEY} has {len(blocks)} blocks; the model has {len(layers)}")
    head_width = None
    for i, (block, widths) in enumerate(zip(layers, blocks)):
        layout = block_layout(block)
        allowed = {layout.mlp_config_field} | ({"num_attention_heads", "num_key_value_heads"} if layout.q else set())
        if set(widths) - allowed:
            raise ValueError(f"config field {STRUCTURE_KEY}.blocks[{i}]: unknown {sorted(set(widths) - allowed)}; "
                             f"allowed: {sorted(allowed)}")
        if layout.mlp_config_field in widths:
            keep_mlp_channels(block, range(widths[layout.mlp_config_field]))
        if "num_key_value_heads" in widths:
            head_width = head_width or head_dim(lm)
            keep_heads(block, range(widths["num_key_value_heads"]), head_width)
    return lm


def save_structured(lm: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Save a structurally pruned HF causal LM (safetensors) with its structure in config.json."""
    sync_config(lm)
    directory = Path(directory)
    lm.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_structured(directory: str | Path, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a directory written by `save_structured` (any local HF causal LM directory works too): stock configs
    through AutoModelForCausalLM.from_pretrained, per-block widths through stock model + `apply_structure` +
    safetensors weights. Local files only, safetensors only, no remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(directory).expanduser()
    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file}: not a readable config.json ({exc})") from None
    if recorded_structure(raw) is None:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True, **kwargs)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if dtype == "auto":  # the checkpoint's own dtype, as from_pretrained reads it
        dtype = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), torch.float32)
    lm = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    apply_structure(lm)
    _load_safetensors(lm, path)
    lm.eval()
    return lm


def _weight_files(path: Path) -> list[Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        files = [path / name for name in shards]
        outside = [f for f in files if f.resolve().parent != path.resolve()]
        if outside:
            raise ValueError(f"{index} names shards outside {path}: {outside[0]}")
        return files
    raise FileNotFoundError(f"{path} has no model.safetensors (nor a sharded index): structured models are "
                            "stored as safetensors")


@torch.no_grad()
def _load_safetensors(lm: nn.Module, path: Path) -> None:
    state = {}
    for file in _weight_files(path):
        state.update(load_file(str(file)))
    expected = lm.state_dict()
    wrong = [f"{k}: stored {tuple(v.shape)}, model {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{path}: weights do not match config.json's {STRUCTURE_KEY}: {'; '.join(wrong[:3])}")
    missing, unexpected = lm.load_state_dict(state, strict=False)
    # save_pretrained stores tied weights (lm_head = embeddings) once: a missing name that shares its tensor with a
    # loaded one is fine.
    loaded = {expected[k].data_ptr() for k in state if k in expected}
    missing = [k for k in missing if expected[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def count_parameters(module: nn.Module) -> int:
    """Stored parameters, tied ones (embeddings = lm_head) counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def structure_summary(lm: nn.Module) -> dict:
    """What a structured report states about a model: parameters (all, and in decoder blocks), blocks, widths."""
    return {"parameters": count_parameters(lm), "block_parameters": count_parameters(decoder_layers(lm)),
            "blocks": len(decoder_layers(lm)), "widths": block_widths(lm)}
