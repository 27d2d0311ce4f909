"""Bucket plans, chunks and the pipelined walk: how dense gradients travel, in a fixed order.

Dense gradients are grouped by (dtype, route) into buckets, in variable order, each up
to ``fusion_threshold_bytes``; a bucket is cut into chunks of at most
``chunk_bytes``. A plan depends only on the ordered (dtype, route, shape) entries,
which the signature check proves identical on every rank, so every rank issues the
same collectives on the same chunks.

:func:`stream_chunks` walks the chunks in order. With a reduction (the caller's
collective), a chunk that is one piece of one gradient is sent from where it lies and
its result lands in a small reused buffer; any other chunk is packed into that buffer
first and reduced there; a run of a GradientBuffer (``sources``) is reduced in place.
The reduced chunk goes to ``on_chunk`` (the optimizer's update) while it is still in
cache (these choices were measured side by side in ``benchmarks/``). Without one,
chunks of few pieces are read where they lie and chunks of many small ones are packed,
so that one update call covers them. With worker
threads, chunk ``k`` is updated while chunk ``k + 1`` is packed and reduced; with no
reduction the chunks are split across the threads. Memory: a few chunk buffers, never
a copy of all gradients.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distsgd.kernels import ScratchBuffers
from distsgd.timeline import timeline

__all__ = ["DEFAULT_FUSION_THRESHOLD_BYTES", "ISOLATED_CHUNK_BYTES", "Bucket", "Chunk",
           "Entry", "plan_buckets", "plan_chunks", "stream_chunks"]

#: Dense gradients are fused into buckets of up to this many bytes (64 MiB); 0 disables
#: fusion (one bucket per tensor). A tensor larger than the threshold gets its own bucket.
DEFAULT_FUSION_THRESHOLD_BYTES = 64 << 20
#: Pipeline depth with worker threads: chunk buffers in flight.
_RING = 3
#: With no messages (one process), large gradients are read in place in chunks of
#: this size: small enough to balance threads, large enough to cost few calls.
ISOLATED_CHUNK_BYTES = 8 << 20
#: A chunk of at most this many pieces is updated piece by piece from the caller's
#: gradients when nothing needs a copy; one with more (small tensors) is packed first,
#: so that one kernel call covers them all.
MAX_PIECES_IN_PLACE = 4
#: Runs of whole gradients averaging at most this many bytes are packed by
#: ``bytes.join`` (~40 ns per array) rather than ``np.concatenate`` (~150 ns per array,
#: faster for larger arrays); measured in ``benchmarks/`` (part ``small``).
JOIN_MAX_AVERAGE_BYTES = 2048


@dataclass(frozen=True)
class Entry:
    """One dense gradient: its position in the call, dtype, route and shape."""

    position: int
    dtype: np.dtype
    route: str
    shape: tuple[int, ...]
    #: elements (computed once: a step reads it per gradient)
    size: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", math.prod(self.shape))


@dataclass
class Bucket:
    """Gradients of one dtype and route laid back to back (``offsets`` in elements)."""

    index: int
    dtype: np.dtype
    route: str
    entries: list[Entry]
    offsets: list[int]
    size: int

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def views(self, buffer: np.ndarray) -> list[np.ndarray]:
        """Each entry's gradient as a view into ``buffer`` (the bucket's elements), in the
        entry's shape."""
        return [buffer[offset:offset + entry.size].reshape(entry.shape)
                for entry, offset in zip(self.entries, self.offsets, strict=True)]


