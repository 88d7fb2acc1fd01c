"""Model directories are checked once, when an agent is built or a run is planned, never per episode; the
weight files read (and hashed) are the loader's, plain files only; answers that do not parse reach the step
rows, the episode rows, the metric table and the bench table.

Tiny random checkpoints from tests/test_hf_models.py (`checkpoints`), copied and broken one way each.
"""
import hashlib
import json
import os
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from prunedrive.agents.llm import LLMAgent
from prunedrive.agents.registry import AgentSpec
from prunedrive.agents.text_llm import TextLLMAgent
from prunedrive.app.bench import comparison_table, print_comparison
from prunedrive.app.cli import main
from prunedrive.app.run import weights_hash
from prunedrive.app.train import untrained_model
from prunedrive.harness.action import BRAKE, Control
from prunedrive.harness.compute import aggregate, COMPUTE_FIELDS
from prunedrive.harness.episode import run_episode
from prunedrive.harness.rows import episode_row
from prunedrive.harness.summary import summarize
from prunedrive.models import scene_text, text
from prunedrive.models.data import synthetic_split
from prunedrive.models.hf_causal import (MAX_PROMPT_CHARS, NotACausalLM, check_drivable, prompt_ids,
                                         weight_files)
from prunedrive.models.presets import PRESETS
from test_hf_models import checkpoints, smoke_env  # noqa: F401 -- module fixtures: tiny HF checkpoints, an env

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _copy(checkpoints, arch, tmp_path, name="model"):
    out = tmp_path / name
    shutil.copytree(checkpoints[arch], out)
    return out


def _with_template(checkpoints, tmp_path, template: str):
    out = _copy(checkpoints, "qwen2", tmp_path)
    assert (out / "chat_template.jinja").is_file()  # where transformers writes a tokenizer's template
    (out / "chat_template.jinja").write_text(template)
    return out


def _fails_at_build_and_at_plan(model_dir, match: str) -> None:
    """The same error when the agent is built and when a run is planned (AgentSpec.check: Ray workers build
    their agents later, so the parent must find it first)."""
    with pytest.raises(NotACausalLM, match=match):
        TextLLMAgent(model_dir, max_new_tokens=4)
    with pytest.raises(NotACausalLM, match=match):
        AgentSpec("text-llm", str(model_dir), args=(("max_new_tokens", 4),)).check()


# -- 1. a text model that cannot drive is found once, before any episode --------------------------------------------
def test_a_chat_template_that_raises_is_an_error_naming_the_template_file(checkpoints, tmp_path):
    model = _with_template(checkpoints, tmp_path, "{{ raise_exception('no system role here') }}")
    _fails_at_build_and_at_plan(model, r"chat_template\.jinja: the chat template cannot render.*no system role here")


def test_a_chat_template_that_renders_nothing_is_an_error(checkpoints, tmp_path):
    model = _with_template(checkpoints, tmp_path, "{% for m in messages %}{% endfor %}   ")
    _fails_at_build_and_at_plan(model, r"chat_template\.jinja: the chat template renders a scene prompt as empty")


def test_a_huge_chat_template_output_is_refused_quickly_without_allocating_it(checkpoints, tmp_path):
    model = _with_template(checkpoints, tmp_path, "{{ 'x' * 2000000000 }}{{ messages[0]['content'] }}")
    started = time.monotonic()
    _fails_at_build_and_at_plan(model, r"chat_template\.jinja: .*cannot render.*more than 256 MiB")
    assert time.monotonic() - started < 60
    too_long = _with_template(checkpoints, tmp_path / "long", "{{ 'x' * 100000 }}{{ messages[0]['content'] }}")
    _fails_at_build_and_at_plan(too_long, rf"as {100000 + 1800}\d* characters, more than {MAX_PROMPT_CHARS}|"
                                          rf"characters, more than {MAX_PROMPT_CHARS}")


def test_a_slow_chat_template_runs_out_of_time(checkpoints, tmp_path):
    slow = ("{% for i in range(100000) %}{% for j in range(100000) %}{% if i < 0 %}x{% endif %}{% endfor %}"
            "{% endfor %}{{ messages[0]['content'] }}")
    model = _with_template(checkpoints, tmp_path, slow)
    with pytest.raises(NotACausalLM, match=r"chat_template\.jinja: .*took more than 5 s"):
        AgentSpec("text-llm", str(model)).check()


