"""Collective, atomic checkpoints of variables, optimizer state and training position.

Layout of ``DIR``::

    DIR/latest                  name of the newest complete checkpoint (atomic replace)
    DIR/ckpt-0000000120/        one complete checkpoint
        arrays.npz              replicated variables, iterations, slots (written by rank 0)
        rank-00001.npz          rank-local (synchronization=NONE) state, one file per rank
        manifest.json           format, step, world size, every array's name, shape,
                                dtype and policy, the optimizer config, the caller's
                                state, and the sha256 of every file above

A checkpoint is written into a hidden temporary directory, flushed to disk, then
renamed into place, and only then does ``latest`` move: a process killed at any
moment leaves the previous checkpoint loadable. Loading verifies every checksum and
that the checkpoint holds exactly this model (names, shapes, dtypes, policies)
before anything is assigned; rank 0 reads the replicated state and broadcasts it,
so hosts need not share a filesystem for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distsgd.distribute import Route, route_of, state_digest, strategy_of
from distsgd.variables import Variable, VariableAggregation

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint",
           "state_digest"]  # state_digest: re-exported from distsgd.distribute

FORMAT = "distsgd-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or does not belong to this model."""


def _strategy(variables: Sequence[Variable], optimizer: Any, strategy: Any) -> Any:
    """The strategy the variables and the optimizer's state belong to (never the scope)."""
    return strategy_of([*variables, *optimizer.weights], strategy, what="checkpoint")


def _is_local(var: Variable) -> bool:
    return route_of(var) is Route.LOCAL


def _entries(variables: Sequence[Variable], optimizer: Any) -> list[tuple[str, Variable, bool]]:
    """(key, variable, rank_local) for everything a checkpoint holds, in a fixed order."""
    names = [v.name for v in variables]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variables {duplicates} share a name; checkpointed variables need "
                         "unique names")
    entries = [(f"var/{v.name}", v, _is_local(v)) for v in variables]
    entries.append(("optimizer/iterations", optimizer.iterations, False))
    for var in variables:
        for slot_name in optimizer.get_slot_names():
            try:
                slot = optimizer.get_slot(var, slot_name)
            except KeyError:
                continue
            entries.append((f"slot/{var.name}/{slot_name}", slot, _is_local(var)))
    covered = {id(v) for _, v, _ in entries}
    foreign = [w.name for w in optimizer.weights if id(w) not in covered]
    if foreign:
        raise ValueError(f"optimizer slots {foreign} belong to variables not in `variables`")
    return entries


def _describe(entries: list[tuple[str, Variable, bool]]) -> list[dict[str, Any]]:
    return [{"key": key, "shape": list(v.shape), "dtype": v.dtype.str, "local": local,
             "synchronization": v.synchronization.name, "aggregation": v.aggregation.name}
            for key, v, local in entries]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _raise_if_any_failed(communicator: Any, error: BaseException | None, what: str) -> None:
    """Share every rank's outcome so that all ranks raise the same error, or none."""
    mine = None if error is None else str(error) if isinstance(error, CheckpointError) \
        else f"{what} failed: {type(error).__name__}: {error}"
    failures = [f for f in communicator.allgather_object(mine) if f]
    if failures:
        raise CheckpointError(failures[0]) from error


