"""Collective, atomic checkpoints of variables, optimizer state and training position.

Layout of ``DIR``::

    DIR/.lock                   held (flock) by rank 0 of the job that writes here
    DIR/latest                  name of the newest complete checkpoint (atomic replace)
    DIR/ckpt-0000000120/        one complete checkpoint
        arrays.npz              replicated variables, iterations, slots (written by rank 0)
        rank-00001.npz          rank-local (synchronization=NONE) state, one file per rank
        manifest.json           format, step, world size, every array's name, shape,
                                dtype and policy, the optimizer's class and config, the
                                caller's state, the sha256 of every file above, and the
                                sha256 of the manifest itself

A checkpoint is written into a hidden temporary directory, flushed to disk, then renamed
into place, and only then does ``latest`` move: a process killed at any moment leaves
the previous checkpoint loadable, and the next save removes the debris. While a job
writes to a directory it holds its lock: a second job gets a clear error at once.

Loading reads only regular files inside the directory (no symlinks, FIFOs or devices;
``latest`` must name a ``ckpt-*`` directory there), verifies the manifest's checksum and
types, every file's checksum, and that every array has the name, shape and dtype the
manifest and the model expect, all before allocating more than the model's own sizes and
before anything is assigned. Rank 0 reads the replicated state and broadcasts it, so
hosts need not share a filesystem for it; an error is raised on every rank alike.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distsgd.distribute import Route, route_of, state_digest, strategy_of
from distsgd.distribute.comm import agree
from distsgd.variables import Variable, VariableAggregation

__all__ = ["CheckpointError", "CheckpointWarning", "inspect_checkpoint", "latest_checkpoint",
           "load_checkpoint", "prepare_checkpoint_directory", "save_checkpoint",
           "state_digest"]

FORMAT = "distsgd-checkpoint-2"
_NAME = re.compile(r"ckpt-\d{10}")
_MAX_MANIFEST_BYTES = 64 << 20
_locks: dict[str, int] = {}  # directory (real path) -> this process's lock file descriptor
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or does not belong to this model, or
    a checkpoint directory cannot be used. Raised on every rank alike."""

    agreed = True


class CheckpointWarning(UserWarning):
    """A checkpoint was passed over for an older one (the newest was unusable)."""


# --- safe reading -----------------------------------------------------------------------
@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[Any]:
    """``path`` opened for reading if it is a regular file, never following a symlink and
    never blocking on a FIFO or a device."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a symlink, FIFO or device); "
                              "refused")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the checks
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file; refused")
    with os.fdopen(fd, "rb") as handle:
        yield handle


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with _open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_checkpoint_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)  # a symlink is not followed
    except OSError:
        return False


def _complete(root: Path) -> list[Path]:
    """The checkpoint directories in ``root`` that hold a manifest, oldest first."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            path = root / entry.name
            if _NAME.fullmatch(entry.name) and _is_checkpoint_dir(path) and \
                    os.path.lexists(path / "manifest.json"):
                found.append(path)
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``directory`` (``latest`` if it names one there),
    or ``None``."""
    root = Path(directory)
    named = None
    with contextlib.suppress(CheckpointError, OSError, UnicodeDecodeError):
        with _open_regular(root / "latest") as handle:
            named = handle.read(256).decode().strip()
    complete = _complete(root)
    if named is not None and _NAME.fullmatch(named) and root / named in complete:
        return root / named
    return complete[-1] if complete else None


def inspect_checkpoint(location: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """(This process only, no collective.) The checkpoint ``location`` names (a
    ``ckpt-*`` directory), or the newest one in it whose manifest is intact, with that
    manifest (checksum and types verified; its arrays are verified when loaded); None if
    there is none."""
    path = Path(location)
    candidates = [path] if _NAME.fullmatch(path.name) else _candidates(path)
    for candidate in candidates:
        with contextlib.suppress(CheckpointError, OSError):
            return candidate, _read_manifest(candidate)
    return None


def _candidates(directory: Path) -> list[Path]:
    """Where to load from, in order: the newest complete checkpoint, then older ones."""
    first = latest_checkpoint(directory)
    rest = [p for p in reversed(_complete(directory)) if p != first]
    return ([first] if first is not None else []) + rest


# --- the manifest -----------------------------------------------------------------------
def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format": str, "step": int, "world_size": int, "entries": list, "optimizer": dict,
    "state": dict, "digest": str, "sha256": dict, "checksum": str}
_ENTRY: dict[str, type | tuple[type, ...]] = {
    "key": str, "shape": list, "dtype": str, "local": bool, "synchronization": str,
    "aggregation": str}


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, its checksum and every field's type checked."""
    file = path / "manifest.json"
    with _open_regular(file) as handle:
        if os.fstat(handle.fileno()).st_size > _MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{file} is larger than {_MAX_MANIFEST_BYTES} bytes; "
                                  "refused")
        raw = handle.read()
    try:
        manifest = json.loads(raw)
    except ValueError as error:
        raise CheckpointError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format {found!r})")
    _check_fields(path, manifest, _SCHEMA, "manifest")
    if manifest["checksum"] != _manifest_checksum(manifest):
        raise CheckpointError(f"{path}: manifest.json was changed after it was written "
                              "(its checksum does not match)")
    for i, entry in enumerate(manifest["entries"]):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: manifest entry #{i} is not an object")
        _check_fields(path, entry, _ENTRY, f"manifest entry #{i}")
        if not all(isinstance(n, int) and n >= 0 for n in entry["shape"]):
            raise CheckpointError(f"{path}: manifest entry {entry['key']!r} has shape "
                                  f"{entry['shape']!r}")
    optimizer = manifest["optimizer"]
    if not isinstance(optimizer.get("class_name"), str) or \
            not isinstance(optimizer.get("config"), dict):
        raise CheckpointError(f"{path}: the manifest's optimizer has no class_name/config")
    if not all(isinstance(v, str) for v in manifest["sha256"].values()):
        raise CheckpointError(f"{path}: the manifest's sha256 values are not strings")
    return manifest


