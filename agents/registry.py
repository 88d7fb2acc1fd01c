"""Agents by name, for the CLI and the runner."""
from __future__ import annotations

from pathlib import Path

from agents.base import Agent

AGENTS = ("expert", "constant", "random", "llm")


def make_agent(name: str, model: str | Path | None = None, label: str | None = None) -> Agent:
    if name == "expert":
        from agents.expert import ExpertAgent

        return ExpertAgent()
    if name == "constant":
        from agents.baselines import ConstantAgent

        return ConstantAgent()
    if name == "random":
        from agents.baselines import RandomAgent

        return RandomAgent()
    if name == "llm":
        if model is None:
            raise ValueError("agent 'llm' needs --model DIR (a directory written by `prunedrive train` or `prune`)")
        from agents.llm import LLMAgent

        # Named after the model directory, so a dense model and its pruned variants stay apart.
        return LLMAgent(model, name=label or f"llm-{Path(model).name}")
    raise ValueError(f"unknown agent {name!r}; allowed: {', '.join(AGENTS)}")