def save_checkpoint(directory: str | os.PathLike[str], *, step: int,
                    variables: Sequence[Variable], optimizer: Any,
                    state: dict[str, Any] | None = None, keep: int = 3,
                    strategy: Any = None) -> Path:
    """Write a checkpoint collectively (every rank calls it); returns its path.

    Args:
        directory: the checkpoint directory (shared by the ranks).
        step: the global step, used in the checkpoint's name.
        variables: the model's variables (unique names).
        optimizer: its optimizer (iterations, slots and hyperparameters are saved).
        state: JSON-serializable extra state (data position, seeds), returned by
            :func:`load_checkpoint`.
        keep: how many complete checkpoints to keep (older ones are deleted).
        strategy: the strategy of ``variables`` (found from them when None).

    Raises:
        CheckpointError: replicas disagree, or writing failed on some rank.
    """
    strategy = _strategy(variables, optimizer, strategy)
    communicator = strategy.communicator
    entries = _entries(variables, optimizer)
    shared = [e for e in entries if not e[2]]
    digest = state_digest([v for _, v, _ in shared])
    digests = communicator.allgather_object(digest)
    if len(set(digests)) != 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise CheckpointError(f"replicas differ before checkpoint at step {step}: ranks "
                              f"{differing} do not match rank 0; not saving")
    root = Path(directory)
    name = f"ckpt-{int(step):010d}"
    temporary_name = communicator.allgather_object(f".tmp-{name}-{uuid.uuid4().hex[:8]}")[0]
    temporary = root / temporary_name
    error: BaseException | None = None
    try:
        if communicator.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            temporary.mkdir()
    except OSError as caught:
        error = caught
    _raise_if_any_failed(communicator, error, f"creating {temporary}")

    local = {key: var._array for key, var, is_local in entries if is_local}
    try:
        if local:
            _write_synced(temporary / f"rank-{communicator.rank:05d}.npz", local)
    except OSError as caught:
        error = caught
    _raise_if_any_failed(communicator, error, f"writing rank files into {temporary}")

    try:
        if communicator.rank == 0:
            _write_synced(temporary / "arrays.npz", {k: v._array for k, v, _ in shared})
            files = sorted(p.name for p in temporary.iterdir())
            manifest = {
                "format": FORMAT, "step": int(step), "world_size": communicator.size,
                "entries": _describe(entries),
                "optimizer": {"class_name": type(optimizer).__name__,
                              "config": optimizer.get_config(),
                              "nonfinite_steps_skipped": getattr(
                                  optimizer, "nonfinite_steps_skipped", 0)},
                "state": state or {}, "digest": digest,
                "sha256": {f: _sha256(temporary / f) for f in files},
            }
            with open(temporary / "manifest.json", "w") as handle:
                json.dump(manifest, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_directory(temporary)
            _commit(root, temporary, name, keep)
    except (OSError, TypeError, ValueError) as caught:
        error = caught
    _raise_if_any_failed(communicator, error, f"writing checkpoint {root / name}")
    return root / name


def _commit(root: Path, temporary: Path, name: str, keep: int) -> None:
    final = root / name
    if final.exists():  # the same step saved again (a resumed run): replace it
        stale = root / f".stale-{name}-{uuid.uuid4().hex[:8]}"
        final.rename(stale)
        temporary.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        temporary.rename(final)
    pointer = root / f".latest-{uuid.uuid4().hex[:8]}"
    pointer.write_text(name + "\n")
    with open(pointer, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(pointer, root / "latest")
    _fsync_directory(root)
    complete = sorted(p for p in root.glob("ckpt-*") if (p / "manifest.json").exists())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-ckpt-*"):
        if leftover != temporary:
            shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``directory``, or ``None``."""
    root = Path(directory)
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / "manifest.json").exists():
            return candidate
    complete = sorted(p for p in root.glob("ckpt-*") if (p / "manifest.json").exists())
    return complete[-1] if complete else None


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format {found!r})")
    return manifest


def _check_model(path: Path, manifest: dict[str, Any],
                 entries: list[tuple[str, Variable, bool]], world_size: int) -> None:
    """The checkpoint holds exactly these entries, with the same layouts and policies."""
    saved = {e["key"]: e for e in manifest["entries"]}
    wanted = _describe(entries)
    for entry in wanted:
        other = saved.get(entry["key"])
        if other is None:
            raise CheckpointError(f"{path}: has no {entry['key']!r}; it was written for a "
                                  "different model or optimizer")
        for field in ("shape", "dtype", "synchronization", "aggregation"):
            if other[field] != entry[field]:
                raise CheckpointError(
                    f"{path}: {entry['key']!r} has {field} {other[field]!r}, the model has "
                    f"{entry[field]!r}")
    extra = sorted(set(saved) - {e["key"] for e in wanted})
    if extra:
        raise CheckpointError(f"{path}: holds {extra} that this model does not have")
    if any(e["local"] for e in wanted) and manifest["world_size"] != world_size:
        raise CheckpointError(f"{path}: written by {manifest['world_size']} ranks, and its "
                              f"rank-local state cannot be resharded to {world_size} ranks")


def _read_arrays(path: Path, manifest: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    file, expected = path / name, manifest["sha256"].get(name)
    if not file.exists() or expected is None:
        raise CheckpointError(f"{path}: {name} is missing")
    if _sha256(file) != expected:
        raise CheckpointError(f"{path}: {name} is corrupt or truncated (sha256 mismatch)")
    with np.load(file, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def load_checkpoint(directory: str | os.PathLike[str], *, variables: Sequence[Variable],
                    optimizer: Any, strategy: Any = None,
                    path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Restore the newest checkpoint (or ``path``) collectively; returns the saved state.

    Rank 0 verifies the manifest, every checksum and the model's layout before
    anything is assigned; then the saved slots are created, rank 0's values are
    broadcast, rank-local values are read by each rank, and numeric hyperparameters
    are restored.

    Raises:
        CheckpointError: no checkpoint, or one that is corrupt, truncated, foreign, or
            written at another world size with rank-local state. Raised on every rank.
    """
    strategy = _strategy(variables, optimizer, strategy)
    communicator = strategy.communicator
    error: BaseException | None = None
    found: tuple[str, dict[str, Any]] | None = None
    arrays: dict[str, np.ndarray] = {}
    if communicator.rank == 0:
        try:
            chosen = Path(path) if path is not None else latest_checkpoint(directory)
            if chosen is None:
                raise CheckpointError(f"no complete checkpoint in {directory}")
            manifest = _read_manifest(chosen)
            planned = _planned_entries(variables, optimizer, manifest, chosen, create=False)
            _check_model(chosen, manifest, planned, communicator.size)
            arrays = _read_arrays(chosen, manifest, "arrays.npz")
            found = (str(chosen), manifest)
        except (CheckpointError, OSError, ValueError, KeyError, TypeError) as caught:
            error = caught
    _raise_if_any_failed(communicator, error, "loading a checkpoint")
    chosen_name, manifest = communicator.allgather_object(found)[0]
    chosen = Path(chosen_name)

    planned = _planned_entries(variables, optimizer, manifest, chosen, create=False)
    try:
        if any(is_local for _, _, is_local in planned):
            arrays.update(_read_arrays(chosen, manifest, f"rank-{communicator.rank:05d}.npz"))
    except (CheckpointError, OSError, ValueError) as caught:
        error = caught
    _raise_if_any_failed(communicator, error, "loading rank-local checkpoint state")

    for key, var, is_local in _planned_entries(variables, optimizer, manifest, chosen,
                                               create=True):
        if is_local or communicator.rank == 0:
            np.copyto(var._array, arrays[key])
        if not is_local and communicator.size > 1:
            strategy.broadcast(var, root=0, what=f"checkpoint restore of {key!r}")
    for name, value in manifest["optimizer"]["config"].items():
        current = getattr(optimizer, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and \
                isinstance(current, int | float | np.generic | Variable) and \
                not isinstance(current, bool):
            setattr(optimizer, name, value)  # a hyperparameter (or clip option)
    if hasattr(optimizer, "nonfinite_steps_skipped"):
        optimizer.nonfinite_steps_skipped = manifest["optimizer"].get("nonfinite_steps_skipped", 0)
    return manifest["state"]


def _planned_entries(variables: Sequence[Variable], optimizer: Any, manifest: dict[str, Any],
                     path: Path, create: bool) -> list[tuple[str, Variable, bool]]:
    """The entries the checkpoint should hold once its slots exist on this optimizer.

    Without ``create`` nothing is created: missing slots are described by stand-ins.
    """
    by_var = {v.name: v for v in variables}
    entries = [(f"var/{v.name}", v, _is_local(v))
               for v in variables]  # iterations: described (not created) before validation
    entries.append(("optimizer/iterations", optimizer.iterations if create else
                    _stand_in((), np.int64, VariableAggregation.ONLY_FIRST_REPLICA), False))
    for entry in manifest["entries"]:
        key = entry["key"]
        if not key.startswith("slot/"):
            continue
        var_name, slot_name = key[len("slot/"):].rsplit("/", 1)
        var = by_var.get(var_name)
        if var is None:
            raise CheckpointError(f"{path}: slot {key!r} belongs to variable {var_name!r}, "
                                  "which this model does not have")
        if create:
            slot = optimizer.add_slot(var, slot_name)
        else:
            try:
                slot = optimizer.get_slot(var, slot_name)
            except KeyError:
                slot = _stand_in(var.shape, var.dtype, VariableAggregation.NONE)
        entries.append((key, slot, _is_local(var)))
    return entries


def _stand_in(shape: tuple[int, ...], dtype: Any, aggregation: VariableAggregation) -> Variable:
    """A variable that is never stored anywhere, to describe one not created yet."""
    return Variable(np.zeros(shape, dtype), aggregation=aggregation, trainable=False,
                    _owner=None)
