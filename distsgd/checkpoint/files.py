"""Reading checkpoint files safely: regular files only, the checksummed manifest and its
schema, and arrays checked against what they must be before anything is allocated."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "distsgd-checkpoint-2"
_NAME = re.compile(r"ckpt-\d{10}")
_MAX_MANIFEST_BYTES = 64 << 20
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
