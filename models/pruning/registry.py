"""The registry of pruning methods: built-ins by "module:attribute" reference (imported when first asked for)
and plug-ins under the entry point group `prunedrive.pruning`, each checked to be a PruningMethod with the one
signature `run(model, request)` (models.pruning.method)."""
from __future__ import annotations

from typing import Callable

from prunedrive.models.pruning.method import PruningMethod, check_method
from prunedrive.plugins.registry import Registry, RegistryError

_BUILTIN = "prunedrive.models.pruning"


def _check(name: str, method: object) -> PruningMethod:
    plugin = PRUNING_METHODS.plugins().get(name)
    return check_method(name, method, f"plug-in {plugin.value}" if plugin is not None else "built-in")


BUILTIN_METHODS = {
    "magnitude": f"{_BUILTIN}.magnitude:METHOD",
    "wanda": f"{_BUILTIN}.wanda:METHOD",
    "sparsegpt": f"{_BUILTIN}.sparsegpt:METHOD",
    "owl": f"{_BUILTIN}.owl:METHOD",
    "dg2pf": f"{_BUILTIN}.dg2pf_method:METHOD",
    "width": f"{_BUILTIN}.structured:METHOD",
    "owl-width": f"{_BUILTIN}.structured:OWL_METHOD",
    "depth": f"{_BUILTIN}.depth:METHOD",
}
PRUNING_METHODS: Registry[PruningMethod] = Registry("pruning method", "prunedrive.pruning", BUILTIN_METHODS,
                                                    check=_check)
METHODS = tuple(BUILTIN_METHODS)


def pruning_method(name: str) -> PruningMethod:
    """The method registered as `name`, checked; an unknown name is a RegistryError listing the choices."""
    return PRUNING_METHODS.get(name)


def method_names(where: Callable[[PruningMethod], bool] | None = None) -> list[str]:
    """Registered names (built-ins first), only those whose method satisfies `where` when given (loading them); a
    plug-in that cannot be loaded is left out of a filtered list (asked for by name, it is refused, naming itself)."""
    if where is None:
        return PRUNING_METHODS.names()
    names = []
    for name in PRUNING_METHODS.names():
        try:
            if where(PRUNING_METHODS.get(name)):
                names.append(name)
        except RegistryError:
            continue
    return names


def pruning_methods() -> dict[str, PruningMethod]:
    """Every method by name, loaded: built-ins, then plug-ins (entry point group `prunedrive.pruning`)."""
    return {name: PRUNING_METHODS.get(name) for name in PRUNING_METHODS.names()}
