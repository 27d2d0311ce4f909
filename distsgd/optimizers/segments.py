"""Where each chunk of a step's gradients lands: runs of contiguous variable and slot memory.

A chunk (see :mod:`distsgd.distribute.fusion`) holds pieces of consecutive gradients.
When the matching variables lie back to back in memory (the arena puts variables made
one after another there) and so do their slots, a whole chunk is one
:class:`Segment`, so one kernel call updates many tensors. Computed once per plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distsgd.arena import locate
from distsgd.distribute.fusion import Chunk

__all__ = ["Segment", "chunk_sources", "plan_segments"]


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
            if places is None:
                raise ValueError(f"no storage for the gradient at position {piece.position}")
            starts = [(owner, offset + piece.start) for owner, offset in places]
            length = piece.stop - piece.start
            if run and all(o is ro and s == rs for (o, s), (ro, rs) in
                           zip(starts, run, strict=True)) and piece.offset == high:
                run = [(o, s + length) for o, s in run]
                high += length
                continue
            if run:
                segments.append(_segment(low, high, run))
            run = [(o, s + length) for o, s in starts]
            low, high = piece.offset, piece.offset + length
        if run:
            segments.append(_segment(low, high, run))
        plans.append(segments)
    return plans


def _segment(low: int, high: int, run: list[tuple[np.ndarray, int]]) -> Segment:
    views = [owner[end - (high - low):end] for owner, end in run]
    return Segment(low, high, views[0], tuple(views[1:]))


def chunk_sources(chunks: Sequence[Chunk], grads: Sequence[np.ndarray]
                  ) -> list[np.ndarray | None]:
    """Per chunk, a view of ``grads``' memory holding exactly its elements, if its pieces
    lie back to back in one array (as in a :class:`~distsgd.GradientBuffer`), else None."""
    located = [locate(g) for g in grads]
    sources: list[np.ndarray | None] = []
    for chunk in chunks:
        first = chunk.pieces[0]
        owner, offset = located[first.position]
        start = offset + first.start - first.offset
        inside = all(located[p.position][0] is owner and
                     located[p.position][1] + p.start - p.offset == start
                     for p in chunk.pieces)
        sources.append(owner[start:start + chunk.size] if inside else None)
    return sources
