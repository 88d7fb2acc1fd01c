"""`prunedrive train --format text`: a plain Hugging Face causal LM trained on the scene text of the expert data.

The tiny preset (a few dozen steps on two tiny expert episodes) must give a standard model directory that
AutoModelForCausalLM loads, whose loss fell, that the text agent drives and that prunes to the exact sparsity;
training is bitwise reproducible, also across a kill and resume; `--init DIR` fine-tunes a local GPT-2.
"""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prunedrive.app import train_text as tt
from prunedrive.app.train import ensure_data
from prunedrive.app.zoo import default_model_dir, is_text_model_dir, is_trained
from prunedrive.models import scene_text
from prunedrive.models.data import load_split
from prunedrive.models.hf_causal import answer_ids, prompt_ids
from prunedrive.models.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text-data") / "data"
    ensure_data(directory, TINY, progress=False)
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    torch.set_num_threads(1)
    return tt.train_text("tiny", data_dir=data_dir, out_dir=tmp_path_factory.mktemp("text") / "model",
                         progress=False, threads=1)


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


def _log(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]


def test_a_standard_model_directory_whose_loss_fell(trained, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained, local_files_only=True, use_safetensors=True)
    assert isinstance(model, LlamaForCausalLM)
    lm = TINY.model
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        lm["hidden_size"], lm["num_layers"], lm["num_heads"], lm["intermediate_size"])
    log = _log(trained)
    assert log[-1]["step"] == TINY.text_train.steps and log[-1]["loss"] < 0.8 * log[0]["loss"]

    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["prunedrive_format"] == "text" and summary["format"] == "text" and summary["preset"] == "tiny"
    assert summary["data_dir"] == str(data_dir) and summary["steps"] == TINY.text_train.steps
    assert summary["train_seconds"] > 0 and summary["total_seconds"] >= summary["train_seconds"]
    assert summary["config_hash"] == TINY.text_hash() and summary["init"] is None
    assert is_text_model_dir(trained) and is_trained(trained, "tiny", "text") and not is_trained(trained, "tiny")

    # the tokenizer: byte-level BPE with <s>/</s>/<pad>, no chat template, <s> in front of the plain prompt
    tokenizer = AutoTokenizer.from_pretrained(trained, local_files_only=True)
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert not getattr(tokenizer, "chat_template", None)
    split = load_split(data_dir, "train")
    ids = prompt_ids(tokenizer, split.observation(0))
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == scene_text.action_prompt(split.observation(0))

    # a training sequence is exactly the agent's prompt, then the answer + EOS, the loss on the answer only
    batches = tt.TextBatches(split, tokenizer, seed=0)
    batch = batches.collate([0, 1])
    answer = answer_ids(tokenizer, split.frame["a_action"][0]) + [tokenizer.eos_token_id]
    n = len(ids) + len(answer)
    assert batch["input_ids"][0, :n].tolist() == ids + answer
    assert batch["labels"][0, :n].tolist() == [-100] * len(ids) + answer
    assert (batch["labels"][0, n:] == -100).all() and (batch["attention_mask"][0, n:] == 0).all()


def test_zoo_names():
    assert default_model_dir("tiny", "text").name == f"text-tiny-{TINY.text_hash()}"
    assert default_model_dir("tiny").name == default_model_dir("tiny", "vector").name == f"tiny-{TINY.hash()}"
    assert TINY.text_hash() != TINY.hash()
    with pytest.raises(ValueError, match="unknown model format"):
        default_model_dir("tiny", "onnx")


def test_drives_a_smoke_episode(trained):
    from prunedrive.agents.registry import make_agent
    from prunedrive.harness.env import DriveEnv
    from prunedrive.harness.episode import run_episode
    from prunedrive.scenarios.loader import load_suite

    scenario = load_suite("smoke").scenarios[0]
    env = DriveEnv(scenario)
    try:
        agent = make_agent("text-llm", model=trained, max_new_tokens=8)
        outcome, steps = run_episode(env, agent, scenario, scenario.seeds[0], max_steps=5)
    finally:
        env.close()
    assert 1 <= len(steps) <= 5 and agent.steps == len(steps)
    assert np.all(steps["tokens_in"] > 0) and np.all(steps["dense_flops"] > 0)


