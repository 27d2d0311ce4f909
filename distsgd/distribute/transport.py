"""How a summed chunk crosses ranks: exactly, or as bfloat16 (opt-in, lossy).

A transport sums a 1-D chunk over every rank, in place, with the same bits on every
rank. :func:`make_transport` is the one place where ``compression`` is turned into
the transport that each (dtype, route) bucket uses.

bfloat16 (``compression="bfloat16"``) carries summed float32 gradients as bfloat16,
the top 16 bits of each float32 rounded to nearest even (as ``ml_dtypes``): half the
bytes, float32's exponent range, so nothing overflows and no predivision is needed.
MPI has no bfloat16 sum, so a reduction is two buffer collectives, in the same order
on every rank:

1. every rank rounds its chunk to bfloat16 and sends shard ``r`` of it to rank ``r``
   (``Alltoallv``; contiguous shards in rank order, as
   :func:`~distsgd.distribute.data.replica_share` splits a batch);
2. rank ``r`` widens the copies of its shard and adds them in float32, in rank order,
   then rounds the sum to bfloat16;
3. every rank gathers the rounded shards (``Allgatherv``) and widens them.

Each element is added up by one rank and every rank widens the same bits, so replicas
stay bitwise equal. The result is ``bf16(sum over r of bf16(g_r))``: each input and
the sum carry a relative rounding error of at most 2**-9.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy as np

from distsgd.distribute.data import replica_share
from distsgd.distribute.layout import Route
from distsgd.distribute.tree import Node, TreeSum, pieces
from distsgd.kernels import ScratchBuffers, compiled

__all__ = ["COMPRESSIONS", "BFloat16Transport", "ExactTransport", "Transport", "TreeTransport",
           "check_compression", "make_transport", "shard_counts"]

#: The accepted values of a strategy's ``compression`` argument.
COMPRESSIONS = (None, "bfloat16")
_FLOAT32 = np.dtype(np.float32)


def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16 (imported on first use: the import alone takes about 1 s)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


class Transport(Protocol):
    """Sums chunks over ranks for the buckets it carries."""

    name: str

    def carries(self, dtype: np.dtype, route: Route) -> bool:
        """Whether buckets of ``dtype`` summed along ``route`` travel this way."""

    def allreduce_sum_(self, communicator: Any, buffer: np.ndarray,
                       send: np.ndarray | None, what: Any) -> None:
        """Sum ``buffer`` (or ``send``, into ``buffer``) over all ranks."""


class ExactTransport:
    """The dtype's own ``Allreduce`` sum (MPI's order; the same bits on every rank)."""

    name = "exact"

    def carries(self, dtype: np.dtype, route: Route) -> bool:
        return True

    def allreduce_sum_(self, communicator: Any, buffer: np.ndarray,
                       send: np.ndarray | None, what: Any) -> None:
        communicator.allreduce_(buffer, "sum", what=what, send=send)


class BFloat16Transport:
    """float32 sums travel as bfloat16 (see the module's docstring)."""

    name = "bfloat16"

    def __init__(self) -> None:
        self._scratch = ScratchBuffers()
        self._bfloat16 = bfloat16()

    def carries(self, dtype: np.dtype, route: Route) -> bool:
        return dtype == _FLOAT32 and route in (Route.SUM, Route.MEAN)

    def allreduce_sum_(self, communicator: Any, buffer: np.ndarray,
                       send: np.ndarray | None, what: Any) -> None:
        elements, size, rank = buffer.size, communicator.size, communicator.rank
        counts = shard_counts(elements, size)
        mine = counts[rank]
        wire = self._scratch.get(self._bfloat16, elements, 0)
        _round_(buffer if send is None else send, wire)
        rows = self._scratch.get(self._bfloat16, size * mine, 1)
        # MPI moves the bits (uint16: mpi4py knows no bfloat16 buffers)
        communicator.alltoallv_(wire.view(np.uint16), counts, rows.view(np.uint16),
                                (mine,) * size, what)
        total = buffer[replica_share(elements, rank, size)]  # this rank's shard
        addend = self._scratch.get(_FLOAT32, mine, 2)
        _widen_(rows[:mine], total)
        for q in range(1, size):  # float32, in rank order
            _widen_(rows[q * mine:(q + 1) * mine], addend)
            np.add(total, addend, out=total)
        shard = self._scratch.get(self._bfloat16, mine, 3)
        _round_(total, shard)
        communicator.allgatherv_(shard.view(np.uint16), wire.view(np.uint16), counts, what)
        _widen_(wire, buffer)


class TreeTransport:
    """World-size-invariant sums: M micro-batches' gradients added in the canonical tree
    (:mod:`~distsgd.distribute.tree`), whichever rank holds which micro-batch.

    Rank ``r`` holds micro-batches ``replica_share(M, r, P)`` and brings the values of its
    pieces (the maximal tree nodes inside them). One ``Alltoallv`` sends shard ``q`` of
    every piece to rank ``q``; rank ``q`` finishes the tree over all pieces of its shard,
    in node order; one ``Allgatherv`` gives every rank every shard. Each element's sum is
    the same float additions in the same order at every world size: the result's bits
    depend on M and the micro-batches' gradients only.
    """

    name = "tree"

    def __init__(self, micro_batches: int) -> None:
        self.micro_batches = int(micro_batches)
        self._scratch = ScratchBuffers()

    def nodes(self, rank: int, size: int) -> tuple[Node, ...]:
        """The pieces rank ``rank`` of ``size`` brings."""
        share = replica_share(self.micro_batches, rank, size)
        return pieces(share.start, share.stop, self.micro_batches)

    def reduce_(self, communicator: Any, values: list[np.ndarray], out: np.ndarray,
                what: Any = "") -> None:
        """The root of the tree into ``out``: ``values`` are this rank's pieces' elements
        (each ``out.size`` long), in node order."""
        size, rank = communicator.size, communicator.rank
        if size == 1:
            tree = TreeSum(self.micro_batches, lambda depth: self._scratch.get(
                out.dtype, out.size, 8 + depth))
            for node, piece in zip(self.nodes(0, 1), values, strict=True):
                tree.push(node, piece)
            np.copyto(out, tree.root())
            return
        counts = shard_counts(out.size, size)
        everyone = [self.nodes(r, size) for r in range(size)]
        mine = counts[rank]
        send = self._scratch.get(out.dtype, len(values) * out.size, 0)
        at = 0
        for q in range(size):  # shard q of every piece, for rank q
            shard = replica_share(out.size, q, size)
            for piece in values:
                np.copyto(send[at:at + counts[q]], piece[shard])
                at += counts[q]
        total = sum(len(nodes) for nodes in everyone)
        received = self._scratch.get(out.dtype, total * mine, 1)
        communicator.alltoallv_(send, [len(values) * c for c in counts], received,
                                [len(nodes) * mine for nodes in everyone], what)
        tree = TreeSum(self.micro_batches)  # sums in place in ``received``
        at = 0
        for nodes in everyone:  # rank order is node order
            for node in nodes:
                tree.push(node, received[at:at + mine])
                at += mine
        communicator.allgatherv_(tree.root(), out, counts, what)


def _round_(source: np.ndarray, out: np.ndarray) -> None:
    """float32 ``source`` rounded to nearest even into bfloat16 ``out`` (too large:
    infinity; a NaN stays a quiet NaN of the same sign).

    ``ml_dtypes`` does the rounding; with numba, a compiled loop gives the same bits
    (tested over random bit patterns) about 8x faster (0.22 against 1.8 ms for 4 MiB on
    the CI machine), which is what makes the transport pay on slow links.
    """
    fused = compiled("bfloat16", _build_round)
    if fused is not None:
        fused(source.view(np.uint32), out.view(np.uint16))
        return
    with np.errstate(invalid="ignore", over="ignore"):
        np.copyto(out, source, casting="unsafe")


def _widen_(source: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 ``source`` widened into float32 ``out``: the bits shifted up (exact)."""
    np.left_shift(source.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


def _build_round(jit: Any) -> Any:
    @jit
    def round_to_bfloat16(bits, out):  # type: ignore[no-untyped-def]
        for i in range(bits.size):
            u = bits[i]
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: quiet, sign kept
                out[i] = np.uint16((u >> np.uint32(16)) | np.uint32(0x0040)) & np.uint16(
                    0xFFC0)
            else:  # round to nearest, ties to even
                rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                out[i] = np.uint16(rounded >> np.uint32(16))

    return round_to_bfloat16


def check_compression(compression: Any) -> str | None:
    """``compression`` if it is one of :data:`COMPRESSIONS`, else ValueError."""
    if compression is not None and (not isinstance(compression, str)
                                    or compression not in COMPRESSIONS):
        raise ValueError(f"compression={compression!r}; expected one of {COMPRESSIONS}")
    return compression


def make_transport(compression: str | None) -> Transport:
    """The transport of summed buckets for a strategy's ``compression`` setting."""
    return BFloat16Transport() if check_compression(compression) == "bfloat16" \
        else ExactTransport()


@functools.lru_cache(maxsize=256)
def shard_counts(elements: int, size: int) -> tuple[int, ...]:
    """Elements of each rank's shard of an ``elements``-long chunk (``replica_share``)."""
    shares = (replica_share(elements, r, size) for r in range(size))
    return tuple(share.stop - share.start for share in shares)
