"""Compressed checkpoints: compressed-tensors' formats written by prunedrive and by the library, read back dense.

Sparse fixtures (tests/data/ct_legacy_sparse) were written by compressed-tensors 0.14.0.1's own ModelCompressor,
the last release with sparse compressors (see make_fixtures.py there); the quantized ones are written here by the
pinned compressed-tensors (apply_quantization_config, min-max weight observation + calculate_qparams,
ModelCompressor.compress_model), no hand-made tensors.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from prunedrive.models import sparse_codec
from prunedrive.models.compressed_load import (EXECUTION, is_compressed_checkpoint, load_compressed_causal_lm,
                                               load_dense_state_dict, load_state_into, stored_dense_shapes)
from prunedrive.models.compressed_save import save_compressed
from prunedrive.models.pruning import prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LEGACY = Path(__file__).resolve().parent / "data" / "ct_legacy_sparse"
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 2, 40]])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_bit_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(bits(got[name]), bits(tensor)), name


def llama(hidden=128, intermediate=256, layers=2, vocab=128, tie=False, seed=0, positions=64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie)).eval()


def logits(model, state=None) -> torch.Tensor:
    if state is not None:
        load_state_into(model, state, "test")
    with torch.no_grad():
        return model(TOKENS).logits


# -- checkpoints the library wrote --------------------------------------------------------------------
@pytest.mark.parametrize("name, fmt", [("bitmask", "sparse-bitmask"), ("sparse24", "sparse-24-bitmask")])
def test_library_sparse_checkpoint_loads_bit_identical(tmp_path, name, fmt):
    directory = shutil.copytree(LEGACY / name, tmp_path / name)
    reference = load_file(str(directory / "reference.safetensors"))
    (directory / "reference.safetensors").unlink()
    assert is_compressed_checkpoint(directory)
    loaded = load_dense_state_dict(directory)
    assert_bit_identical(loaded.state_dict, reference)
    assert loaded.sparsity_format == fmt and loaded.scheme == fmt and loaded.execution == EXECUTION
    assert loaded.decompressed_tensors == 14  # 7 Linears per block, 2 blocks; lm_head ignored
    assert loaded.bytes_on_disk == (directory / "model.safetensors").stat().st_size < loaded.bytes_in_memory
    assert stored_dense_shapes(directory) == {k: tuple(v.shape) for k, v in reference.items()}
    model, _ = load_compressed_causal_lm(directory)
    expected = logits(LlamaForCausalLM(model.config).eval(), reference)
    got = logits(model)
    assert torch.isfinite(got).all() and torch.equal(got, expected)


def _decode_ignoring_bitmask(parts: dict) -> torch.Tensor:
    """A plausible wrong reader: each row's values (found with row_offsets) put at the row's first columns."""
    rows, cols = parts["shape"].tolist()
    dense = torch.zeros(rows, cols, dtype=parts["compressed"].dtype)
    ends = list(parts["row_offsets"][1:].tolist()) + [parts["compressed"].numel()]
    for r, (start, end) in enumerate(zip(parts["row_offsets"].tolist(), ends)):
        dense[r, : end - start] = parts["compressed"][start:end]
    return dense


def test_a_reader_that_ignores_the_bitmask_does_not_match():
    stored = load_file(str(LEGACY / "bitmask" / "model.safetensors"))
    reference = load_file(str(LEGACY / "bitmask" / "reference.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj"
    parts = {p: stored[f"{prefix}.{p}"] for p in sparse_codec.PARAMS["sparse-bitmask"]}
    want = reference[f"{prefix}.weight"]
    assert torch.equal(sparse_codec.decode(parts, prefix), want)
    assert not torch.equal(_decode_ignoring_bitmask(parts), want)


def _observe(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration-free min-max weight observer, reduced the way the scheme's strategy groups the weight."""
    if args.strategy == "group":
        groups = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        return groups.amin(-1), groups.amax(-1)
    if args.strategy == "channel":
        return weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    return weight.amin().reshape(1), weight.amax().reshape(1)