def test_prunes_to_the_exact_sparsity_and_reloads(trained, data_dir, tmp_path):
    from prunedrive.agents.text_llm import TextLLMAgent
    from prunedrive.app.prune import prune_model_dir
    from prunedrive.models.hf_causal import load_causal_lm
    from prunedrive.models.pruning.masks import decoder_layers, find_linears

    out = tmp_path / "wanda"
    record = prune_model_dir(trained, "wanda", 0.5, out, n_calibration=4, data_dir=data_dir, progress=False)
    model, _ = load_causal_lm(out)  # written compressed: plain from_pretrained cannot decompress it (README)
    weights = [lin.weight for block in decoder_layers(model) for lin in find_linears(block).values()]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) == 0.5
    assert record["lm_global"] == 0.5 and str(data_dir) in record["calibration"]
    agent = TextLLMAgent(out, max_new_tokens=2)
    agent.act(load_split(data_dir, "val").observation(0))
    assert agent.nonzero_params < agent.params


def test_same_seed_same_weights_also_through_the_cli_and_a_resume(trained, data_dir, tmp_path, monkeypatch):
    from prunedrive.app.cli import main

    reference = _weights(trained)
    out = tmp_path / "cli"
    assert main(["train", "--preset", "tiny", "--format", "text", "--model-out", str(out), "--data", str(data_dir),
                 "--threads", "1"]) == 0
    again = _weights(out)
    assert reference.keys() == again.keys() and all(torch.equal(reference[k], again[k]) for k in reference)

    # killed after step 25 (the last checkpoint is step 20), then resumed: the same weights bitwise
    killed = tmp_path / "killed"
    real, calls = tt.text_loss, []

    def dies(model, batch):
        calls.append(1)
        if len(calls) > 25:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(tt, "text_loss", dies)
    with pytest.raises(KeyboardInterrupt):
        tt.train_text("tiny", data_dir=data_dir, out_dir=killed, progress=False, threads=1)
    assert not (killed / "train_summary.json").exists()
    assert (killed / "checkpoint" / "latest").read_text().strip() == "step-0000020"
    monkeypatch.setattr(tt, "text_loss", real)
    tt.train_text("tiny", data_dir=data_dir, out_dir=killed, progress=False, threads=1)
    resumed = _weights(killed)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert [r["step"] for r in _log(killed)] == [r["step"] for r in _log(trained)]


def test_init_fine_tunes_a_local_gpt2(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    split = load_split(data_dir, "train")
    tokenizer = tt.train_tokenizer(tt.tokenizer_corpus(split), 400)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=1024,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    init = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(init)
    tokenizer.save_pretrained(init)
    before = _weights(init)

    with pytest.raises(ValueError, match="--init DIR needs --model-out"):
        tt.train_text("tiny", data_dir=data_dir, init=init, progress=False, threads=1)
    short = replace(TINY, text_train=replace(TINY.text_train, steps=12))  # GPT-2's steps are ~3x the Llama's
    out = tt.train_text(short, data_dir=data_dir, out_dir=tmp_path / "tuned", init=init, progress=False, threads=1)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, use_safetensors=True)
    assert isinstance(model, GPT2LMHeadModel)
    after = _weights(out)
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    log = _log(out)
    assert log[-1]["loss"] < log[0]["loss"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["init"] == str(init.resolve()) and summary["model_type"] == "gpt2"
    assert summary["lr"] == TINY.text_train.finetune_lr
    assert is_text_model_dir(out) and not is_trained(out, "tiny", "text")  # a fine-tune is not the zoo's model


def test_a_chat_template_is_used_as_the_agent_uses_it(data_dir):
    split = load_split(data_dir, "train")
    tokenizer = tt.train_tokenizer(tt.tokenizer_corpus(split), 400)
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    batches = tt.TextBatches(split, tokenizer, seed=0)
    assert batches.prompts[1] == prompt_ids(tokenizer, split.observation(1))
    assert tokenizer.decode(batches.prompts[1]).startswith("<s>user: " + scene_text.SYSTEM_TEXT)


def test_format_options_are_checked(tmp_path):
    from prunedrive.app.cli import main

    assert main(["train", "--preset", "tiny", "--init", str(tmp_path), "--model-out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    assert main(["train", "--preset", "tiny", "--format", "text", "--init", str(tmp_path / "missing"),
                 "--model-out", str(tmp_path / "o")]) == 2


def test_eval_open_on_a_text_model(trained):
    from prunedrive.app.eval_open import cmd_eval_open

    results = cmd_eval_open(trained, max_samples=4)
    for name in ("trained", "random"):
        m = results[name]
        assert m["n"] == 4 and 0 <= m["action_parse_rate"] <= 1
        assert m["lon_control_error"] >= 0 and m["lat_control_error"] >= 0
        assert "vehicle_count_error" not in m and set(m["examples"]) == {"action"}
    assert json.loads((trained / "eval_open.json").read_text())["trained"]["n"] == 4
