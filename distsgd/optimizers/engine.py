"""The element-wise update engine: reduced chunks applied to flat runs of variable memory.

A chunk (:mod:`distsgd.distribute.layout`) holds pieces of consecutive gradients. When
the matching variables lie back to back in memory (the arena puts variables made one
after another there) and so do their slots, a whole chunk is one :class:`Segment`:
one kernel call updates many tensors while the chunk is still in cache. Segments are
planned once per step plan. In one process, where nothing waits for messages, the
chunks of a step are split between threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from distsgd import kernels
from distsgd.arena import locate
from distsgd.distribute.aggregation import ChunkPart
from distsgd.distribute.layout import Chunk
from distsgd.timeline import timeline

__all__ = ["PARALLEL_MIN_ELEMENTS", "Segment", "UpdateEngine", "plan_segments"]

#: Below this many elements a step's update runs on the calling thread alone.
PARALLEL_MIN_ELEMENTS = 1 << 18
#: An element-wise update of 1-D arrays: ``update(var, slots, grad, coefficients, scratch)``.
FlatUpdate = Callable[[np.ndarray, tuple[np.ndarray, ...], np.ndarray, dict[str, Any],
                       kernels.ScratchBuffers], None]


@dataclass(frozen=True)
class Segment:
    """Elements ``[low, high)`` of a chunk update ``var`` and ``slots`` (flat views)."""

    low: int
    high: int
    var: np.ndarray
    slots: tuple[np.ndarray, ...]


def plan_segments(chunks: Sequence[Chunk],
                  arrays: Sequence[tuple[np.ndarray, ...] | None]) -> list[list[Segment]]:
    """Per chunk, its segments; ``arrays[position]`` is ``(variable, *slots)`` storage.

    Consecutive pieces join one segment when the variable and every slot continue
    right where the previous piece's ended, in the same allocation.
    """
    located = [None if group is None else [locate(a) for a in group] for group in arrays]
    plans = []
    for chunk in chunks:
        segments: list[Segment] = []
        run: list[tuple[np.ndarray, int]] = []  # (owner, next offset) per array of the run
        low = high = 0
        for piece in chunk.pieces:
            places = located[piece.position]
            starts = [(owner, offset + piece.start) for owner, offset in places]
            if run and piece.offset == high and all(
                    o is ro and s == rs for (o, s), (ro, rs) in zip(starts, run, strict=True)):
                run = [(o, s + piece.size) for o, s in run]
                high += piece.size
                continue
            if run:
                segments.append(_segment(low, high, run))
            run = [(o, s + piece.size) for o, s in starts]
            low, high = piece.offset, piece.offset + piece.size
        if run:
            segments.append(_segment(low, high, run))
        plans.append(segments)
    return plans


def _segment(low: int, high: int, run: list[tuple[np.ndarray, int]]) -> Segment:
    views = [owner[end - (high - low):end] for owner, end in run]
    return Segment(low, high, views[0], tuple(views[1:]))


class UpdateEngine:
    """Applies an optimizer's element-wise update to reduced chunks (see the module).

    Args:
        update: the optimizer's ``_update_flat_``.
        num_threads: threads for one-process steps (default: this rank's share of the
            cores, :func:`~distsgd.kernels.default_num_threads`).
    """

    def __init__(self, update: FlatUpdate, num_threads: int | None = None) -> None:
        self._update = update
        self.num_threads = num_threads or kernels.default_num_threads()
        self._scratch = [kernels.ScratchBuffers() for _ in range(self.num_threads)]
        self._clipped = [kernels.ScratchBuffers() for _ in range(self.num_threads)]
        self._pool: ThreadPoolExecutor | None = None

    @property
    def scratch(self) -> kernels.ScratchBuffers:
        """The calling thread's work arrays (for per-tensor updates)."""
        return self._scratch[0]

    def apply(self, parts: Sequence[ChunkPart], segments: list[list[Segment]],
              apply_state: dict[np.dtype, dict[str, Any]],
              clipvalue: float | None = None) -> None:
        """Update every segment that ``parts`` cover (split between threads when large)."""
        with timeline.span("update"):
            elements = sum(values.size for _, values, _ in parts)
            workers = self.num_threads if elements >= PARALLEL_MIN_ELEMENTS and \
                len(parts) > 1 else 1
            if workers == 1:
                self._apply_share(0, parts, segments, apply_state, clipvalue)
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_threads - 1,
                                                thread_name_prefix="distsgd-update")
            shares = _shares(parts, workers)
            futures = [self._pool.submit(self._apply_share, w, share, segments, apply_state,
                                         clipvalue) for w, share in enumerate(shares) if w]
            self._apply_share(0, shares[0], segments, apply_state, clipvalue)
            for future in futures:
                future.result()

    def _apply_share(self, worker: int, parts: Sequence[ChunkPart],
                     segments: list[list[Segment]], apply_state: dict[np.dtype, dict[str, Any]],
                     clipvalue: float | None) -> None:
        scratch = self._scratch[worker]
        for chunk, values, offset in parts:
            coefficients = apply_state[chunk.bucket.dtype]
            if clipvalue is not None:  # into scratch: ``values`` may be the caller's
                limit = values.dtype.type(clipvalue)
                clipped = self._clipped[worker].get(values.dtype, values.size)
                np.minimum(values, limit, out=clipped)  # as clipping.clip_by_value
                values = np.maximum(clipped, -limit, out=clipped)
            end = offset + values.size
            for segment in segments[chunk.index]:
                if offset <= segment.low and segment.high <= end:  # the common case
                    self._update(segment.var, segment.slots,
                                 values[segment.low - offset:segment.high - offset],
                                 coefficients, scratch)
                elif segment.low < end and offset < segment.high:
                    low, high = max(segment.low, offset), min(segment.high, end)
                    part = slice(low - segment.low, high - segment.low)
                    self._update(segment.var[part], tuple(s[part] for s in segment.slots),
                                 values[low - offset:high - offset], coefficients, scratch)


def _shares(parts: Sequence[ChunkPart], workers: int) -> list[Sequence[ChunkPart]]:
    """Split ``parts`` into ``workers`` contiguous runs of equal size (to an element),
    cutting a part in two where a run ends."""
    total = sum(values.size for _, values, _ in parts)
    bounds = [total * (w + 1) // workers for w in range(workers)]
    shares: list[list[ChunkPart]] = [[]]
    done = 0
    for chunk, values, offset in parts:
        start = 0
        while start < values.size:
            room = bounds[len(shares) - 1] - done
            if room == 0:
                shares.append([])
                continue
            take = min(room, values.size - start)
            shares[-1].append((chunk, values[start:start + take], offset + start))
            start += take
            done += take
    return [s for s in shares if s]
