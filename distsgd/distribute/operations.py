"""The operation check: every distsgd operation starts by proving that every rank is at the
same one (its name, step and sequence number) with the same data, in one tiny
``Allreduce``; it also carries the flag bits of stop requests (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Sequence
from typing import Any

import numpy as np

from distsgd.distribute import interrupts
from distsgd.distribute.interrupts import STOP_FLAGS, StopRequested

__all__ = ["MismatchError", "agree", "raise_if_stopping"]


class MismatchError(ValueError):
    """Ranks are at different operations, or passed different data to the same one."""

    agreed = True  # raised alike on every rank

def agree(communicator: Any, operation: str, digest: bytes = b"", flags: int = 0,
          details: Sequence[Any] | None = None, describe: Any = repr,
          noun: str = "variable") -> int:
    """Begin a collective operation: prove every rank is at the same one, or raise on all.

    Every operation distsgd runs across ranks starts here, with one ``Allreduce(BOR)``
    of 8 hash bytes of (sequence number, ``operation``, ``digest``), their complement and
    one byte of ``flags``: hash and complement come back unchanged on every rank exactly
    when all ranks hashed the same. ``operation`` names the operation and its step
    (``"gradient aggregation at step 12"``); ``digest`` identifies its data (variable
    names, shapes, dtypes, policies), whose items ``details`` are only gathered when
    the ranks disagree, to name the first one that differs (a ``noun``).

    Returns:
        The OR of every rank's ``flags``.

    Raises:
        MismatchError: on every rank alike, saying which rank is at which operation and
            sequence number, or which ranks hold which item.
    """
    communicator.begin(operation)
    sequence = communicator.operations - 1
    flags |= interrupts.stop_flag()
    if communicator.size == 1:
        return flags
    mine = np.frombuffer(hashlib.blake2b(f"{sequence}|{operation}|".encode() + digest,
                                         digest_size=8).digest(), dtype=np.uint8)
    header = np.concatenate([mine, ~mine, np.array([flags], dtype=np.uint8)])
    communicator.allreduce_(header, "bor", what=f"{operation}: operation check")
    if np.array_equal(header[:8], mine) and np.array_equal(header[8:16], ~mine):
        return int(header[16])
    everyone = communicator.allgather_object(
        (sequence, operation, list(details) if details is not None else None))
    raise MismatchError(_mismatch_message(everyone, describe, noun))


def raise_if_stopping(flags: int, what: str, step: int | None = None) -> None:
    """Raise :class:`StopRequested` if the agreed ``flags`` carry a stop request (every
    rank has the same flags, so every rank raises alike)."""
    for signum, bit in STOP_FLAGS.items():
        if flags & bit:
            name = signal.Signals(signum).name
            raise StopRequested(f"stop requested ({name} on some rank): every rank stops "
                                f"before {what}", name, step)


def _mismatch_message(everyone: list[tuple[int, str, list[Any] | None]],
                      describe: Any, noun: str) -> str:
    places = [(sequence, operation) for sequence, operation, _ in everyone]
    if len(set(places)) > 1:
        groups: dict[tuple[int, str], list[int]] = {}
        for rank, place in enumerate(places):
            groups.setdefault(place, []).append(rank)
        where = "; ".join(f"{_ranks(ranks)} at {operation} (operation #{sequence})"
                          for (sequence, operation), ranks in groups.items())
        return (f"ranks are out of step: {where}. Every rank must run the same distsgd "
                "operations in the same order (the same number of steps, and the same "
                "reduce/barrier/checkpoint calls).")
    signatures = [details or [] for _, _, details in everyone]
    operation = everyone[0][1]
    length = max(len(s) for s in signatures)
    i = next(i for i in range(length)
             if len({repr(s[i]) if i < len(s) else None for s in signatures}) > 1)
    groups_held: dict[str, list[int]] = {}
    for rank, signature in enumerate(signatures):
        held = describe(signature[i]) if i < len(signature) else "(nothing)"
        groups_held.setdefault(held, []).append(rank)
    held_text = "; ".join(f"{_ranks(ranks)}: {held}" for held, ranks in groups_held.items())
    counts = sorted({len(s) for s in signatures})
    extra = "" if len(counts) == 1 else \
        f" (ranks pass {' vs '.join(map(str, counts))} {noun}s)"
    return (f"ranks disagree in {operation} at {noun} #{i}{extra}: {held_text}. Every rank "
            "must pass the same variables, in the same order, with the same shapes, dtypes "
            "and policies.")


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
