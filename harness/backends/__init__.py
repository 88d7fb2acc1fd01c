"""Simulator backends by name (`BACKENDS`), and which backend drives a scenario.

A backend is a class `Backend(scenario, render=False, **connection)` implementing `base.Backend`; it declares
its scenario kinds (`KINDS`), the keys of a scenario's `options:` it accepts (`OPTIONS`) and, when it drives a
simulator server, its command-line flags (`SERVER`). A plug-in registers it in its package metadata:

    [project.entry-points."prunedrive.backends"]
    mysim = "mysim_prunedrive:MySimBackend"

and its kinds are then written in suites like the built-in ones (`kind: my_kind`). A kind that a built-in
backend declares stays the built-in's.

The scenario loader (the bottom layer) checks only a suite's structure; `check_suite` answers, before any
episode, whether a backend drives each kind and accepts each option.
"""
from __future__ import annotations

from typing import Any

from prunedrive.harness.backends.base import ServerOptions
from prunedrive.plugins.registry import Registry, RegistryError
from prunedrive.scenarios.loader import Scenario, ScenarioError, Suite


def _check_backend(name: str, backend: Any) -> Any:
    """A loaded backend must declare its kinds and options: the suite checks read them."""
    for attribute in ("KINDS", "OPTIONS"):
        declared = getattr(backend, attribute, None)
        if not isinstance(declared, tuple) or not all(isinstance(item, str) for item in declared):
            raise RegistryError(f"simulator backend {name!r}: {getattr(backend, '__name__', backend)!r} must declare "
                                f"{attribute} as a tuple of names (see prunedrive.harness.backends.base.Backend)")
    server = getattr(backend, "SERVER", None)
    if server is not None and not isinstance(server, ServerOptions):
        raise RegistryError(f"simulator backend {name!r}: SERVER must be a ServerOptions or None")
    return backend


BACKENDS: Registry[type] = Registry("simulator backend", "prunedrive.backends", {
    "highway": "prunedrive.harness.backends.highway:HighwayBackend",
    "carla": "prunedrive.harness.backends.carla:CarlaBackend",
}, check=_check_backend)


def backend_names() -> list[str]:
    return BACKENDS.names()


def backend_class(name: str) -> type:
    """The backend class registered under `name` (imported only now: CARLA's client is optional)."""
    return BACKENDS.get(name)


def _loadable() -> tuple[list[tuple[str, type]], list[str]]:
    """The backends that load, in registry order, and what is wrong with each plug-in that does not (a broken
    plug-in must not hide the kinds of the others)."""
    loaded, broken = [], []
    for name in BACKENDS.names():
        try:
            loaded.append((name, backend_class(name)))
        except RegistryError as exc:
            broken.append(str(exc))
    return loaded, broken


def kind_table() -> dict[str, str]:
    """Every scenario kind -> the backend that drives it: the built-ins' kinds first, then the plug-ins' (in name
    order); a kind declared twice stays with the first backend that declares it."""
    table: dict[str, str] = {}
    for name, backend in _loadable()[0]:
        for kind in backend.KINDS:
            table.setdefault(kind, name)
    return table


def _driver_of(kind: object) -> str | None:
    for name in BACKENDS.names():  # in order: a built-in kind never needs a plug-in imported
        try:
            if kind in backend_class(name).KINDS:
                return name
        except RegistryError:  # a broken plug-in: named in the error when no backend drives the kind
            continue
    return None


def _allowed_kinds() -> str:
    broken = _loadable()[1]
    return ", ".join(kind_table()) + "".join(f" (not loaded: {problem})" for problem in broken)


def backend_for_kind(kind: str) -> str:
    """The name of the backend that drives scenarios of `kind` (a ScenarioError listing the kinds when none)."""
    name = _driver_of(kind)
    if name is None:
        raise ScenarioError(f"unknown scenario kind {kind!r}; allowed: {_allowed_kinds()}")
    return name


def check_scenario(scenario: Scenario, where: str) -> str:
    """The scenario's backend name, after checking that one drives its kind and accepts its options; errors
    start with `where` (file, scenario index and name) and list what is allowed."""
    backend = _driver_of(scenario.kind)
    if backend is None:
        raise ScenarioError(f"{where}: field 'kind' is {scenario.kind!r}; allowed: {_allowed_kinds()}")
    allowed = backend_class(backend).OPTIONS
    for key in scenario.options:
        if key not in allowed:
            accepted = ", ".join(allowed) if allowed else "none (it takes no options)"
            raise ScenarioError(f"{where}: unknown option {key!r} in field 'options' for the {backend} backend; "
                                f"allowed: {accepted}")
    return backend


def check_suite(suite: Suite) -> Suite:
    """Every scenario of `suite` checked (check_scenario), before any episode runs; returns the suite."""
    for index, scenario in enumerate(suite.scenarios):
        check_scenario(scenario, f"{suite.path}: scenarios[{index}] ({scenario.name!r})")
    return suite


def suite_backends(suite: Suite) -> dict[str, Scenario]:
    """The backends a suite uses, each with its first scenario, in the suite's order."""
    first: dict[str, Scenario] = {}
    for scenario in suite.scenarios:
        first.setdefault(backend_for_kind(scenario.kind), scenario)
    return first

