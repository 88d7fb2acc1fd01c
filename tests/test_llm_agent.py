import numpy as np
import pytest
import torch

from prunedrive.harness.agent import Agent, compute_report
from prunedrive.agents.llm import LLMAgent
from prunedrive.harness.action import BRAKE, Control
from prunedrive.harness.compute import COMPUTE_FIELDS, StepCompute
from prunedrive.models import text
from prunedrive.models.driving_llm import DrivingLLM
from prunedrive.models.presets import PRESETS
from prunedrive.app.train import untrained_model
from prunedrive.scenarios.loader import Scenario
from prunedrive.models.data import synthetic_split


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split():
    return synthetic_split(8, seed=1)


def untrained(split) -> DrivingLLM:
    return untrained_model(PRESETS["tiny"], split)


def test_untrained_model_gives_a_control_and_counts_the_fallback(split):
    agent = LLMAgent(untrained(split), max_new_tokens=6)
    assert isinstance(agent, Agent)
    agent.reset(Scenario(name="s", kind="highway_cruise"))
    control = agent.act(split.observation(0))
    assert isinstance(control, Control)
    if text.parse_action(agent.last_text) is None:
        assert control == BRAKE and agent.parse_failures == 1
    report = compute_report(agent)
    assert set(report) <= set(COMPUTE_FIELDS) and set(report) == set(COMPUTE_FIELDS) - {
        "agent_wall_s", "agent_cpu_s", "sim_wall_s", "device_time_s", "device_peak_mem_bytes"}  # those: CUDA only
    StepCompute(**report)
    assert report["tokens_out"] <= 6 and report["tokens_in"] > agent.model.prefix_tokens
    # Dense up to the zero <pad> row of the tied embedding / lm_head.
    assert 0.99 * report["dense_flops"] < report["effective_flops"] <= report["dense_flops"]
    assert 0.99 * report["params"] < report["nonzero_params"] <= report["params"] and report["peak_mem_bytes"] > 0


def test_a_parsable_answer_drives(split, monkeypatch):
    agent = LLMAgent(untrained(split))
    answer = text.action_answer(Control(0.4, 0.0, -0.1), "cruising")
    monkeypatch.setattr(agent.model.tokenizer, "decode", lambda ids: answer)
    control = agent.act(split.observation(1))
    assert control == Control(0.4, 0.0, -0.1) and agent.parse_failures == 0


def test_effective_flops_count_nonzero_weights(split):
    model = untrained(split)
    agent = LLMAgent(model, max_new_tokens=4)
    agent.act(split.observation(2))
    dense = agent.last_compute()
    with torch.no_grad():
        for layer in model.lm.model.layers:
            layer.mlp.down_proj.weight[:, ::2] = 0.0
    agent.reset(Scenario(name="s", kind="highway_cruise"))  # re-reads the non-zeros
    agent.act(split.observation(2))
    pruned = agent.last_compute()
    assert pruned["dense_flops"] == dense["dense_flops"] and pruned["effective_flops"] < dense["effective_flops"]
    assert pruned["nonzero_params"] < dense["nonzero_params"]


def test_agent_loads_from_a_directory_and_survives_an_episode(split, tmp_path):
    from prunedrive.harness.env import DriveEnv

    untrained(split).save_pretrained(tmp_path / "m")
    agent = LLMAgent(str(tmp_path / "m"), name="llm-test", max_new_tokens=4)
    assert agent.name == "llm-test"
    scenario = Scenario(name="s", kind="highway_cruise", vehicles=3, duration_s=1.0)
    env = DriveEnv(scenario)
    obs, _ = env.reset(seed=100_000)
    agent.reset(scenario)
    for _ in range(3):
        obs, _, terminated, truncated, _ = env.step(agent.act(obs))
        if terminated or truncated:
            break
    env.close()
    assert agent.steps >= 1 and 0 <= agent.parse_failures <= agent.steps
    assert np.isfinite(agent.last_compute()["dense_flops"])