def _check_fields(path: Path, value: dict[str, Any], schema: dict[str, Any],
                  what: str) -> None:
    for key, kind in schema.items():
        if key not in value:
            raise CheckpointError(f"{path}: {what} has no {key!r}")
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            raise CheckpointError(f"{path}: {what} field {key!r} is "
                                  f"{type(value[key]).__name__}, expected {kind.__name__}")


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


def _read_arrays(path: Path, manifest: dict[str, Any], name: str,
                 expected: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    """The arrays of ``name`` (an ``.npz``) after its checksum, member names, headers and
    sizes match ``expected``: nothing larger than the model's own arrays is allocated."""
    file, checksum = path / name, manifest["sha256"].get(name)
    if checksum is None:
        raise CheckpointError(f"{path}: the manifest has no checksum for {name}")
    if _sha256(file) != checksum:
        raise CheckpointError(f"{path}: {name} is corrupt or truncated (sha256 mismatch)")
    arrays: dict[str, np.ndarray] = {}
    with _open_regular(file) as handle:
        try:
            archive = zipfile.ZipFile(handle)
        except zipfile.BadZipFile as error:
            raise CheckpointError(f"{path}: {name} is not an npz archive ({error})") from None
        with archive:
            members = {info.filename: info for info in archive.infolist()}
            if set(members) != {f"{key}.npy" for key in expected}:
                extra = sorted(set(members) - {f"{k}.npy" for k in expected})
                missing = sorted({f"{k}.npy" for k in expected} - set(members))
                raise CheckpointError(f"{path}: {name} holds other arrays than its manifest "
                                      f"(extra {extra}, missing {missing})")
            for key, (shape, dtype) in expected.items():
                info = members[f"{key}.npy"]
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in _HEADER_READERS:
                        raise CheckpointError(f"{path}: {name}: {key!r} has .npy format "
                                              f"{version}; expected (1, 0) or (2, 0)")
                    found_shape, fortran, found_dtype = _HEADER_READERS[version](member)
                    if tuple(found_shape) != shape or np.dtype(found_dtype) != dtype or \
                            fortran or info.file_size != member.tell() + \
                            int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                        raise CheckpointError(
                            f"{path}: {name}: {key!r} holds shape {tuple(found_shape)} "
                            f"{np.dtype(found_dtype).name} ({info.file_size} bytes); the "
                            f"manifest and the model say {shape} {dtype.name}")
                    array = np.empty(shape, dtype)
                    if array.nbytes and member.readinto(
                            array.reshape(-1).view(np.uint8)) != array.nbytes:
                        raise CheckpointError(f"{path}: {name}: {key!r} is truncated")
                    arrays[key] = array
    return arrays


# --- collectives ------------------------------------------------------------------------
def _raise_if_any_failed(communicator: Any, error: BaseException | None, what: str) -> None:
    """Share every rank's outcome so that all ranks raise the same error, or none."""
    mine = None if error is None else str(error) if isinstance(error, CheckpointError) \
        else f"{what} failed: {type(error).__name__}: {error}"
    failures = [f for f in communicator.allgather_object(mine) if f]
    if failures:
        raise CheckpointError(failures[0]) from error


def prepare_checkpoint_directory(directory: str | os.PathLike[str], *,
                                 strategy: Any = None) -> Path:
    """Make ``directory`` this job's checkpoint directory (collective): create it, check
    that it is writable, and hold its lock for the rest of the process (rank 0), so that
    a second job using it fails at once; debris of earlier killed writes is removed.

    Raises:
        CheckpointError: on every rank, naming the directory and the cause (not
            writable, or in use by another job: host, pid and start time).
    """
    strategy = strategy or strategy_of([], None)
    agree(strategy.communicator, f"preparing checkpoint directory {directory}")
    with strategy.communicator.busy("preparing a checkpoint directory"):
        return _prepare(strategy.communicator, Path(directory))


def _prepare(communicator: Any, root: Path) -> Path:
    error = None
    if communicator.rank == 0:
        try:
            _lock(root)
            _remove_debris(root, keep=None)
        except (OSError, CheckpointError) as caught:
            error = caught
    _raise_if_any_failed(communicator, error, f"preparing checkpoint directory {root}")
    return root


def _lock(root: Path) -> None:
    key = os.path.realpath(root)
    if key in _locks:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"checkpoint directory {root} is not writable ({error})") from None
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise CheckpointError(f"checkpoint directory {root} is in use by {holder}; give "
                                  "this job a directory of its own") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _locks[key] = fd


def _remove_debris(root: Path, keep: Path | None) -> None:
    """Temporary directories and checkpoints without a manifest left by killed or failed
    writes (safe: this job holds the lock)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            path = root / entry.name
            stale = entry.name.startswith((".tmp-ckpt-", ".stale-ckpt-", ".latest-")) or (
                _NAME.fullmatch(entry.name) and _is_checkpoint_dir(path)
                and not os.path.lexists(path / "manifest.json"))
            if stale and path != keep:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()


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
