"""Keras OptimizerV2-compatible optimizers."""

from __future__ import annotations

from typing import Any

from distsgd.optimizers import schedules
from distsgd.optimizers.optimizer import Optimizer
from distsgd.optimizers.sgd import SGD

__all__ = ["SGD", "Optimizer", "deserialize", "get", "schedules", "serialize"]

_BUILTINS: dict[str, type[Optimizer]] = {"sgd": SGD}


def serialize(optimizer: Optimizer) -> dict[str, Any]:
    """``{'class_name': <class name>, 'config': optimizer.get_config()}``."""
    return {"class_name": type(optimizer).__name__, "config": optimizer.get_config()}


def deserialize(config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> Optimizer:
    """Rebuild an optimizer from :func:`serialize`'s output (built-in names any case)."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"config={config!r}; expected {{'class_name': ..., 'config': ...}}")
    name = config["class_name"]
    cls = (custom_objects or {}).get(name) or _BUILTINS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"Unknown optimizer: {name}")
    return cls.from_config(dict(config.get("config", {})), custom_objects=custom_objects)


def get(identifier: Any) -> Optimizer:
    """An optimizer from an instance, a name (``'sgd'``) or a serialized dict."""
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        return deserialize({"class_name": identifier, "config": {}})
    raise ValueError(f"Could not interpret optimizer identifier: {identifier!r}")
