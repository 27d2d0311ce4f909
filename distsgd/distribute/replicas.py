"""Proof that replicas agree: one digest of variable state, and the collective check on it.

:func:`state_digest` is the one digest of training state: the checkpoint manifest,
the training program's ``final:`` line and :func:`check_replicas` all use it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from distsgd.distribute.comm import agree
from distsgd.distribute.layout import Route, route_of
from distsgd.variables import Variable

__all__ = ["ReplicaDivergenceError", "check_replicas", "state_digest"]


class ReplicaDivergenceError(RuntimeError):
    """Replicas that should be identical hold different values."""


def state_digest(variables: Sequence[Variable]) -> str:
    """sha256 (hex) over the variables' names, shapes, dtypes and bytes, in order.

    Pass ``model_variables + optimizer.weights`` for the whole training state.
    """
    digest = hashlib.sha256()
    for var in variables:
        digest.update(f"{var.name}|{var.shape}|{var.dtype.str}|".encode())
        digest.update(np.ascontiguousarray(var._array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def check_replicas(communicator: Any, variables: Sequence[Variable],
                   repair: bool = False) -> list[str]:
    """Prove every rank holds bitwise the same mirrored ``variables``.

    One operation check, then one ``Allreduce(BOR)`` of each variable's
    :func:`state_digest` (8 bytes) and its complement: a variable's bytes come back
    unchanged on every rank exactly when all ranks hold the same. Rank-local
    (``synchronization=NONE``) variables are skipped.

    Returns:
        The names of the variables that differed and were repaired (``repair``: rank
        0's values are broadcast), else an empty list.

    Raises:
        ReplicaDivergenceError: replicas differ and ``repair`` is False; the message
            names each variable and the ranks that differ from rank 0.
    """
    items = [v for v in variables if route_of(v) is not Route.LOCAL]
    agree(communicator, f"replica check of {len(items)} variables")
    if communicator.size == 1 or not items:
        return []
    digests = np.stack([np.frombuffer(bytes.fromhex(state_digest([v]))[:8], dtype=np.uint8)
                        for v in items])
    buffer = np.concatenate([digests, ~digests], axis=1)
    communicator.allreduce_(buffer, "bor", what="replica check")
    differs = ~(np.all(buffer[:, :8] == digests, axis=1)
                & np.all(buffer[:, 8:] == ~digests, axis=1))
    if not differs.any():
        return []
    everyone = communicator.allgather_object([d.tobytes().hex() for d in digests[differs]])
    names = [v.name for v, bad in zip(items, differs, strict=True) if bad]
    details = []
    for column, name in enumerate(names):
        ranks = [r for r, row in enumerate(everyone) if row[column] != everyone[0][column]]
        details.append(f"{name!r}: ranks {ranks} differ from rank 0")
    if not repair:
        raise ReplicaDivergenceError(f"replicas diverged in {len(names)} "
                                     f"variable{'s' if len(names) > 1 else ''}: "
                                     + "; ".join(details))
    for var, bad in zip(items, differs, strict=True):
        if bad:
            communicator.bcast_(var._array.reshape(-1), root=0, what=f"repair of {var.name!r}")
    warnings.warn("replicas diverged and were repaired from rank 0: " + "; ".join(details),
                  stacklevel=3)
    return names
