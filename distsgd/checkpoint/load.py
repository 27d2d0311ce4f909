"""Restoring a checkpoint: everything verified first, then assigned and broadcast."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distsgd.checkpoint.contents import _planned, _strategy
from distsgd.checkpoint.directory import _raise_if_any_failed
from distsgd.checkpoint.files import (
    CheckpointError,
    CheckpointWarning,
    _candidates,
    _is_checkpoint_dir,
    _read_arrays,
    _read_manifest,
)
from distsgd.distribute.comm import agree
from distsgd.variables import Variable


# --- load -------------------------------------------------------------------------------
def load_checkpoint(directory: str | os.PathLike[str], *, variables: Sequence[Variable],
                    optimizer: Any, strategy: Any = None,
                    path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Restore a checkpoint collectively; returns the saved ``state``.

    Without ``path``, the newest complete checkpoint of ``directory``; if it is unusable
    (corrupt, truncated, foreign), the newest usable older one, with a
    :class:`CheckpointWarning` naming what was passed over and why. Everything is
    verified before anything is assigned (see the module); then the saved slots are
    created, rank 0's values are broadcast, rank-local values are read by each rank, and
    numeric hyperparameters are restored.

    Raises:
        CheckpointError: no usable checkpoint (each refusal's reason is given); raised on
            every rank, with the model and optimizer untouched.
    """
    strategy = _strategy(variables, optimizer, strategy)
    communicator = strategy.communicator
    agree(communicator, "loading a checkpoint")
    with communicator.busy("loading a checkpoint"):
        error: BaseException | None = None
        found: tuple[str, dict[str, Any], list[str]] | None = None
        arrays: dict[str, np.ndarray] = {}
        if communicator.rank == 0:
            try:
                found, arrays = _choose(Path(directory), path, variables, optimizer,
                                        communicator.size)
            except (CheckpointError, OSError) as caught:
                error = caught
        _raise_if_any_failed(communicator, error, "loading a checkpoint")
        chosen_name, manifest, passed_over = communicator.allgather_object(found)[0]
        chosen = Path(chosen_name)
        planned = []
        try:
            planned = _planned(variables, optimizer, manifest, chosen, communicator.size)
            local = {e["key"]: (tuple(e["shape"]), np.dtype(e["dtype"]))
                     for e, _ in planned if e["local"]}
            if local:
                arrays.update(_read_arrays(chosen, manifest,
                                           f"rank-{communicator.rank:05d}.npz", local))
        except (CheckpointError, OSError) as caught:
            error = caught
        _raise_if_any_failed(communicator, error, "loading rank-local checkpoint state")
        for reason in passed_over:
            warnings.warn(reason, CheckpointWarning, stacklevel=2)
        _assign(strategy, variables, optimizer, planned, arrays, manifest)
    return manifest["state"]


def _choose(directory: Path, path: str | os.PathLike[str] | None,
            variables: Sequence[Variable], optimizer: Any, world_size: int
            ) -> tuple[tuple[str, dict[str, Any], list[str]], dict[str, np.ndarray]]:
    """(rank 0) The checkpoint to load, fully verified, and its replicated arrays."""
    if path is not None:
        candidates = [Path(path)]
        if not _is_checkpoint_dir(candidates[0]):
            raise CheckpointError(f"{path} is not a checkpoint directory")
    else:
        candidates = _candidates(directory)
        if not candidates:
            raise CheckpointError(f"no complete checkpoint in {directory}")
    refused: list[str] = []
    for candidate in candidates:
        try:
            manifest = _read_manifest(candidate)
            planned = _planned(variables, optimizer, manifest, candidate, world_size)
            shared = {e["key"]: (tuple(e["shape"]), np.dtype(e["dtype"]))
                      for e, _ in planned if not e["local"]}
            arrays = _read_arrays(candidate, manifest, "arrays.npz", shared)
        except CheckpointError as error:
            refused.append(str(error))
            continue
        notes = [f"checkpoint {Path(r.split(':')[0]).name} is unusable ({r}); loaded "
                 f"{candidate.name} instead" for r in refused]
        return (str(candidate), manifest, notes), arrays
    raise CheckpointError("; ".join(refused) if len(refused) == 1 else
                          "no usable checkpoint: " + "; ".join(refused))


def _assign(strategy: Any, variables: Sequence[Variable], optimizer: Any,
            planned: list[tuple[dict[str, Any], Variable | None]],
            arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    communicator = strategy.communicator
    by_name = {v.name: v for v in variables}
    for entry, target in planned:
        key = entry["key"]
        if key == "optimizer/iterations":
            target = optimizer.iterations
        elif target is None:  # a slot not made yet
            var_name, slot_name = key[len("slot/"):].rpartition("/")[::2]
            target = optimizer.add_slot(by_name[var_name], slot_name)
        if entry["local"] or communicator.rank == 0:
            np.copyto(target._array, arrays[key])
        if not entry["local"] and communicator.size > 1:
            communicator.bcast_(target._array.reshape(-1), root=0,
                                what=f"checkpoint restore of {key!r}")
    for name, value in manifest["optimizer"]["config"].items():
        current = getattr(optimizer, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and \
                isinstance(current, int | float | np.generic | Variable) and \
                not isinstance(current, bool):
            setattr(optimizer, name, value)  # a hyperparameter (or clip option)
    if hasattr(optimizer, "nonfinite_steps_skipped"):
        optimizer.nonfinite_steps_skipped = int(manifest["optimizer"].get(
            "nonfinite_steps_skipped", 0))
