"""Choosing the allreduce chunk size of an aggregation by timing its first calls.

Which chunk size MPI reduces fastest is a property of the machine and of the launch: on
the CI machine raw ``Allreduce`` of 16 MiB chunks took 0.88-1.21x the time of 4 MiB
chunks from one ``mpirun`` to the next, steady within each (``benchmarks/``, part
``aggregate``). So no fixed size is right everywhere, and a :class:`ChunkSizeTuner`
measures instead:

- calls ``0 .. n - 1`` run each of the ``n`` candidates once, untimed (first use makes
  buffers and faults pages in);
- then ``timed_rounds`` rounds run every candidate once, the order reversed every
  other round (A B, B A, A B), so a drift of the machine weighs on all alike;
- at the next call the ranks agree: each rank's median per candidate, the slowest
  rank's (one ``Allreduce`` MAX: a collective is as slow as its slowest rank), and the
  lowest wins (the first candidate on a tie).

Every rank makes the same calls in the same order, so every rank runs the same
schedule, makes the decision at the same call and reaches the same choice. The caller
tunes only where chunk boundaries cannot change the result's bits (see
:class:`~distsgd.distribute.aggregation.GradientAggregator`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["TIMED_ROUNDS", "ChunkSizeTuner"]

#: Timed calls per candidate (after one untimed call each).
TIMED_ROUNDS = 7


class ChunkSizeTuner:
    """Tries ``candidates`` (chunk sizes in bytes) on consecutive calls, keeps the fastest.

    Use: ``size = tuner.chunk_bytes(communicator)`` before a call (the decision's
    collective happens in there, once), ``tuner.record(seconds)`` after it.
    """

    def __init__(self, candidates: Sequence[int], timed_rounds: int = TIMED_ROUNDS) -> None:
        if not candidates:
            raise ValueError("candidates=(); expected at least one chunk size")
        self.candidates = tuple(int(c) for c in candidates)
        order = list(range(len(self.candidates)))
        self._schedule = order + [i for r in range(timed_rounds)
                                  for i in (order[::-1] if r % 2 == 0 else order)]
        self._samples: list[list[float]] = [[] for _ in self.candidates]
        self._calls = 0
        #: the chosen size in bytes (None while trying)
        self.chosen: int | None = self.candidates[0] if len(self.candidates) == 1 else None

    def chunk_bytes(self, communicator: Any) -> int:
        """The chunk size of the coming call; the first call after the trials makes the
        choice (one ``Allreduce`` MAX of every rank's medians, on every rank alike)."""
        if self.chosen is None and self._calls >= len(self._schedule):
            medians = np.array([np.median(s) if s else np.inf for s in self._samples])
            communicator.allreduce_(medians, "max", what="allreduce chunk size choice")
            self.chosen = self.candidates[int(np.argmin(medians))]
        if self.chosen is not None:
            return self.chosen
        return self.candidates[self._schedule[self._calls]]

    def record(self, seconds: float | None) -> None:
        """Count the call just made; ``seconds`` it took (None: it failed, no sample)."""
        if self.chosen is not None:
            return
        if seconds is not None and self._calls >= len(self.candidates):
            self._samples[self._schedule[self._calls]].append(seconds)
        self._calls += 1

    @property
    def samples(self) -> dict[int, list[float]]:
        """Seconds per timed call, by candidate (this rank's)."""
        return {c: list(s) for c, s in zip(self.candidates, self._samples, strict=True)}
