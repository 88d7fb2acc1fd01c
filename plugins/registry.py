"""One registry for everything users extend by name: agents, simulator backends, pruning methods, metrics.

    AGENTS = Registry("agent", "prunedrive.agents", {"expert": "prunedrive.agents.expert:ExpertAgent"})
    AGENTS.names()          # built-ins first, then installed plug-ins, sorted
    AGENTS.get("expert")    # imported only now; an unknown name lists the choices

Entries are "module:attribute" references (imported on first use, so an optional dependency such as
CARLA's client costs nothing until asked for), objects registered in-process with `register`, or plug-ins
that an installed package declares under the registry's entry point group:

    [project.entry-points."prunedrive.agents"]
    mydriver = "my_pkg.drivers:make"

A built-in name cannot be taken over by a plug-in: the built-in wins and the plug-in is ignored.
"""
from __future__ import annotations

import sys
from importlib import import_module, metadata
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """A name that is not registered, or an entry that cannot be loaded (a usage error: exit code 2)."""


def load_reference(reference: str, what: str) -> Any:
    """The object a "package.module:attribute" reference names, imported now."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise RegistryError(f"{what}: {reference!r} is not a 'package.module:attribute' reference")
    try:
        module = import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"{what}: cannot import {module_name!r}: {exc}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RegistryError(f"{what}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


class Registry(Generic[T]):
    """Names to lazily loaded entries of one kind.

    `kind` names the thing in messages ("agent", "pruning method"); `group` is the entry point group of
    plug-ins; `check(name, entry)` validates a loaded entry and returns it (or raises RegistryError)."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str | T] | None = None,
                 check: Callable[[str, Any], T] | None = None):
        self.kind, self.group = kind, group
        self._entries: dict[str, str | T] = dict(builtins or {})
        self._builtin = frozenset(self._entries)
        self._check = check
        self._loaded: dict[str, T] = {}
        self._scanned: tuple[tuple[str, ...], dict[str, metadata.EntryPoint]] | None = None

    def register(self, name: str, entry: str | T) -> None:
        """Add an entry in-process (a reference or the object itself); re-registering a name replaces it."""
        self._entries[name] = entry
        self._loaded.pop(name, None)

    def plugins(self) -> dict[str, metadata.EntryPoint]:
        """Installed plug-ins of this group, by name (built-in names excluded: those cannot be replaced). The scan
        of installed packages is kept until sys.path changes (a summary asks for the metrics once per row)."""
        key = tuple(sys.path)
        if self._scanned is None or self._scanned[0] != key:
            found = {ep.name: ep for ep in metadata.entry_points(group=self.group)}
            self._scanned = key, {name: ep for name, ep in found.items() if name not in self._builtin}
        return self._scanned[1]

    def names(self) -> list[str]:
        """Every registered name: built-ins and in-process entries first, then plug-ins, sorted."""
        return [*self._entries, *sorted(set(self.plugins()) - set(self._entries))]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self.plugins())

    def choices(self) -> str:
        return ", ".join(self.names()) or "none"

    def get(self, name: str) -> T:
        """The entry registered as `name`, loaded and checked (cached after the first call)."""
        if name in self._loaded:
            return self._loaded[name]
        if name in self._entries:
            entry = self._entries[name]
            loaded = load_reference(entry, f"{self.kind} {name!r}") if isinstance(entry, str) else entry
        else:
            plugin = self.plugins().get(name)
            if plugin is None:
                raise RegistryError(f"unknown {self.kind} {name!r}; allowed: {self.choices()}")
            try:
                loaded = plugin.load()
            except Exception as exc:  # a broken plug-in names itself, whatever it raised
                raise RegistryError(f"{self.kind} {name!r} (plug-in {plugin.value}): cannot load: "
                                    f"{type(exc).__name__}: {exc}") from None
        if self._check is not None:
            loaded = self._check(name, loaded)
        self._loaded[name] = loaded
        return loaded
