"""Structured pruning (models.pruning.structured / depth, models.pruning.surgery): a genuinely smaller model.

Tiny random Llama (GQA), Qwen2 (GQA, biases, layer_types) and GPT-2 (Conv1D) built from configs; every check uses the
real surgery and the real save/load path.
"""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from prunedrive.models.pruning import prune
from prunedrive.models.pruning.calibration import context_length, fit_to_context, random_token_calibration
from prunedrive.models.pruning.depth import block_influence, blocks_to_remove, lowest_influence
from prunedrive.models.pruning.masks import decoder_layers
from prunedrive.models.pruning.owl import owl_outlier_ratios, owl_sparsities_from_ratios
from prunedrive.models.pruning.structured import prune_width_by_ratios
from prunedrive.agents.text_llm import TextLLMAgent
from prunedrive.app.prune import prune_model_dir
from prunedrive.models.hf_causal import load_causal_lm
from prunedrive.models.pruning.surgery import (STRUCTURE_KEY, apply_structure, count_parameters, keep_heads,
                                               keep_mlp_channels, load_structured, save_structured)

from test_hf_models import checkpoints, smoke_env  # noqa: F401 -- module fixtures: tiny HF checkpoints, an env

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, HIDDEN = 128, 64


def _config(arch: str, layers: int = 3, intermediate: int = 128):
    ids = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common = dict(hidden_size=HIDDEN, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **ids)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    return GPT2Config(n_embd=HIDDEN, n_layer=layers, n_head=4, n_inner=intermediate, n_positions=256, **ids)


def _model(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(arch, **kw)).eval()


def _calibration(n: int = 4, length: int = 16):
    return random_token_calibration(VOCAB, [length] * n, seed=1)


def _logits(lm, ids):
    with torch.no_grad():
        return lm(input_ids=ids).logits


IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_uniform_width_is_smaller_and_loads_with_automodel(arch, tmp_path):
    lm = _model(arch)
    report = prune(lm, "width", 0.5, calibration=_calibration())
    assert report["parameters_after"] < report["parameters_before"] == count_parameters(_model(arch))
    assert report["parameters_after"] == count_parameters(lm)
    expected = {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    if arch == "gpt2":  # heads kept: a GPT-2 config cannot express fewer heads of the same width
        expected = {"n_inner": 64}
        assert not report["heads_pruned"]
    else:
        assert report["removed_block_parameter_share"] == pytest.approx(0.5, abs=0.01)  # all linears halve (norms stay)
    assert report["widths"] == [expected] * 3
    save_structured(lm, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert STRUCTURE_KEY not in config
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert count_parameters(back) == report["parameters_after"]
    assert torch.equal(_logits(back, IDS), _logits(lm, IDS))


def test_owl_width_gives_per_block_widths_that_load_with_the_loader(tmp_path):
    lm = _model("llama", layers=4)
    dense = copy.deepcopy(lm)
    calibration = _calibration()
    report = prune(lm, "owl-width", 0.5, calibration=calibration)
    expected_ratios = owl_sparsities_from_ratios(owl_outlier_ratios(dense, calibration), 0.5)
    assert report["block_ratios"] == pytest.approx(expected_ratios)
    assert len({w["intermediate_size"] for w in report["widths"]}) > 1  # non-uniform: OWL decided per block
    most_outliers = max(range(4), key=lambda i: report["outlier_ratios"][i])
    assert report["widths"][most_outliers]["intermediate_size"] == max(w["intermediate_size"] for w in report["widths"])
    save_structured(lm, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[STRUCTURE_KEY]["blocks"] == report["widths"]
    with pytest.raises(Exception):  # no stock config expresses per-block widths
        AutoModelForCausalLM.from_pretrained(tmp_path)
    back = load_structured(tmp_path)
    assert count_parameters(back) == report["parameters_after"] < report["parameters_before"]
    assert torch.equal(_logits(back, IDS), _logits(lm, IDS))


def _outlier_mlp_model():
    """One Llama block whose MLP channel 0 has small weights except on input channel 3, which calibration drives
    huge; the other channels have larger weights everywhere. Attention contributes nothing (o_proj zero)."""
    lm = _model("llama", layers=1, intermediate=8)
    block = decoder_layers(lm)[0]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        for layer in (block.mlp.gate_proj, block.mlp.up_proj):
            layer.weight.fill_(0.1)
            layer.weight[0].fill_(0.01)
            layer.weight[0, 3] = 0.5
        block.mlp.down_proj.weight.fill_(0.1)
        block.mlp.down_proj.weight[:, 0] = 0.01
    gen = torch.Generator().manual_seed(0)
    calibration = []
    for _ in range(4):
        x = torch.randn(1, 16, HIDDEN, generator=gen)
        x[..., 3] = 1000.0
        calibration.append({"inputs_embeds": x, "attention_mask": torch.ones(1, 16, dtype=torch.long)})
    return lm, calibration


def _has_outlier_channel(lm) -> bool:
    gate = decoder_layers(lm)[0].mlp.gate_proj.weight
    return bool((gate[:, 3] == 0.5).any())


def test_width_importance_uses_activations_not_weights_only():
    lm, calibration = _outlier_mlp_model()
    prune(lm, "width", 0.5, calibration=calibration)
    assert _has_outlier_channel(lm)  # Wanda-sp: the channel reading the huge input survives
    # the wrong variant, |W| summed without ||X||, removes exactly that channel
    weights_only, calibration = _outlier_mlp_model()
    prune_width_by_ratios(weights_only, calibration, [0.5], activations=False)
    assert not _has_outlier_channel(weights_only)


def test_head_surgery_keeps_the_gqa_mapping():
    """Keeping kv group 1 must equal the dense model with query heads 2 and 3 (the ones reading kv head 1) kept and
    heads 0, 1 silenced (their o_proj columns zeroed); an interleaved mapping (heads 1, 3) would not."""
    lm = _model("llama", layers=1)
    silenced = copy.deepcopy(lm)
    head_width = HIDDEN // 4
    with torch.no_grad():
        decoder_layers(silenced)[0].self_attn.o_proj.weight[:, : 2 * head_width] = 0
        decoder_layers(silenced)[0].mlp.down_proj.weight[:, 64:] = 0
    keep_heads(decoder_layers(lm)[0], [1], head_width)
    keep_mlp_channels(decoder_layers(lm)[0], range(64))
    assert count_parameters(lm) < count_parameters(silenced)
    torch.testing.assert_close(_logits(lm, IDS), _logits(silenced, IDS), rtol=1e-5, atol=1e-5)


def _identity_block_model(arch: str, identity: int):
    lm = _model(arch, layers=4)
    block = decoder_layers(lm)[identity]
    with torch.no_grad():
        if arch == "gpt2":
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                layer.weight.zero_()
                layer.bias.zero_()
        else:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return lm


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_depth_removes_the_block_that_does_nothing(arch, tmp_path):
    lm = _identity_block_model(arch, identity=2)
    dense = copy.deepcopy(lm)
    report = prune(lm, "depth", 0.25, calibration=_calibration())
    assert report["block_influence"][2] == pytest.approx(0.0, abs=1e-6)
    assert report["removed_blocks"] == [2] and report["blocks_after"] == 3
    assert report["parameters_after"] < report["parameters_before"]
    # the block changed nothing, so nothing changes without it; layer_idx renumbered for the KV cache
    assert [b.self_attn.layer_idx if arch != "gpt2" else b.attn.layer_idx for b in decoder_layers(lm)] == [0, 1, 2]
    torch.testing.assert_close(_logits(lm, IDS), _logits(dense, IDS), rtol=1e-5, atol=1e-5)
    prompt = IDS[:1]
    generated = lm.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(generated, dense.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))
    save_structured(lm, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == 3
    if arch == "qwen2":
        assert len(config["layer_types"]) == 3
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(back, IDS), _logits(lm, IDS))


def test_depth_choice_is_lowest_influence_not_highest():
    influence = [0.3, 0.05, 0.9, 0.2]
    assert lowest_influence(influence, 2) == [1, 3]
    assert blocks_to_remove(4, 0.25) == 1 and blocks_to_remove(4, 0.01) == 1 and blocks_to_remove(4, 0.99) == 3
    assert blocks_to_remove(4, 0.0) == 0


def test_block_influence_measures_the_turn_of_each_block():
    lm = _identity_block_model("llama", identity=1)
    influence = block_influence(lm, _calibration())
    assert influence[1] == pytest.approx(0.0, abs=1e-6)
    assert min(influence[0], influence[2], influence[3]) > 1e-3


def test_width_and_depth_combine_and_round_trip(tmp_path):
    lm = _model("qwen2", layers=4)
    prune(lm, "owl-width", 0.5, calibration=_calibration())
    prune(lm, "depth", 0.25, calibration=_calibration())
    save_structured(lm, tmp_path)
    back = load_structured(tmp_path)
    assert len(decoder_layers(back)) == 3
    assert torch.equal(_logits(back, IDS), _logits(lm, IDS))
    generated = back.generate(IDS[:1], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    assert generated.shape[1] == IDS.shape[1] + 4


def test_driving_llm_loads_its_structurally_pruned_lm(tmp_path):
    from prunedrive.app.train import untrained_model
    from prunedrive.models.data import lm_calibration_samples, synthetic_split
    from prunedrive.models.driving_llm import DrivingLLM, collate
    from prunedrive.models.presets import PRESETS

    split = synthetic_split()
    model = untrained_model(PRESETS["tiny"], split).eval()
    calibration, _ = fit_to_context(lm_calibration_samples(model, split, n_samples=4), context_length(model.lm))
    before = model.num_parameters()["lm"]
    report = prune(model.lm, "owl-width", 0.5, calibration=calibration)
    prune(model.lm, "depth", 0.5, calibration=calibration)
    model.config.lm = model.lm.config.to_dict()
    assert model.num_parameters()["lm"] < before
    model.save_pretrained(tmp_path)
    back = DrivingLLM.from_pretrained(tmp_path)
    assert back.num_parameters() == model.num_parameters()
    assert len(decoder_layers(back.lm)) == 1 and report["widths"]
    batch = collate([split.observation(i) for i in range(2)])
    ids = torch.tensor([model.prompt_ids("What should you do?")] * 2)
    with torch.no_grad():
        assert torch.equal(back.lm(**back.lm_inputs(batch, ids)).logits, model.lm(**model.lm_inputs(batch, ids)).logits)
    assert back.generate(batch, "What should you do?", max_new_tokens=4)[0]


def test_bad_input_is_named():
    lm = _model("llama", layers=2)
    with pytest.raises(ValueError, match="N:M pattern does not apply"):
        prune(lm, "width", 0.5, pattern="2:4", calibration=_calibration())
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune(lm, "depth", 1.0, calibration=_calibration())
    lm.config.prunedrive_structure = {"blocks": [{"intermediate_size": 0}]}
    with pytest.raises(ValueError, match=r"prunedrive_structure.blocks\[0\].intermediate_size"):
        apply_structure(lm)
    lm.config.prunedrive_structure = {"blocks": [{"hidden_size": 8}, {"hidden_size": 8}]}
    with pytest.raises(ValueError, match="unknown"):
        apply_structure(lm)


@pytest.mark.parametrize("arch,method", [("llama", "width"), ("qwen2", "owl-width"), ("gpt2", "depth")])
def test_prune_command_writes_a_smaller_model_the_text_agent_drives(checkpoints, smoke_env, arch, method, tmp_path):
    from prunedrive.harness.episode import run_episode

    record = prune_model_dir(checkpoints[arch], method, 0.5, tmp_path / "out", n_calibration=4, progress=False)
    structure = record["structure"]
    assert structure["parameters_after"] == record["parameters"]["lm"] < structure["parameters_before"]
    model, _ = load_causal_lm(tmp_path / "out")
    assert count_parameters(model) == record["parameters"]["lm"]
    recorded = STRUCTURE_KEY in json.loads((tmp_path / "out" / "config.json").read_text())
    assert recorded == (method == "owl-width")  # per-block widths: load_causal_lm went through load_structured
    if method != "owl-width":  # uniform widths: the stock loader
        assert count_parameters(AutoModelForCausalLM.from_pretrained(tmp_path / "out")) == record["parameters"]["lm"]
    scenario, env = smoke_env
    agent = TextLLMAgent(tmp_path / "out", max_new_tokens=4)
    _, steps = run_episode(env, agent, scenario, scenario.seeds[0], max_steps=3)
    assert 1 <= len(steps) <= 3
    assert (steps["params"] > 0).all()
