"""Any local Hugging Face causal LM drives (agents.text_llm) and prunes (app.prune, models.pruning).

Tiny randomly initialised checkpoints of seven architectures (Llama, Qwen2 with a chat template, GPT-2 with its
Conv1D layers, GPT-NeoX, OPT, Phi, Gemma), each a few hundred K parameters, with a byte-level BPE tokenizer
trained here on scene texts. Untrained models answer gibberish: the episode must still run (counted
fallbacks), the compute columns must be filled, and pruning must hit the target sparsity exactly.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from prunedrive.agents.registry import AgentError, AgentSpec, make_agent
from prunedrive.agents.text_llm import TextLLMAgent
from prunedrive.app.prune import prune_model_dir
from prunedrive.harness.action import BRAKE, Control
from prunedrive.harness.compute import COMPUTE_FIELDS
from prunedrive.models import scene_text, text
from prunedrive.models.data import synthetic_split
from prunedrive.models.hf_causal import NotACausalLM, load_causal_lm, prompt_ids
from prunedrive.models.pruning import prune
from prunedrive.models.pruning.calibration import scene_text_calibration
from prunedrive.models.pruning.masks import Conv1D, decoder_layers, find_linears, weight_matrix
from prunedrive.models.pruning.sparsegpt import Hessian, sparsegpt_prune_linear
from prunedrive.models.pruning.wanda import ColumnNorms, wanda_prune_linear
from prunedrive.scenarios.loader import load_suite

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512
HIDDEN, HEADS, LAYERS = 64, 4, 2
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _configs() -> dict:
    from transformers import (GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, PhiConfig,
                              Qwen2Config)

    ids = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  max_position_embeddings=2048, **ids)
    return {
        "llama": LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": Qwen2Config(num_key_value_heads=2, **common),
        "gpt2": GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=2048, **ids),
        "gpt_neox": GPTNeoXConfig(**common),
        "opt": OPTConfig(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         word_embed_proj_dim=HIDDEN, max_position_embeddings=2048, **ids),
        "phi": PhiConfig(**common),
        "gemma": GemmaConfig(num_key_value_heads=1, head_dim=16, **common),
    }


ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox", "opt", "phi", "gemma")
FIRST_LINEAR = {"llama": "model.layers.0.self_attn.q_proj", "qwen2": "model.layers.0.self_attn.q_proj",
                "gpt2": "transformer.h.0.attn.c_attn", "gpt_neox": "gpt_neox.layers.0.attention.query_key_value",
                "opt": "model.decoder.layers.0.self_attn.q_proj", "phi": "model.layers.0.self_attn.q_proj",
                "gemma": "model.layers.0.self_attn.q_proj"}
FIRST_LINEAR_SHAPE = {"gpt2": (HIDDEN, 3 * HIDDEN), "gpt_neox": (3 * HIDDEN, HIDDEN)}  # else (HIDDEN, HIDDEN)


def _tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = synthetic_split(12, seed=3)
    corpus = [scene_text.action_prompt(split.observation(i)) + split.frame["a_action"][i] for i in range(len(split))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, config in _configs().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        assert 50_000 < model.num_parameters() < 500_000
        model.save_pretrained(root / name)
        _tokenizer(chat=name == "qwen2").save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def smoke_env():
    from prunedrive.harness.env import DriveEnv

    scenario = load_suite("smoke").scenarios[0]
    env = DriveEnv(scenario)
    yield scenario, env
    env.close()


# -- scene text --------------------------------------------------------------------------------------------------
def test_scene_text_is_versioned_and_deterministic():
    obs = synthetic_split(3, seed=2).observation(1)
    first = scene_text.scene_text(obs)
    assert first == scene_text.scene_text({k: v.copy() for k, v in obs.items()})
    assert f"scene-text v{scene_text.SCENE_TEXT_VERSION}" in first and "Traffic light:" in first
    assert "-0.0" not in first and "Ego: speed" in first and "Route:" in first
    empty = {k: np.zeros_like(v) for k, v in obs.items()}
    described = scene_text.scene_text(empty)
    assert "Vehicles: none" in described and "Pedestrians: none" in described and "Traffic light: none." in described
    assert scene_text.action_prompt(obs).endswith("Answer:")


# -- loading -------------------------------------------------------------------------------------------------------
def test_bad_directories_fail_with_clear_messages(checkpoints, tmp_path):
    with pytest.raises(NotACausalLM, match="hub name"):
        load_causal_lm("meta-llama/Llama-3.2-1B")
    with pytest.raises(NotACausalLM, match="hub name"):
        TextLLMAgent("Qwen/Qwen2.5-0.5B-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotACausalLM, match=r"empty[/\\]config\.json is missing"):
        load_causal_lm(tmp_path / "empty")
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["llama"], bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NotACausalLM, match=r"model\.safetensors is not a readable safetensors"):
        load_causal_lm(bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(NotACausalLM, match=r"pytorch_model\.bin: only safetensors"):
        load_causal_lm(bad)
    (bad / "pytorch_model.bin").unlink()
    with pytest.raises(NotACausalLM, match=r"model\.safetensors is missing"):
        load_causal_lm(bad)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(checkpoints["llama"], no_tok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink()
    with pytest.raises(NotACausalLM, match="no tokenizer"):
        load_causal_lm(no_tok)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(NotACausalLM, match=r"config\.json: model_type 't5' is not a causal LM"):
        load_causal_lm(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "prunedrive-driving-llm"}))
    with pytest.raises(NotACausalLM, match="--agent llm"):
        load_causal_lm(bad)


def test_registry_knows_text_llm(checkpoints):
    with pytest.raises(AgentError, match="--model"):
        AgentSpec("text-llm").check()
    agent = make_agent("text-llm", model=checkpoints["gpt2"], max_new_tokens=2)
    assert isinstance(agent, TextLLMAgent) and agent.name == "text-llm-gpt2"


# -- driving -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_drives_a_short_episode_with_counted_compute(checkpoints, smoke_env, arch):
    from prunedrive.harness.episode import run_episode

    scenario, env = smoke_env
    agent = TextLLMAgent(checkpoints[arch], max_new_tokens=4)
    assert agent.uses_chat_template == (arch == "qwen2")
    outcome, steps = run_episode(env, agent, scenario, scenario.seeds[0], max_steps=5)
    assert 1 <= len(steps) <= 5 and 0 <= agent.parse_failures <= agent.steps == len(steps)
    for column in ("tokens_in", "tokens_out", "dense_flops", "effective_flops", "executed_flops", "params",
                   "nonzero_params", "peak_mem_bytes"):
        assert column in COMPUTE_FIELDS and np.all(np.isfinite(steps[column])) and np.all(steps[column] > 0), column

    # hand count for one linear: every processed token passes the decoder linears once
    report = agent.last_compute()
    tokens_in, tokens_out = int(report["tokens_in"]), int(report["tokens_out"])
    rows = tokens_in + tokens_out - 1  # the prefill, then one fed-back token per further generated token
    name = FIRST_LINEAR[arch]
    n_in, n_out = FIRST_LINEAR_SHAPE.get(arch, (HIDDEN, HIDDEN))
    assert agent.last_rows[name] == rows
    assert 2 * agent._sizes[name][0] * agent.last_rows[name] == 2 * n_in * n_out * rows
    assert agent.last_rows["lm_head"] == tokens_out  # last position only, per forward
    linear = sum(2 * agent._sizes[n][0] * r for n, r in agent.last_rows.items())
    pairs = tokens_in * (tokens_in + 1) // 2 + sum(tokens_in + j + 1 for j in range(tokens_out - 1))
    assert report["dense_flops"] == linear + 4 * HIDDEN * pairs * LAYERS == report["executed_flops"]
    assert report["effective_flops"] <= report["dense_flops"]

    # determinism: same model + observation -> same answer and control
    obs = synthetic_split(2, seed=5).observation(0)
    first, first_text = agent.act(obs), agent.last_text
    assert agent.act(obs) == first and agent.last_text == first_text


@pytest.mark.parametrize("arch", ARCHS)
def test_act_batch_answers_as_act_row_by_row(checkpoints, arch):
    """Lockstep decoding: prompts of different lengths left-padded into one batch give each row act()'s own
    tokens, and the per-row FLOPs add up to what the call computed."""
    agent = TextLLMAgent(checkpoints[arch], max_new_tokens=6, stop_strings=None, stop_when_parsed=False)
    split = synthetic_split(8, seed=11)
    observations = [split.observation(i) for i in (0, 3, 5)]
    lengths = [len(prompt_ids(agent.tokenizer, o)) for o in observations]
    assert len(set(lengths)) > 1  # the batch really needs padding
    alone = []
    for o in observations:
        control = agent.act(o)
        alone.append((control, agent.last_text, agent.last_compute()))
    controls = agent.act_batch(observations)
    reports = agent.last_compute_batch()
    texts_match = 0
    for i, (control, answer, report) in enumerate(alone):
        assert reports[i]["tokens_in"] == report["tokens_in"] == lengths[i]
        assert reports[i]["tokens_out"] == report["tokens_out"]
        assert controls[i] == control
        texts_match += agent.last_texts[i] == answer
    assert texts_match == len(observations)  # untrained: gibberish, but the same gibberish token for token
    width, rows = max(lengths), len(observations)
    steps = agent.max_new_tokens - 1  # no stop strings: every row runs all its tokens
    linear = sum(2 * agent._sizes[n][0] * r for n, r in agent.last_rows.items())
    pairs = width * (width + 1) // 2 + sum(width + j + 1 for j in range(steps))
    attention = 4 * agent.d_attn * pairs * agent.layers * rows
    assert sum(r["dense_flops"] for r in reports) == pytest.approx(linear + attention, rel=1e-12)
    assert agent.act_batch(observations) == controls  # deterministic


def test_act_batch_without_position_ids_answers_one_by_one(checkpoints):
    """A model whose forward takes no position_ids cannot be left-padded safely: act_batch asks act() per row."""
    agent = TextLLMAgent(checkpoints["llama"], max_new_tokens=4, stop_strings=None, stop_when_parsed=False)
    agent._takes_positions = False
    split = synthetic_split(4, seed=11)
    observations = [split.observation(i) for i in range(3)]
    alone = []
    for o in observations:
        agent.act(o)
        alone.append(agent.last_text)
    agent.act_batch(observations)
    assert agent.last_texts == alone and len(agent.last_compute_batch()) == 3


def test_a_parsable_answer_drives_and_gibberish_brakes(checkpoints, monkeypatch):
    agent = TextLLMAgent(checkpoints["llama"], max_new_tokens=3)
    obs = synthetic_split(2, seed=1).observation(0)
    monkeypatch.setattr(agent.tokenizer, "decode", lambda ids, **kw: "nonsense")
    assert agent.act(obs) == BRAKE and agent.parse_failures == 1
    answer = text.action_answer(Control(0.4, 0.0, -0.1), "cruising")
    monkeypatch.setattr(agent.tokenizer, "decode", lambda ids, **kw: answer)
    assert agent.act(obs) == Control(0.4, 0.0, -0.1) and agent.parse_failures == 1
    assert agent.last_compute()["tokens_out"] == 1  # stopped as soon as the action parsed


# -- pruning -------------------------------------------------------------------------------------------------------
def _decoder_sparsity(model) -> float:
    weights = [lin.weight for block in decoder_layers(model) for lin in find_linears(block).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("arch", ARCHS)
def test_generic_decoder_blocks(checkpoints, arch):
    model, tokenizer = load_causal_lm(checkpoints[arch])
    blocks = decoder_layers(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == LAYERS
    assert all(find_linears(block) for block in blocks)
    calib = scene_text_calibration(tokenizer, synthetic_split(4, seed=0), n_samples=2)
    assert calib[0]["input_ids"].shape == calib[0]["attention_mask"].shape
    obs = synthetic_split(4, seed=0)
    assert any(c["input_ids"][0, :len(p)].tolist() == p for c in calib
               for p in [prompt_ids(tokenizer, obs.observation(i)) for i in range(4)])


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_directory_to_exact_sparsity_and_reload(checkpoints, tmp_path, arch):
    for method in ("magnitude", "wanda", "sparsegpt", "owl"):
        out = tmp_path / method
        record = prune_model_dir(checkpoints[arch], method, 0.5, out, n_calibration=4, progress=False)
        model, _ = load_causal_lm(out)  # written compressed (#26): our loader decompresses it
        sparsity = _decoder_sparsity(model)
        saved = json.loads((out / "sparsity.json").read_text())
        assert saved["method"] == method and saved["format"] == "hf-causal-lm"
        assert saved["lm_global"] == pytest.approx(sparsity)
        if method == "owl":  # non-uniform per block, mean 0.5 up to per-row rounding
            assert len(saved["layer_sparsities"]) == LAYERS and np.mean(saved["layer_sparsities"]) == pytest.approx(0.5)
            assert sparsity == pytest.approx(0.5, abs=0.01)
        else:
            assert sparsity == 0.5, method
        if method != "magnitude":
            assert saved["calibration"].startswith("driving") and "scene-text v1" in saved["calibration"]
        assert record["lm_global"] == saved["lm_global"]
    agent = TextLLMAgent(out, max_new_tokens=2)  # the pruned directory drives, with fewer effective FLOPs
    agent.act(synthetic_split(2, seed=0).observation(0))
    assert agent.last_compute()["effective_flops"] < agent.last_compute()["dense_flops"]
    assert agent.nonzero_params < agent.params


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dg2pf_on_a_hf_directory(checkpoints, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dg2pf"
    record = prune_model_dir(checkpoints[arch], "dg2pf", 0.5, out, n_calibration=8, progress=False,
                             sparsity_epochs=1, max_epochs=1, finetune_max_epochs=1, save_dense=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, use_safetensors=True)  # --save-dense
    assert _decoder_sparsity(model) == pytest.approx(0.5, abs=1e-6) and record["method"] == "dg2pf"
    assert "scene-text sequences" in record["calibration"]
    with pytest.raises(ValueError, match="unknown settings"):
        prune_model_dir(checkpoints[arch], "dg2pf", 0.5, tmp_path / "x", progress=False, nope=1)
    with pytest.raises(ValueError, match="scope"):
        prune_model_dir(checkpoints[arch], "wanda", 0.5, tmp_path / "a", scope="all", progress=False)


def test_conv1d_is_pruned_like_the_equivalent_linear():
    """GPT-2's Conv1D stores W transposed: every method must give the transposed result of nn.Linear."""
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs, weight [16, 24]
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(40, 16)
    for method in ("magnitude", "wanda", "sparsegpt"):
        c = Conv1D(24, 16)
        c.weight.data.copy_(conv.weight)
        lin = nn.Linear(16, 24)
        lin.weight.data.copy_(conv.weight.T)
        lin.bias.data.copy_(c.bias)
        assert torch.allclose(c(x), lin(x), atol=1e-5)
        if method == "magnitude":
            prune(nn.ModuleDict({"c": c, "l": lin}), "magnitude", 0.5)
        else:
            stat, prune_linear = {"wanda": (ColumnNorms, wanda_prune_linear),
                                  "sparsegpt": (Hessian, sparsegpt_prune_linear)}[method]
            for layer in (c, lin):
                s = stat(layer)
                s.add(x)
                prune_linear(layer, s, 0.5)
        assert torch.equal(weight_matrix(c), lin.weight), method
        assert float((c.weight == 0).float().mean()) == 0.5


