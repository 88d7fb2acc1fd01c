"""The bottom layer: how prunedrive is extended. `Registry` is the one way things are found by name."""
from prunedrive.plugins.registry import Registry, RegistryError

__all__ = ["Registry", "RegistryError"]
