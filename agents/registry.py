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

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prunedrive.harness.agent import Agent
from prunedrive.harness.backends.base import SimulatorError
from prunedrive.harness.limits import exits_raise
from prunedrive.plugins.registry import Registry, RegistryError, load_reference
from prunedrive.scenarios.loader import SAFE_NAME

BUILTIN_AGENTS = {
    "expert": "prunedrive.agents.expert:ExpertAgent",
    "constant": "prunedrive.agents.baselines:ConstantAgent",
    "random": "prunedrive.agents.baselines:RandomAgent",
    "llm": "prunedrive.agents.llm:make_llm_agent",
    "text-llm": "prunedrive.agents.text_llm:make_text_llm_agent",  # any local HF causal LM directory
}
MODEL_AGENTS = frozenset({"llm", "text-llm"})  # built-ins that need --model


class AgentError(RegistryError):
    """An agent that cannot be built as asked (exit code 2); a RegistryError, so one error type covers names."""


def _callable_factory(name: str, factory: object) -> Callable[..., Agent]:
    if not callable(factory):
        raise AgentError(f"--agent {name}: {factory!r} is not callable (an agent factory is)")
    return factory


AGENTS: Registry[Callable[..., Agent]] = Registry("agent", "prunedrive.agents", BUILTIN_AGENTS,
                                                  check=_callable_factory)


def agent_names() -> list[str]:
    """Every name `--agent` takes besides `package.module:factory`."""
    return AGENTS.names()


def resolve_factory(name: str) -> Callable[..., Agent]:
    """The factory behind an agent name: registered (built-in or plug-in) or a `package.module:factory`
    reference (imported now). Whatever goes wrong is an AgentError naming the agent."""
    try:
        if name in AGENTS:
            return AGENTS.get(name)
        if ":" in name:
            return _callable_factory(name, load_reference(name, f"--agent {name}"))
    except AgentError:
        raise
    except RegistryError as exc:
        raise AgentError(str(exc)) from None
    raise AgentError(f"unknown agent {name!r}; allowed: {AGENTS.choices()}, or package.module:factory")


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


def check_agent_name(name: object, agent: str) -> str:
    """An agent's name keys its rows and names its result files: the rule of scenario names."""
    if isinstance(name, str) and SAFE_NAME.fullmatch(name):
        return name
    text = repr(name)
    shown = text if len(text) <= 60 else f"{text[:40]}... ({len(str(name))} characters)"
    raise AgentError(f"--agent {agent}: its name is {shown}; an agent name is 1-128 letters, digits and _.=+- "
                     "(it names result files and rows)")


def check_factory_keywords(agent: str, factory: Callable, keywords: dict[str, Any]) -> None:
    """The keywords a factory will be called with (--agent-arg, and `model` with --model) against its
    signature: an unknown or missing one is a message now, naming what it accepts, not a TypeError later."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a callable without a signature (C code): its call will say
        return
    parameters = signature.parameters.values()
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        unknown = [key for key in keywords if key not in accepted]
        if unknown:
            given = "--model" if unknown[0] == "model" else f"--agent-arg {unknown[0]}"
            raise AgentError(f"--agent {agent}: its factory takes no keyword {unknown[0]!r} ({given}); it accepts: "
                             + (", ".join(accepted) or "no keywords"))
    try:
        signature.bind(**keywords)
    except TypeError as exc:
        raise AgentError(f"--agent {agent}: its factory cannot be called with "
                         f"{', '.join(keywords) or 'no keywords'}: {exc} (give it with --agent-arg KEY=VALUE; it "
                         f"accepts: {', '.join(accepted) or 'no keywords'})") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit) and type(exc) is SystemExit:
        return f"SystemExit: it called sys.exit({exc.code!r})"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
        factory = resolve_factory(self.name)
        if self.name in MODEL_AGENTS and self.model is None:
            raise AgentError(f"agent {self.name!r} needs --model DIR (a directory written by `prunedrive train` "
                             "or `prune`)")
        if self.model is not None and not Path(self.model).is_dir():
            raise FileNotFoundError(f"--model {self.model}: no such model directory")
        check_factory_keywords(self.name, factory, self.keywords())
        if self.label is not None:
            check_agent_name(self.label, self.name)
        check_model = getattr(factory, "check_model", None)  # e.g. text-llm: can the directory drive at all?
        if self.model is not None and callable(check_model):
            check_model(self.model, **dict(self.args))

    def keywords(self) -> dict[str, Any]:
        """What the factory is called with."""
        kwargs = dict(self.args)
        if self.model is not None:
            kwargs["model"] = self.model
        return kwargs

    def __call__(self) -> Agent:
        factory = resolve_factory(self.name)
        try:
            with exits_raise(f"the factory of agent {self.name}"):
                agent = factory(**self.keywords())
        except (KeyboardInterrupt, SimulatorError, MemoryError, AgentError):
            raise  # Ctrl-C, and infrastructure (simulator, memory) failures, are not the agent's
        except BaseException as exc:  # noqa: BLE001 -- its sys.exit and os._exit too: a message, not an exit
            raise AgentError(f"cannot build agent {self.name}: {_describe(exc)}") from exc
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
