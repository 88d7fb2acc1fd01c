"""Simulator backends by name: the built-in ones and plug-ins (entry point group `prunedrive.backends`).

A backend is a class `Backend(scenario, render=False, **options)` implementing `base.Backend`. A plug-in
registers it in its package metadata:

    [project.entry-points."prunedrive.backends"]
    mysim = "mysim_prunedrive:MySimBackend"

and drives the scenarios whose `kind` is written `mysim.KIND` (see prunedrive.scenarios.loader).
"""
from __future__ import annotations

from importlib import import_module

from prunedrive.scenarios.loader import plugin_backends

BUILTIN_BACKENDS = {
    "highway": "prunedrive.harness.backends.highway:HighwayBackend",
    "carla": "prunedrive.harness.backends.carla:CarlaBackend",
}


def backend_names() -> list[str]:
    return [*BUILTIN_BACKENDS, *sorted(plugin_backends())]


def backend_class(name: str):
    """The backend class registered under `name` (imported only now: CARLA's client is optional)."""
    if name in BUILTIN_BACKENDS:
        module, _, attribute = BUILTIN_BACKENDS[name].partition(":")
        return getattr(import_module(module), attribute)
    plugins = plugin_backends()
    if name in plugins:
        return plugins[name].load()
    raise ValueError(f"unknown simulator backend {name!r}; installed: {', '.join(backend_names())}")
