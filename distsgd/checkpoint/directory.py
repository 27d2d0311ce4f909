"""A job's checkpoint directory: created, checked writable, locked, cleaned of debris."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from distsgd.checkpoint.files import _NAME, CheckpointError, _is_checkpoint_dir
from distsgd.distribute import strategy_of
from distsgd.distribute.comm import agree

_locks: dict[str, int] = {}  # directory (real path) -> this process's lock file descriptor


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