def plan_buckets(entries: Sequence[Entry], fusion_threshold_bytes: int) -> list[Bucket]:
    """Group ``entries`` by (dtype, route) in order, each bucket up to the threshold.

    Buckets are returned in the order of their first entry.
    """
    open_buckets: dict[tuple[np.dtype, str], tuple[list[Entry], int]] = {}
    closed: list[list[Entry]] = []
    for entry in entries:
        key = (entry.dtype, entry.route)
        current, used = open_buckets.get(key, (None, 0))
        nbytes = entry.size * entry.dtype.itemsize
        if current is not None and (fusion_threshold_bytes <= 0
                                    or used + nbytes > fusion_threshold_bytes):
            closed.append(current)
            current = None
        if current is None:
            current, used = [], 0
        current.append(entry)
        open_buckets[key] = (current, used + nbytes)
    closed.extend(group for group, _ in open_buckets.values())
    closed.sort(key=lambda group: group[0].position)
    buckets = []
    for group in closed:
        offsets = np.concatenate([[0], np.cumsum([e.size for e in group])]).astype(int)
        buckets.append(Bucket(len(buckets), group[0].dtype, group[0].route, group,
                              offsets[:-1].tolist(), int(offsets[-1])))
    return buckets


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of gradient ``position`` (flattened) at ``offset`` in a chunk;
    ``whole``: the piece is the entire gradient."""

    position: int
    start: int
    stop: int
    offset: int
    whole: bool


@dataclass
class Chunk:
    """Elements ``[start, stop)`` of ``bucket``: one message, one buffer, one update call."""

    index: int
    bucket: Bucket
    start: int
    stop: int
    pieces: tuple[Piece, ...]
    _copies: list[tuple[Any, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._copies = _copy_plan(self.pieces, self.bucket.dtype.itemsize)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def pack_(self, grads: Sequence[Any], out: np.ndarray, any_none: bool = True) -> None:
        """Copy this chunk's gradient elements into ``out``; a ``None`` gradient is zeros.

        A run of whole gradients is copied by one ``np.concatenate``, or, when they are
        small, by one ``bytes.join`` of their buffers (``any_none=False`` promises there
        is no ``None`` to look for).
        """
        for getter, pieces, low, high, join in self._copies:
            if getter is not None:
                parts = getter(grads)
                if not any_none or not any(part is None for part in parts):
                    if join:
                        try:
                            joined = b"".join(parts)
                        except TypeError:  # a part that is not C-contiguous has no flat buffer
                            pass
                        else:
                            np.copyto(out[low:high], np.frombuffer(joined, out.dtype))
                            continue
                    np.concatenate(parts, axis=None, out=out[low:high])
                    continue
            for piece in pieces:
                _copy_piece_(grads[piece.position], piece, out)

    def views(self, grads: Sequence[Any]) -> list[tuple[np.ndarray, int]] | None:
        """``(gradient piece, offset in the chunk)`` per piece, read where the caller's
        gradients lie; None when packing pays (many small pieces) or a gradient is None."""
        if len(self.pieces) > MAX_PIECES_IN_PLACE:
            return None
        views = []
        for piece in self.pieces:
            grad = grads[piece.position]
            if grad is None:
                return None
            views.append((grad.reshape(-1)[piece.start:piece.stop], piece.offset))
        return views


def _copy_piece_(grad: Any, piece: Piece, out: np.ndarray) -> None:
    target = out[piece.offset:piece.offset + piece.stop - piece.start]
    if grad is None:
        target.fill(0)
    else:
        np.copyto(target, grad.reshape(-1)[piece.start:piece.stop])


def _copy_plan(pieces: Sequence[Piece], itemsize: int) -> list[tuple[Any, ...]]:
    """``(getter, pieces, low, high, join)`` per copy: ``getter(grads)`` returns the
    gradients of a run of whole pieces for one copy (``join``: by ``bytes.join``), or is
    None (copy the pieces one by one)."""
    plan: list[tuple[Any, ...]] = []
    run: list[Piece] = []

    def flush() -> None:
        if len(run) > 1:
            positions = [p.position for p in run]
            getter = (operator.itemgetter(slice(positions[0], positions[-1] + 1))
                      if positions == list(range(positions[0], positions[-1] + 1))
                      else operator.itemgetter(*positions))
            low, high = run[0].offset, run[-1].offset + run[-1].stop - run[-1].start
            plan.append((getter, tuple(run), low, high,
                         (high - low) * itemsize <= JOIN_MAX_AVERAGE_BYTES * len(run)))
        elif run:
            plan.append((None, tuple(run), 0, 0, False))
        run.clear()

    for piece in pieces:
        if not piece.whole:
            flush()
        run.append(piece)
        if not piece.whole:
            flush()
    flush()
    return plan


def plan_chunks(buckets: Sequence[Bucket], chunk_bytes: int,
                isolate_bytes: int | None = None) -> list[Chunk]:
    """Cut every bucket into chunks of at most ``chunk_bytes`` (at least one element).

    With ``isolate_bytes`` (no messages: one process), gradients of up to
    ``chunk_bytes`` are grouped whole into chunks of at most ``chunk_bytes``, and a
    larger gradient gets chunks of its own of up to ``isolate_bytes`` each, read in
    place. Empty gradients have no elements and appear in no chunk.
    """
    chunks: list[Chunk] = []
    for bucket in buckets:
        itemsize = bucket.dtype.itemsize
        step = max(1, chunk_bytes // itemsize)
        if isolate_bytes is None:
            bounds = list(range(0, bucket.size, step)) + [bucket.size]
        else:
            bounds = [0]
            for entry, offset in zip(bucket.entries, bucket.offsets, strict=True):
                if entry.size > step:
                    own = max(step, isolate_bytes // itemsize)
                    bounds += [b for b in range(offset, offset + entry.size, own)
                               if b > bounds[-1]]
                    bounds.append(offset + entry.size)
                elif offset + entry.size - bounds[-1] > step:
                    bounds.append(offset)
            if bounds[-1] != bucket.size:
                bounds.append(bucket.size)
        for start, stop in itertools.pairwise(bounds):
            if start < stop:
                chunks.append(Chunk(len(chunks), bucket, start, stop,
                                    _pieces(bucket, start, stop)))
    return chunks


def _pieces(bucket: Bucket, start: int, stop: int) -> tuple[Piece, ...]:
    pieces = []
    for index in range(max(0, bisect.bisect_right(bucket.offsets, start) - 1),
                       len(bucket.entries)):
        entry, offset = bucket.entries[index], bucket.offsets[index]
        if offset >= stop:
            break
        low, high = max(start, offset), min(stop, offset + entry.size)
        if low < high:
            pieces.append(Piece(entry.position, low - offset, high - offset, low - start,
                                low == offset and high == offset + entry.size))
    return tuple(pieces)


def stream_chunks(chunks: Sequence[Chunk], grads: Sequence[Any],
                  on_chunk: Callable[[Chunk, np.ndarray, int, int], None], *,
                  reduce: Callable[..., None] | None = None,
                  writable: bool = False, out: Callable[[Chunk], np.ndarray] | None = None,
                  pool: ThreadPoolExecutor | None = None, workers: int = 1,
                  buffers: Sequence[ScratchBuffers] = (), any_none: bool = True,
                  sources: Sequence[np.ndarray | None] | None = None) -> None:
    """Pack, reduce and hand over every chunk, in order.

    Args:
        chunks: from :func:`plan_chunks`.
        grads: the gradients by position (``None``: zeros).
        on_chunk: ``on_chunk(chunk, gradient, offset, worker)`` consumes elements
            ``[offset, offset + gradient.size)`` of a chunk (a flat array).
        reduce: ``reduce(chunk, buffer)`` combines the packed buffer across ranks in
            place, ``reduce(chunk, buffer, send)`` combines ``send`` (a chunk that is one
            piece of one gradient, read where it lies) into ``buffer``; called on the
            calling thread, in chunk order.
        writable: ``on_chunk`` writes to the gradient, so it must never be the caller's
            array (reduction implies it).
        out: where chunk ``c`` is packed (default: reusable chunk buffers).
        pool, workers: threads besides the caller; with ``reduce`` one of them updates
            while the caller reduces the next chunk, without it the chunks are split
            between all of them.
        buffers: one :class:`~distsgd.kernels.ScratchBuffers` per worker (index 0 is
            the caller) for the chunk buffers.
        any_none: whether ``grads`` may hold ``None`` (False skips looking).
        sources: per chunk index, a view of the caller's memory already holding the
            chunk's elements (no packing: read and reduced in place), or None.
    """
    in_place = reduce is None and not writable
    phase = "update" if reduce is None else "aggregate"
    recording = timeline.recording
    spent = [0.0] * max(1, workers)  # seconds packing and reducing, per worker

    def packed(chunk: Chunk, worker: int, slot: int) -> np.ndarray:
        source = None if sources is None else sources[chunk.index]
        if source is not None and reduce is None:
            return source
        start = time.perf_counter()
        if source is not None:  # the caller's memory may be reduced in place (measured best)
            reduce(chunk, source)
            target = source
        else:
            target = out(chunk) if out is not None else \
                buffers[worker].get(chunk.bucket.dtype, chunk.size, slot)
            # one piece of one gradient goes straight into the reduction, which writes the
            # result into the reused chunk buffer: no packing copy
            send = chunk.views(grads) if reduce is not None and len(chunk.pieces) == 1 \
                else None
            if send is None:
                chunk.pack_(grads, target, any_none)
                if reduce is not None:
                    reduce(chunk, target)
            else:
                reduce(chunk, target, send[0][0])
        end = time.perf_counter()
        spent[worker] += end - start
        if recording:
            timeline.event(f"bucket {chunk.bucket.index + 1}", phase, start, end,
                           elements=chunk.size)
        return target

    def run(chunk: Chunk, worker: int) -> None:
        views = chunk.views(grads) if in_place and sources is None else None
        if views is None:
            on_chunk(chunk, packed(chunk, worker, 0), 0, worker)
        else:
            for view, offset in views:
                on_chunk(chunk, view, offset, worker)

    try:
        _walk(chunks, run, on_chunk, packed, reduce is not None, pool, workers)
    finally:
        timeline.credit(phase, spent[0])  # other workers' time overlaps the caller's


def _walk(chunks: Sequence[Chunk], run: Callable[[Chunk, int], None],
          on_chunk: Callable[[Chunk, np.ndarray, int, int], None],
          packed: Callable[[Chunk, int, int], np.ndarray], reduces: bool,
          pool: ThreadPoolExecutor | None, workers: int) -> None:
    if pool is None or workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            run(chunk, 0)
        return
    if not reduces:  # no collectives: every worker takes an equal share of the chunks
        def run_share(worker: int, share: Sequence[Chunk]) -> None:
            for chunk in share:
                run(chunk, worker)

        shares = _shares(chunks, workers)
        futures = [pool.submit(run_share, w, shares[w]) for w in range(1, len(shares))]
        run_share(0, shares[0])
        for future in futures:
            future.result()
        return
    # reduce on this thread, update on worker 1: chunk k is updated while k + 1 travels
    in_flight: list[Future[None] | None] = [None] * _RING
    try:
        for number, chunk in enumerate(chunks):
            slot = number % _RING
            if in_flight[slot] is not None:
                in_flight[slot].result()  # its buffer is free again
            in_flight[slot] = pool.submit(on_chunk, chunk, packed(chunk, 0, slot), 0, 1)
    finally:
        for future in in_flight:
            if future is not None:
                future.result()


def _shares(chunks: Sequence[Chunk], workers: int) -> list[Sequence[Chunk]]:
    """Split ``chunks`` into at most ``workers`` contiguous runs of about equal size."""
    total = sum(c.size for c in chunks)
    shares, first, done = [], 0, 0
    for i, chunk in enumerate(chunks):
        done += chunk.size
        if done * workers >= total * (len(shares) + 1) and len(shares) < workers - 1:
            shares.append(chunks[first:i + 1])
            first = i + 1
    shares.append(chunks[first:])
    return [s for s in shares if s] or [chunks]
