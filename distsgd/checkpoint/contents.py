"""What a checkpoint holds: its entries (variables, iterations, slots), and the check of a
manifest's entries against a model and optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distsgd.checkpoint.files import CheckpointError
from distsgd.distribute import Route, route_of, strategy_of
from distsgd.variables import Variable, VariableAggregation

# --- what a checkpoint holds ------------------------------------------------------------
Entry = tuple[str, Variable, bool]  # (key, variable, rank-local)


def _strategy(variables: Sequence[Variable], optimizer: Any, strategy: Any) -> Any:
    """The strategy the variables and the optimizer's state belong to (never the scope)."""
    return strategy_of([*variables, *optimizer.weights], strategy, what="checkpoint")


def _is_local(var: Variable) -> bool:
    return route_of(var) is Route.LOCAL


def _unique_names(variables: Sequence[Variable]) -> None:
    names = [v.name for v in variables]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variables {duplicates} share a name; checkpointed variables need "
                         "unique names")


def _entries(variables: Sequence[Variable], optimizer: Any) -> list[Entry]:
    """(key, variable, rank-local) for everything a checkpoint holds, in a fixed order,
    through the optimizer's public state (``iterations``, slots by name)."""
    _unique_names(variables)
    entries = [(f"var/{v.name}", v, _is_local(v)) for v in variables]
    entries.append(("optimizer/iterations", optimizer.iterations, False))
    for var in variables:
        for slot_name in optimizer.get_slot_names():
            with contextlib.suppress(KeyError):
                entries.append((f"slot/{var.name}/{slot_name}",
                                optimizer.get_slot(var, slot_name), _is_local(var)))
    covered = {id(v) for _, v, _ in entries}
    foreign = [w.name for w in optimizer.weights if id(w) not in covered]
    if foreign:
        raise ValueError(f"optimizer slots {foreign} belong to variables not in `variables`")
    return entries


def _describe(key: str, shape: Sequence[int], dtype: np.dtype, local: bool,
              var: Variable) -> dict[str, Any]:
    return {"key": key, "shape": list(shape), "dtype": np.dtype(dtype).str, "local": local,
            "synchronization": var.synchronization.name, "aggregation": var.aggregation.name}


def _planned(variables: Sequence[Variable], optimizer: Any, manifest: dict[str, Any],
             path: Path, world_size: int) -> list[tuple[dict[str, Any], Variable | None]]:
    """Every manifest entry checked against this model and optimizer (nothing created):
    ``(description, the variable it restores or None for a slot not made yet)``."""
    _unique_names(variables)
    by_name = {v.name: v for v in variables}
    saved = {e["key"]: e for e in manifest["entries"]}
    if len(saved) != len(manifest["entries"]):
        raise CheckpointError(f"{path}: the manifest lists a key twice")
    planned: list[tuple[dict[str, Any], Variable | None]] = []
    wanted = [(f"var/{v.name}", v, v) for v in variables]
    iterations = Variable(np.zeros((), np.int64), trainable=False, _owner=None,
                          aggregation=VariableAggregation.ONLY_FIRST_REPLICA)
    wanted.append(("optimizer/iterations", iterations, None))
    for key in saved:
        if key.startswith("slot/"):
            var_name, slot_name = key[len("slot/"):].rpartition("/")[::2]
            var = by_name.get(var_name)
            if var is None:
                raise CheckpointError(f"{path}: slot {key!r} belongs to variable "
                                      f"{var_name!r}, which this model does not have")
            try:
                slot = optimizer.get_slot(var, slot_name)
            except KeyError:
                slot = None
            wanted.append((key, var, slot))
        elif key not in {k for k, _, _ in wanted}:
            raise CheckpointError(f"{path}: holds {key!r}, which this model does not have")
    for key, like, target in wanted:
        entry = saved.get(key)
        if entry is None:
            raise CheckpointError(f"{path}: has no {key!r}; it was written for a different "
                                  "model or optimizer")
        ours = _describe(key, like.shape, like.dtype, _is_local(like), like)
        if key.startswith("slot/"):  # a slot has its variable's shape, dtype and locality
            ours["synchronization"], ours["aggregation"] = "AUTO", "NONE"
        for field in ("shape", "dtype", "local", "synchronization", "aggregation"):
            if entry[field] != ours[field]:
                raise CheckpointError(f"{path}: {key!r} has {field} {entry[field]!r}, the "
                                      f"model has {ours[field]!r}")
        planned.append((entry, target))
    if any(e["local"] for e, _ in planned) and manifest["world_size"] != world_size:
        raise CheckpointError(f"{path}: written by {manifest['world_size']} ranks, and its "
                              f"rank-local state cannot be resharded to {world_size} ranks")
    saved_class = manifest["optimizer"]["class_name"]
    if saved_class != type(optimizer).__name__:
        raise CheckpointError(f"{path}: written by a {saved_class} optimizer; this one is a "
                              f"{type(optimizer).__name__}")
    config = optimizer.get_config()
    for name, value in manifest["optimizer"]["config"].items():
        if name != "name" and isinstance(value, bool | str) and config.get(name) != value:
            raise CheckpointError(f"{path}: written with {name}={value!r}; this optimizer "
                                  f"has {name}={config.get(name)!r}")
    return planned