def test_bench_runs_the_comparison_on_a_users_hf_model(checkpoints, tiny_suite, tmp_path, capsys):
    from prunedrive.app.cli import main

    suite = tiny_suite.parent / "one.yaml"
    suite.write_text(tiny_suite.read_text().replace("seeds: [1, 2, 3]", "seeds: [1]").replace("duration_s: 12",
                                                                                             "duration_s: 2"))
    model = tmp_path / "mine"
    shutil.copytree(checkpoints["llama"], model)
    assert main(["bench", "--model", str(model), "--suite", str(suite), "--methods", "magnitude", "--sparsities",
                 "0.5", "--out", str(tmp_path / "results"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "llm-magnitude-0.5" in out and "llm-dense" in out and "(yours)" in out
    manifest = json.loads((tmp_path / "results" / "bench-tiny-mine" / "manifest.json").read_text())
    assert {s["name"] for s in manifest["config"]["specs"]} == {"expert", "text-llm"}


@pytest.mark.parametrize("source", ["generic", "random"])
def test_hf_calibration_sources_are_what_they_say(source):
    """Wrong variant: a HF model calibrated on driving scene text when generic (or random) is asked for. Generic
    samples are windows of the tokenized pydoc prose, random ones are not; both keep the driving token counts."""
    from prunedrive.app.prune_hf import hf_calibration_set
    from prunedrive.models.pruning import generic_corpus

    tokenizer = _tokenizer(chat=False)
    driving, _ = hf_calibration_set(tokenizer, "driving", 4, None, 0)
    samples, text = hf_calibration_set(tokenizer, source, 4, None, 0)
    assert [s["input_ids"].shape[1] for s in samples] == [s["input_ids"].shape[1] for s in driving]
    corpus = " " + " ".join(map(str, tokenizer(generic_corpus()[0], add_special_tokens=False)["input_ids"])) + " "
    bos = tokenizer.bos_token_id

    def in_corpus(s):
        ids = s["input_ids"][0].tolist()
        ids = ids[1:] if bos is not None and ids[0] == bos else ids
        return f" {' '.join(map(str, ids))} " in corpus

    assert all(map(in_corpus, samples)) if source == "generic" else not any(map(in_corpus, samples))
    assert not any(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, driving))
    assert text.startswith(source) and ("pydoc_data.topics" in text) == (source == "generic")
