"""How dense gradients travel: routes, buckets and chunks, planned in a fixed order (pure).

Each dense gradient is an :class:`Entry` with a :class:`Route` (how it crosses ranks,
from its variable's policies). Entries are grouped by (dtype, route) into buckets, in
variable order, each up to ``fusion_threshold_bytes``; a bucket is cut into chunks of
at most ``chunk_bytes``: one chunk is one message and one buffer. A plan depends only
on the ordered (dtype, route, shape) entries, which the signature check proves
identical on every rank, so every rank issues the same collectives on the same chunks.

Nothing here communicates or allocates per step.
"""

from __future__ import annotations

import bisect
import enum
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distsgd.arena import locate
from distsgd.variables import Variable, VariableAggregation, VariableSynchronization

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_FUSION_THRESHOLD_BYTES", "LOCAL_CHUNK_BYTES",
           "Bucket", "Chunk", "Entry", "Piece", "Route", "bucket_source", "plan_buckets",
           "plan_chunks", "route_of"]

#: Dense gradients are fused into buckets of up to this many bytes (64 MiB); 0 disables
#: fusion (one bucket per tensor). A tensor larger than the threshold gets its own bucket.
DEFAULT_FUSION_THRESHOLD_BYTES = 64 << 20
#: Messages are at most this many bytes (4 MiB: 1 Mi float32). Chunked reductions were
#: 1.7-2.8x faster than one whole-buffer call with MPICH on the CI machine, and 4 MiB
#: chunks ~5% faster than 1 MiB ones (benchmarks/RESULTS.md).
DEFAULT_CHUNK_BYTES = 4 << 20
#: With nothing to send (one process, rank-local variables), a gradient larger than a
#: chunk is read in place in pieces of this size: enough to split between threads,
#: few enough to cost few kernel calls.
LOCAL_CHUNK_BYTES = 8 << 20


class Route(enum.Enum):
    """How a variable's gradient crosses ranks (from its synchronization and aggregation)."""

    LOCAL = "local"  #: never communicated: ``synchronization=NONE`` (or one process)
    SUM = "sum"      #: summed over ranks (aggregation NONE or SUM)
    MEAN = "mean"    #: averaged over ranks
    FIRST = "first"  #: rank 0's gradient (ONLY_FIRST_REPLICA)


_ROUTES = {VariableAggregation.NONE: Route.SUM, VariableAggregation.SUM: Route.SUM,
           VariableAggregation.MEAN: Route.MEAN,
           VariableAggregation.ONLY_FIRST_REPLICA: Route.FIRST}


def route_of(var: Variable) -> Route:
    """How ``var``'s gradient crosses ranks."""
    if var.synchronization is VariableSynchronization.NONE:
        return Route.LOCAL
    return _ROUTES[var.aggregation]


@dataclass(frozen=True)
class Entry:
    """One dense gradient: its position in the call, dtype, route and shape."""

    position: int
    dtype: np.dtype
    route: Route
    shape: tuple[int, ...]
    size: int = field(init=False, compare=False)  # elements

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", math.prod(self.shape))


@dataclass(frozen=True, eq=False)
class Bucket:
    """Gradients of one dtype and route laid back to back (``offsets`` in elements)."""

    index: int
    dtype: np.dtype
    route: Route
    entries: tuple[Entry, ...]
    offsets: tuple[int, ...]
    size: int

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def views(self, flat: np.ndarray) -> list[np.ndarray]:
        """Each entry's gradient as a view of ``flat`` (the bucket's elements)."""
        return [flat[offset:offset + entry.size].reshape(entry.shape)
                for entry, offset in zip(self.entries, self.offsets, strict=True)]


