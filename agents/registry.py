"""Agents by name: built-ins, plug-ins, and `package.module:factory` references.

    prunedrive run --agent expert
    prunedrive run --agent llm --model DIR
    prunedrive run --agent my_pkg.drivers:make --agent-arg speed=20      # any importable factory
    prunedrive run --agent mydriver                                      # an installed plug-in

A plug-in package registers its factory under the entry point group `prunedrive.agents`:

    [project.entry-points."prunedrive.agents"]
    mydriver = "my_pkg.drivers:make"

A factory is called as `factory(**args)` (plus `model=DIR` when --model is given) and returns an object
with `name`, `reset(scenario)` and `act(observation) -> Control` (prunedrive.harness.agent.Agent).
`AgentSpec` is what the harness receives: a picklable zero-argument factory, so Ray workers build
their own agents.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module, metadata
from pathlib import Path
from typing import Any, Callable

from prunedrive.harness.agent import Agent

ENTRY_POINT_GROUP = "prunedrive.agents"
BUILTIN_AGENTS = {
    "expert": "prunedrive.agents.expert:ExpertAgent",
    "constant": "prunedrive.agents.baselines:ConstantAgent",
    "random": "prunedrive.agents.baselines:RandomAgent",
    "llm": "prunedrive.agents.llm:make_llm_agent",
    "text-llm": "prunedrive.agents.text_llm:make_text_llm_agent",  # any local HF causal LM directory
}
MODEL_AGENTS = frozenset({"llm", "text-llm"})  # built-ins that need --model


class AgentError(ValueError):
    """An agent that cannot be built as asked (exit code 2)."""


def plugin_agents() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def agent_names() -> list[str]:
    """Every name `--agent` takes besides `package.module:factory`."""
    return [*BUILTIN_AGENTS, *sorted(set(plugin_agents()) - set(BUILTIN_AGENTS))]


def resolve_factory(name: str) -> Callable[..., Agent]:
    """The factory behind an agent name (imported now)."""
    if name in BUILTIN_AGENTS:
        reference = BUILTIN_AGENTS[name]
    elif name in plugin_agents():
        return plugin_agents()[name].load()
    elif ":" in name:
        reference = name
    else:
        raise AgentError(f"unknown agent {name!r}; allowed: {', '.join(agent_names())}, or package.module:factory")
    module_name, _, attribute = reference.partition(":")
    try:
        module = import_module(module_name)
    except ImportError as exc:
        raise AgentError(f"--agent {name}: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise AgentError(f"--agent {name}: {module_name} has no callable {attribute!r}")
    return factory


def parse_agent_args(pairs: list[str] | None) -> dict[str, Any]:
    """--agent-arg KEY=VALUE pairs; values are YAML scalars (numbers, true/false, text)."""
    import yaml

    args: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise AgentError(f"--agent-arg {pair!r}: expected KEY=VALUE with KEY a Python identifier")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        args[key] = parsed if isinstance(parsed, (str, int, float, bool)) or parsed is None else value
    return args


@dataclass(frozen=True)
class AgentSpec:
    """How to build one agent, anywhere: a name (built-in, plug-in or package.module:factory), an optional
    model directory, an optional label (the agent's name in results) and keyword arguments. Calling it
    builds the agent. Picklable."""

    name: str
    model: str | None = None
    label: str | None = None
    args: tuple[tuple[str, Any], ...] = field(default=())

    def check(self) -> None:
        """Cheap checks before anything is driven, so a bad option is a message, not a worker traceback."""
        resolve_factory(self.name)
        if self.name in MODEL_AGENTS and self.model is None:
            raise AgentError(f"agent {self.name!r} needs --model DIR (a directory written by `prunedrive train` "
                             "or `prune`)")
        if self.model is not None and not Path(self.model).is_dir():
            raise FileNotFoundError(f"--model {self.model}: no such model directory")

    def __call__(self) -> Agent:
        kwargs = dict(self.args)
        if self.model is not None:
            kwargs["model"] = self.model
        agent = resolve_factory(self.name)(**kwargs)
        if self.label:
            agent.name = self.label
        for attribute in ("name", "reset", "act"):
            if not hasattr(agent, attribute):
                raise AgentError(f"--agent {self.name}: the factory returned {type(agent).__name__}, which has no "
                                 f"{attribute!r} (see prunedrive.harness.agent.Agent)")
        return agent


def make_agent(name: str, model: str | Path | None = None, label: str | None = None, **args) -> Agent:
    spec = AgentSpec(name, str(model) if model is not None else None, label, tuple(sorted(args.items())))
    spec.check()
    return spec()