def test_a_model_with_fewer_positions_than_the_prompt_is_an_error_naming_the_numbers(checkpoints, tmp_path):
    model = _copy(checkpoints, "llama", tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    agent = TextLLMAgent(checkpoints["llama"], max_new_tokens=4)
    prompt = len(prompt_ids(agent.tokenizer, scene_text.probe_observation()))
    assert prompt + 4 > 256
    _fails_at_build_and_at_plan(model, rf"config\.json: the longest scene prompt has {prompt} tokens, plus "
                                       rf"max_new_tokens=4 = {prompt + 4}, more than the model's 256 positions "
                                       r"\(max_position_embeddings\)")
    # the boundary: exactly enough positions drives
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": prompt + 4}))
    assert TextLLMAgent(model, max_new_tokens=4).max_positions == prompt + 4
    with pytest.raises(NotACausalLM, match="max_new_tokens=5"):
        TextLLMAgent(model, max_new_tokens=5)


def test_the_probe_scene_is_at_least_as_long_as_real_scenes(checkpoints):
    tokenizer = TextLLMAgent(checkpoints["qwen2"], max_new_tokens=2).tokenizer
    split = synthetic_split(64, seed=4)
    longest = max(len(prompt_ids(tokenizer, split.observation(i))) for i in range(len(split)))
    assert check_drivable(checkpoints["qwen2"], tokenizer, _config(checkpoints["qwen2"]), 2) >= longest


def _config(directory):
    from prunedrive.models.hf_causal import load_config

    return load_config(directory)


def test_a_run_with_an_undrivable_model_exits_2_before_any_episode(checkpoints, tiny_suite, tmp_path, capsys):
    model = _with_template(checkpoints, tmp_path, "{{ raise_exception('broken') }}")
    out = tmp_path / "runs"
    code = main(["run", "--suite", str(tiny_suite), "--agent", "text-llm", "--model", str(model), "--out", str(out),
                 "--run-id", "r"])
    assert code == 2 and "chat_template.jinja" in capsys.readouterr().err
    assert not list(out.rglob("*.parquet"))  # nothing was driven


# -- 2. the weight files read and hashed are the loader's, plain files only ------------------------------------------
def _within(seconds: float, call):
    """call()'s result, or a test failure when it does not return in time (a read of /dev/zero never does)."""
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("value", _capture(call)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert "value" in result, f"did not return within {seconds} s"
    value = result["value"]
    if isinstance(value, BaseException):
        raise value
    return value


def _capture(call):
    try:
        return call()
    except BaseException as exc:  # noqa: BLE001 -- re-raised in the test's thread
        return exc


def test_an_extra_safetensors_link_to_dev_zero_is_not_read(checkpoints, tmp_path):
    model = _copy(checkpoints, "llama", tmp_path)
    clean = weights_hash(model)
    os.symlink("/dev/zero", model / "extra.safetensors")
    assert _within(30, lambda: weights_hash(model)) == clean
    assert weight_files(model) == [model / "model.safetensors"]


def test_the_hash_is_what_it_was_for_a_single_weights_file(checkpoints, tmp_path):
    model = _copy(checkpoints, "gpt2", tmp_path)
    digest = hashlib.sha256(b"model.safetensors" + (model / "model.safetensors").read_bytes())
    assert weights_hash(model) == digest.hexdigest()[:16]  # resume identities of earlier runs still match


def test_weight_files_must_be_regular_files_inside_the_directory(checkpoints, tmp_path):
    model = _copy(checkpoints, "llama", tmp_path)
    weights = model / "model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    weights.rename(outside)
    os.symlink("/dev/zero", weights)
    with pytest.raises(NotACausalLM, match=r"model\.safetensors is a symlink to /dev/zero, outside the model"):
        _within(30, lambda: weights_hash(model))
    weights.unlink()
    os.symlink(outside, weights)
    with pytest.raises(NotACausalLM, match=r"model\.safetensors is a symlink to .*elsewhere\.safetensors, outside"):
        weights_hash(model)
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(NotACausalLM, match=r"model\.safetensors is a FIFO, not a regular file"):
        _within(30, lambda: weights_hash(model))
    with pytest.raises(NotACausalLM, match=r"model\.safetensors is a FIFO"):
        AgentSpec("text-llm", str(model)).check()
    weights.unlink()
    shutil.copy(outside, model / "inner.bin")
    os.symlink("inner.bin", weights)  # a link inside the directory is fine
    assert weights_hash(model) == weights_hash(_copy(checkpoints, "llama", tmp_path, "again"))


def test_a_sharded_directory_hashes_the_shards_its_index_lists_and_nothing_else(checkpoints, tmp_path):
    model = _copy(checkpoints, "llama", tmp_path)
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    os.symlink("/dev/zero", model / "model-00002-of-00002.safetensors")  # not in the index
    assert _within(30, lambda: weight_files(model)) == [model / "model-00001-of-00001.safetensors"]
    _within(30, lambda: weights_hash(model))
    for bad in ("../elsewhere.safetensors", "sub/model.safetensors"):
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": bad}}))
        with pytest.raises(NotACausalLM, match=r"weight_map names .*not a file name in the model directory"):
            weights_hash(model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(NotACausalLM, match=r"gone\.safetensors is missing \(listed in model\.safetensors\.index"):
        weights_hash(model)


# -- 3. parse failures reach every table ------------------------------------------------------------------------------
def _nan_weights(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))


def _episode(agent, smoke_env, steps=4) -> dict:
    scenario, env = smoke_env
    outcome, frame = run_episode(env, agent, scenario, scenario.seeds[0], max_steps=steps)
    return episode_row(outcome, frame, run_id="r", agent=agent.name, scenario=scenario, seed=scenario.seeds[0],
                       wall_s=1.0), frame


def test_nan_weights_fail_every_parse_and_every_table_says_so(checkpoints, smoke_env, monkeypatch):
    from prunedrive.agents.expert import ExpertAgent

    broken = TextLLMAgent(checkpoints["llama"], max_new_tokens=2, name="nan-model")
    _nan_weights(broken.model)
    broken_row, broken_steps = _episode(broken, smoke_env)
    assert (broken_steps["parse_failed"] == 1.0).all() and len(broken_steps) == 4
    assert broken_row["parse_failures"] == broken_row["steps"] == broken_row["model_decisions"] == 4

    fine = TextLLMAgent(checkpoints["llama"], max_new_tokens=2, name="parsing-model")
    answer = text.action_answer(Control(0.3, 0.0, 0.0), "cruising")
    monkeypatch.setattr(fine.tokenizer, "decode", lambda ids, **kw: answer)
    fine_row, fine_steps = _episode(fine, smoke_env)
    assert (fine_steps["parse_failed"] == 0.0).all() and fine_row["parse_failures"] == 0

    expert_row, expert_steps = _episode(ExpertAgent(), smoke_env)
    assert expert_steps["parse_failed"].isna().all() and np.isnan(expert_row["parse_failures"])

    episodes = pd.DataFrame([broken_row, fine_row, expert_row])
    table = summarize(episodes, ["agent"]).set_index("agent")
    assert table.loc["nan-model", "parse_failure_rate"] == 1.0
    assert table.loc["parsing-model", "parse_failure_rate"] == 0.0
    assert np.isnan(table.loc["expert", "parse_failure_rate"])  # no model: nothing to parse, not "never failed"

    bench = comparison_table(episodes, {}, {}).set_index("agent")
    assert bench.loc["nan-model", "parse_failure_rate"] == 1.0 and bench.loc["parsing-model", "parse_failure_rate"] == 0
    assert np.isnan(bench.loc["expert", "parse_failure_rate"])
    import io

    from rich.console import Console

    out = io.StringIO()
    print_comparison(bench.reset_index(), console=Console(file=out, width=100))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 100 and "…" not in out.getvalue()
    assert next(line for line in lines if line.startswith("nan-model")).split()[-1] == "1.00"
    assert next(line for line in lines if line.startswith("parsing-model")).split()[-1] == "0.00"
    assert next(line for line in lines if line.startswith("expert")).split()[-1] == "–"


def test_the_parse_rate_is_failures_over_decisions_not_a_mean_of_episode_rates():
    rows = pd.DataFrame({"agent": ["a", "a"], "parse_failures": [1.0, 0.0], "model_decisions": [1.0, 99.0]})
    from prunedrive.harness.metrics import aggregate_metric, metric

    rate = metric("parse_failure_rate")
    assert aggregate_metric(rate, rows)[rate.column] == pytest.approx(1 / 100)  # not mean(1, 0) = 0.5
    assert np.isnan(aggregate_metric(rate, rows.assign(model_decisions=np.nan))[rate.column])
    columns = {name: np.array([np.nan, 1.0, 0.0, 1.0]) if name == "parse_failed" else np.array([])
               for name in COMPUTE_FIELDS}
    counts = aggregate(columns)
    assert counts["parse_failures"] == 2 and counts["model_decisions"] == 3


def test_batched_decisions_report_their_own_parse_failures(checkpoints):
    agent = TextLLMAgent(checkpoints["llama"], max_new_tokens=2)
    observations = [synthetic_split(3, seed=2).observation(i) for i in range(3)]
    answers = iter(["nonsense", text.action_answer(Control(0.2, 0.0, 0.0), "ok"), "nonsense"] * 2)
    agent.tokenizer.decode = lambda ids, **kw: next(answers)
    controls = agent.act_batch(observations)
    assert controls[0] == BRAKE and controls[2] == BRAKE
    assert [r["parse_failed"] for r in agent.last_compute_batch()] == [1.0, 0.0, 1.0]


def test_the_vector_llm_reports_parse_failures_per_decision_and_per_batch_row():
    split = synthetic_split(4, seed=1)
    agent = LLMAgent(untrained_model(PRESETS["tiny"], split), max_new_tokens=3)
    _nan_weights(agent.model)
    agent.act(split.observation(0))
    assert agent.last_compute()["parse_failed"] == 1.0 and agent.parse_failures == 1
    agent.act_batch([split.observation(i) for i in range(3)])
    assert [r["parse_failed"] for r in agent.last_compute_batch()] == [1.0, 1.0, 1.0]
    assert agent.parse_failures == agent.steps == 4