def plan_buckets(entries: Sequence[Entry], fusion_threshold_bytes: int) -> list[Bucket]:
    """Group ``entries`` by (dtype, route) in order, each bucket up to the threshold.

    Buckets come in the order of their first entry.
    """
    open_groups: dict[tuple[np.dtype, Route], tuple[list[Entry], int]] = {}
    groups: list[list[Entry]] = []
    for entry in entries:
        key = (entry.dtype, entry.route)
        current, used = open_groups.get(key, (None, 0))
        nbytes = entry.size * entry.dtype.itemsize
        if current is None or fusion_threshold_bytes <= 0 or \
                used + nbytes > fusion_threshold_bytes:
            current, used = [], 0
            groups.append(current)
        current.append(entry)
        open_groups[key] = (current, used + nbytes)
    groups.sort(key=lambda group: group[0].position)
    buckets = []
    for group in groups:
        offsets = [0, *itertools.accumulate(e.size for e in group)]
        buckets.append(Bucket(len(buckets), group[0].dtype, group[0].route, tuple(group),
                              tuple(offsets[:-1]), offsets[-1]))
    return buckets


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of gradient ``position`` (flattened), at ``offset`` in
    its chunk."""

    position: int
    start: int
    stop: int
    offset: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, eq=False)
class Chunk:
    """Elements ``[start, stop)`` of ``bucket``: one message, one buffer, one update."""

    index: int
    bucket: Bucket
    start: int
    stop: int
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start

    def pack_(self, grads: Sequence[Any], out: np.ndarray) -> None:
        """Copy this chunk's gradient elements into ``out``; a ``None`` gradient is zeros.

        Runs of whole gradients are copied by one ``np.concatenate`` each."""
        for low, high, pieces in self._runs:
            parts = [grads[piece.position] for piece in pieces]
            if len(pieces) > 1 and not any(part is None for part in parts):
                np.concatenate(parts, axis=None, out=out[low:high])
                continue
            for piece, grad in zip(pieces, parts, strict=True):
                target = out[piece.offset:piece.offset + piece.size]
                if grad is None:
                    target.fill(0)
                else:
                    np.copyto(target, grad.reshape(-1)[piece.start:piece.stop])

    def unpack_(self, values: np.ndarray, grads: Sequence[Any]) -> None:
        """Copy ``values`` (this chunk's elements) back into the gradients."""
        for piece in self.pieces:
            grads[piece.position].reshape(-1)[piece.start:piece.stop] = \
                values[piece.offset:piece.offset + piece.size]

    @functools.cached_property
    def _runs(self) -> list[tuple[int, int, tuple[Piece, ...]]]:
        """``(low, high, pieces)``: the pieces split into runs of whole gradients (a piece
        of a gradient is a run of its own)."""
        sizes = {entry.position: entry.size for entry in self.bucket.entries}
        runs: list[list[Piece]] = []
        previous_whole = False
        for piece in self.pieces:
            whole = piece.start == 0 and piece.stop == sizes[piece.position]
            if whole and previous_whole:
                runs[-1].append(piece)
            else:
                runs.append([piece])
            previous_whole = whole
        return [(r[0].offset, r[-1].offset + r[-1].size, tuple(r)) for r in runs]

    def views(self, grads: Sequence[Any]) -> list[tuple[np.ndarray, int]] | None:
        """``(elements, offset in the chunk)`` per piece, read where the gradients lie;
        None if one of them is ``None``."""
        views = []
        for piece in self.pieces:
            grad = grads[piece.position]
            if grad is None:
                return None
            views.append((grad.reshape(-1)[piece.start:piece.stop], piece.offset))
        return views


def plan_chunks(buckets: Sequence[Bucket], chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                local_chunk_bytes: int | None = None) -> list[Chunk]:
    """Cut every bucket into chunks of at most ``chunk_bytes`` (at least one element).

    With ``local_chunk_bytes`` (nothing is sent), gradients of up to ``chunk_bytes``
    are grouped whole into chunks, and a larger gradient gets chunks of its own of up to
    ``local_chunk_bytes`` each, so that each is read in place as one piece. Empty
    gradients have no elements and appear in no chunk.
    """
    chunks: list[Chunk] = []
    for bucket in buckets:
        step = max(1, chunk_bytes // bucket.dtype.itemsize)
        if local_chunk_bytes is None:
            bounds = [*range(0, bucket.size, step), bucket.size]
        else:
            own = max(step, local_chunk_bytes // bucket.dtype.itemsize)
            bounds = [0]
            for entry, offset in zip(bucket.entries, bucket.offsets, strict=True):
                if entry.size > step:
                    bounds += [b for b in range(offset, offset + entry.size, own)
                               if b > bounds[-1]]
                    bounds.append(offset + entry.size)
                elif offset + entry.size - bounds[-1] > step:
                    bounds.append(offset)
            bounds.append(bucket.size)
        for start, stop in itertools.pairwise(bounds):
            if start < stop:
                chunks.append(Chunk(len(chunks), bucket, start, stop,
                                    _pieces(bucket, start, stop)))
    return chunks


def _pieces(bucket: Bucket, start: int, stop: int) -> tuple[Piece, ...]:
    pieces = []
    first = max(0, bisect.bisect_right(bucket.offsets, start) - 1)
    for entry, offset in zip(bucket.entries[first:], bucket.offsets[first:], strict=True):
        if offset >= stop:
            break
        low, high = max(start, offset), min(stop, offset + entry.size)
        if low < high:
            pieces.append(Piece(entry.position, low - offset, high - offset, low - start))
    return tuple(pieces)


def bucket_source(bucket: Bucket, grads: Sequence[Any]) -> np.ndarray | None:
    """The view of one array that holds ``bucket``'s gradients back to back, in its
    order (as a :class:`~distsgd.GradientBuffer` does), or None."""
    first = grads[bucket.entries[0].position]
    if type(first) is not np.ndarray:
        return None
    owner, start = locate(first)
    for entry, offset in zip(bucket.entries, bucket.offsets, strict=True):
        grad = grads[entry.position]
        if type(grad) is not np.ndarray:
            return None
        grad_owner, grad_start = locate(grad)
        if grad_owner is not owner or grad_start != start + offset:
            return None
    return owner[start:start + bucket.size]
