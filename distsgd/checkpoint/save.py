"""Writing a checkpoint: collectively, into a temporary directory renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distsgd.checkpoint.contents import Entry, _describe, _entries, _strategy
from distsgd.checkpoint.directory import _prepare, _raise_if_any_failed, _remove_debris
from distsgd.checkpoint.files import FORMAT, CheckpointError, _complete, _manifest_checksum, _sha256
from distsgd.distribute import state_digest
from distsgd.distribute.comm import agree
from distsgd.variables import Variable


# --- save -------------------------------------------------------------------------------
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


def save_checkpoint(directory: str | os.PathLike[str], *, step: int,
                    variables: Sequence[Variable], optimizer: Any,
                    state: dict[str, Any] | None = None, keep: int = 3,
                    strategy: Any = None) -> Path:
    """Write a checkpoint collectively (every rank calls it); returns its path.

    Args:
        directory: the checkpoint directory (shared by the ranks); locked for this job
            on first use (:func:`prepare_checkpoint_directory`).
        step: the global step, used in the checkpoint's name.
        variables: the model's variables (unique names).
        optimizer: its optimizer (iterations, slots and hyperparameters are saved).
        state: JSON-serializable extra state (data position, seeds), returned by
            :func:`load_checkpoint`.
        keep: how many complete checkpoints to keep (older ones are deleted).
        strategy: the strategy of ``variables`` (found from them when None).

    Raises:
        CheckpointError: replicas disagree, the directory is in use or not writable, or
            writing failed on some rank (every rank raises; the partial write is removed).
    """
    strategy = _strategy(variables, optimizer, strategy)
    communicator = strategy.communicator
    entries = _entries(variables, optimizer)
    label = f"saving checkpoint step {int(step)}"
    agree(communicator, label)
    with communicator.busy(label):
        _prepare(communicator, Path(directory))
        shared = [e for e in entries if not e[2]]
        digest = state_digest([v for _, v, _ in shared])
        digests = communicator.allgather_object(digest)
        if len(set(digests)) != 1:
            differing = [r for r, d in enumerate(digests) if d != digests[0]]
            raise CheckpointError(f"replicas differ before checkpoint at step {step}: ranks "
                                  f"{differing} do not match rank 0; not saving")
        root = Path(directory)
        name = f"ckpt-{int(step):010d}"
        temporary = root / communicator.allgather_object(
            f".tmp-{name}-{uuid.uuid4().hex[:8]}")[0]
        try:
            _write_all(communicator, root, temporary, name, entries, shared, digest,
                       optimizer, state, step, keep)
        except CheckpointError:
            if communicator.rank == 0:
                shutil.rmtree(temporary, ignore_errors=True)
            raise
    return root / name


def _write_all(communicator: Any, root: Path, temporary: Path, name: str,
               entries: list[Entry], shared: list[Entry], digest: str, optimizer: Any,
               state: dict[str, Any] | None, step: int, keep: int) -> None:
    error: BaseException | None = None
    try:
        if communicator.rank == 0:
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
                "entries": [_describe(k, v.shape, v.dtype, local, v)
                            for k, v, local in entries],
                "optimizer": {"class_name": type(optimizer).__name__,
                              "config": optimizer.get_config(),
                              "nonfinite_steps_skipped": int(getattr(
                                  optimizer, "nonfinite_steps_skipped", 0))},
                "state": state or {}, "digest": digest,
                "sha256": {f: _sha256(temporary / f) for f in files},
            }
            manifest["checksum"] = _manifest_checksum(manifest)
            with open(temporary / "manifest.json", "w") as handle:
                json.dump(manifest, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_directory(temporary)
            _commit(root, temporary, name, keep)
    except (OSError, TypeError, ValueError) as caught:
        error = caught
    _raise_if_any_failed(communicator, error, f"writing checkpoint {root / name}")


def _commit(root: Path, temporary: Path, name: str, keep: int) -> None:
    final = root / name
    if os.path.lexists(final):  # the same step saved again (a resumed run): replace it
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
    complete = _complete(root)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    _remove_debris(root, keep=final)