def write_quantized(directory: Path, preset: str, **llama_kwargs):
    """A tiny Llama (llama(**llama_kwargs)) quantized and compressed by compressed-tensors; returns (original model
    state, the fake-quantized weights, the weights the library's own decompress_model gives back)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, apply_quantization_config,
                                                 fake_quantize, preset_name_to_scheme)
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = llama(**llama_kwargs)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    scheme = preset_name_to_scheme(preset, ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        **scheme.model_dump())}, ignore=["lm_head"]), show_progress=False)
    fake = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            scale, zero_point = calculate_qparams(*_observe(module.weight, args), args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
            fake[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, args)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    compressor.decompress_model(model)
    by_library = {name: model.state_dict()[name] for name in fake}
    return original, fake, by_library


@pytest.mark.parametrize("preset, fmt, bits_", [("W8A8", "int-quantized", 8), ("W4A16", "pack-quantized", 4)])
def test_library_quantized_checkpoint_loads_decompressed(tmp_path, preset, fmt, bits_):
    original, fake, by_library = write_quantized(tmp_path / preset, preset)
    config = json.loads((tmp_path / preset / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt and config["quant_method"] == "compressed-tensors"
    loaded = load_dense_state_dict(tmp_path / preset)
    assert loaded.quantization_format == fmt and loaded.execution == "decompressed: no kernel"
    assert f"int{bits_} weights" in loaded.scheme and preset in loaded.scheme
    assert loaded.decompressed_tensors == len(fake) == 14
    for name, weight in fake.items():
        assert torch.equal(loaded.state_dict[name], weight) and torch.equal(loaded.state_dict[name], by_library[name])
    for name in set(original) - set(fake):  # embeddings, norms, lm_head: untouched
        assert torch.equal(loaded.state_dict[name], original[name])
    dense_bytes = sum(t.numel() * t.element_size() for t in original.values())
    assert loaded.bytes_in_memory == dense_bytes and loaded.bytes_on_disk < dense_bytes * (0.45 if bits_ == 8 else 0.3)
    model, _ = load_compressed_causal_lm(tmp_path / preset)
    got, float_logits = logits(model), logits(llama(), original)
    assert torch.isfinite(got).all()
    assert torch.equal(got, logits(llama(), {**original, **fake}))
    similarity = torch.nn.functional.cosine_similarity(got.flatten(), float_logits.flatten(), dim=0)
    assert similarity > (0.999 if bits_ == 8 else 0.95), similarity  # close to the float model's logits


# -- checkpoints prunedrive writes ----------------------------------------------------------------------
def test_70_percent_unstructured_llama_is_under_045x_and_reloads_bit_identical(tmp_path):
    model = llama(hidden=160, intermediate=640, layers=4, vocab=768, tie=True)  # the `small` preset's LM shape
    prune(model, "magnitude", 0.7)
    model.save_pretrained(tmp_path / "dense")
    summary = save_compressed(model, tmp_path / "compressed")
    assert summary.format == "sparse-bitmask" and summary.compressed_modules == 28
    dense_size = (tmp_path / "dense" / "model.safetensors").stat().st_size
    size = (tmp_path / "compressed" / "model.safetensors").stat().st_size
    assert summary.bytes_on_disk == size and summary.dense_bytes == dense_size
    assert size / dense_size <= 0.45, size / dense_size
    entry = json.loads((tmp_path / "compressed" / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "compressed-tensors"
    assert entry["sparsity_config"]["format"] == "sparse-bitmask"
    assert len(entry["sparsity_config"]["targets"]) == 28 and "lm_head" not in entry["sparsity_config"]["targets"]
    loaded = load_dense_state_dict(tmp_path / "compressed")
    assert_bit_identical(loaded.state_dict, load_file(str(tmp_path / "dense" / "model.safetensors")))
    reloaded, _ = load_compressed_causal_lm(tmp_path / "compressed")
    assert torch.equal(logits(reloaded), logits(model))


def test_2_4_model_is_written_in_the_2_4_format_smaller_than_dense(tmp_path):
    model = llama()
    prune(model, "magnitude", None, "2:4")
    summary = save_compressed(model, tmp_path / "m")
    assert summary.format == "sparse-24-bitmask" and summary.compressed_modules == 14
    assert summary.ratio_to_dense < 0.7
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert stored["model.layers.0.mlp.down_proj.compressed"].shape == (128, 128)  # [rows, cols / 2]
    loaded = load_dense_state_dict(tmp_path / "m")
    assert loaded.sparsity_format == "sparse-24-bitmask"
    assert_bit_identical(loaded.state_dict, {k: v for k, v in model.state_dict().items()})


def test_driving_llm_compressed_reloads_bit_identical(tmp_path):
    from prunedrive.app.train import untrained_model
    from prunedrive.models.data import synthetic_split
    from prunedrive.models.driving_llm import collate
    from prunedrive.models.presets import PRESETS
    from prunedrive.models.pruning.magnitude import prune_magnitude

    split = synthetic_split(8, seed=1)
    model = untrained_model(PRESETS["tiny"], split)
    prune(model.lm, "magnitude", 0.7)
    prune_magnitude(model.encoder, 0.7)
    summary = save_compressed(model, tmp_path / "m")
    assert summary.format == "sparse-bitmask" and summary.ratio_to_dense < 0.65
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "prunedrive-driving-llm"
    assert any(t.startswith("encoder.") for t in config["quantization_config"]["sparsity_config"]["targets"])
    loaded = load_dense_state_dict(tmp_path / "m")
    want = {k: v for k, v in model.state_dict().items() if k in loaded.state_dict}
    assert_bit_identical(loaded.state_dict, want)
    other = untrained_model(PRESETS["tiny"], split, seed=5)
    load_state_into(other, loaded.state_dict, str(tmp_path / "m"))
    observations = [split.observation(i) for i in range(3)]
    assert other.answer(observations, "Action:") == model.answer(observations, "Action:")
    assert torch.equal(other.encoder(collate(observations)), model.encoder(collate(observations)))


def test_negative_zero_survives_the_bitmask():
    """The library kept `value != 0`, so a stored -0.0 came back +0.0: not bit-identical."""
    weight = torch.tensor([[0.0, -0.0, 1.5, 0.0, 0.0, 0.0, 0.0, -2.0], [-0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]])
    for encode in (sparse_codec.encode_bitmask, sparse_codec.encode_24):
        assert torch.equal(bits(sparse_codec.decode(encode(weight), "w")), bits(weight))


# -- refusals -----------------------------------------------------------------------------------------
def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config["quantization_config"])
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, field, value", [
    (lambda q: q["config_groups"]["group_0"].update(format="float-quantized"), "config_groups.group_0.format",
     "float-quantized"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"), "config_groups.group_0.weights",
     "float"),
    (lambda q: q.update(sparsity_config={"format": "marlin-24"}), "sparsity_config.format", "marlin-24"),
    (lambda q: q.update(transform_config={"config_groups": {"u": {}}}), "transform_config", "rotations"),
])
def test_unsupported_scheme_is_refused_naming_directory_field_and_choices(tmp_path, edit, field, value):
    write_quantized(tmp_path / "q", "W8A8")
    _edit_config(tmp_path / "q", edit)
    with pytest.raises(ValueError) as info:
        load_dense_state_dict(tmp_path / "q")
    message = str(info.value)
    assert str(tmp_path / "q" / "config.json") in message and f"quantization_config.{field}" in message
    assert value in message and "supported:" in message


def test_incomplete_or_dense_checkpoints_are_refused(tmp_path):
    directory = shutil.copytree(LEGACY / "bitmask", tmp_path / "torn")
    stored = load_file(str(directory / "model.safetensors"))
    del stored["model.layers.1.mlp.up_proj.shape"]
    save_file(stored, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.bitmask is stored without .*\.shape"):
        load_dense_state_dict(directory)
    llama().save_pretrained(tmp_path / "dense")
    assert not is_compressed_checkpoint(tmp_path / "dense")
    with pytest.raises(ValueError, match="no compressed-tensors entry"):
        load_dense_state_dict(tmp_path / "dense")
    (tmp_path / "dense" / "model.safetensors").unlink()
    (tmp_path / "dense" / "pytorch_model.bin").write_bytes(b"pickle")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "sparsity_config": {}}
    (tmp_path / "dense" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_dense_state_dict(tmp_path / "dense")
