"""bfloat16 transport of float32 gradients (opt-in: ``compression="bfloat16"``).

A chunk crosses ranks as bfloat16: the top 16 bits of each float32, rounded to nearest
even. That is half the bytes, with float32's exponent range, so nothing overflows and
no predivision is needed (float16 would need both). MPI has no bfloat16 sum, so a
reduction is built from two buffer collectives, in the same order on every rank:

1. every rank rounds its chunk to bfloat16 and sends shard ``r`` of it to rank ``r``
   (``Alltoallv``; the chunk is split as :func:`~distsgd.distribute.data.replica_share`
   splits a batch: contiguous shards in rank order, sizes differing by at most one);
2. rank ``r`` adds the copies of its shard in float32, in rank order, and rounds the
   sum to bfloat16;
3. every rank gathers the rounded shards (``Allgatherv``) and widens them to float32.

Each element is added up by one rank and every rank widens the same bits, so replicas
stay bitwise equal. The result is ``bf16(sum over r of bf16(g_r))``, summed in float32:
each input and the sum carry a relative rounding error of at most 2**-9.

The kernels come as numpy functions and, with numba, as compiled loops that give the
same bits (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from distsgd.distribute.data import replica_share
from distsgd.kernels import ScratchBuffers, compiled

__all__ = ["COMPRESSIONS", "allreduce_bfloat16_", "check_compression", "round_to_bfloat16_",
           "shard_counts", "widen_bfloat16_"]

#: The accepted values of a strategy's ``compression`` argument.
COMPRESSIONS = (None, "bfloat16")

_SIGN_OFF = np.uint32(0x7FFFFFFF)
_INFINITY = np.uint32(0x7F800000)
_QUIET = np.uint32(0x00400000)
_HALF_MINUS_ONE = np.uint32(0x7FFF)
_SHIFT = np.uint32(16)


def check_compression(compression: Any) -> str | None:
    """``compression`` if it is one of :data:`COMPRESSIONS`, else ValueError."""
    if compression not in COMPRESSIONS or (compression is not None
                                           and not isinstance(compression, str)):
        raise ValueError(f"compression={compression!r}; expected one of {COMPRESSIONS}")
    return compression


def _round_numpy(source: np.ndarray, out: np.ndarray) -> None:
    bits = source.view(np.uint32)
    rounded = bits + (_HALF_MINUS_ONE + ((bits >> _SHIFT) & np.uint32(1)))
    nan = (bits & _SIGN_OFF) > _INFINITY
    if nan.any():  # a NaN stays a NaN (made quiet, so truncation cannot make it an inf)
        rounded[nan] = bits[nan] | _QUIET
    np.right_shift(rounded, _SHIFT, out=rounded)
    np.copyto(out, rounded, casting="unsafe")


def _widen_numpy(source: np.ndarray, out: np.ndarray) -> None:
    bits = out.view(np.uint32)
    np.copyto(bits, source)
    np.left_shift(bits, _SHIFT, out=bits)


def _build(jit: Callable[..., Any]) -> tuple[Callable[..., None], Callable[..., None]]:
    @jit
    def round_to_bfloat16(bits, out):  # type: ignore[no-untyped-def]
        for i in range(bits.size):
            u = bits[i]
            if (u & _SIGN_OFF) > _INFINITY:
                v = u | _QUIET
            else:
                v = u + (_HALF_MINUS_ONE + ((u >> _SHIFT) & np.uint32(1)))
            out[i] = np.uint16(v >> _SHIFT)

    @jit
    def widen_bfloat16(source, bits):  # type: ignore[no-untyped-def]
        for i in range(source.size):
            bits[i] = np.uint32(source[i]) << _SHIFT

    return round_to_bfloat16, widen_bfloat16


def _kernels() -> tuple[Callable[[np.ndarray, np.ndarray], None],
                        Callable[[np.ndarray, np.ndarray], None]]:
    """(round, widen) over float32 / bfloat16-bits arrays: numba's loops, else numpy's."""
    fused = compiled("bfloat16", _build)
    if fused is None:
        return _round_numpy, _widen_numpy
    round_bits, widen_bits = fused
    return (lambda source, out: round_bits(source.view(np.uint32), out),
            lambda source, out: widen_bits(source, out.view(np.uint32)))


def round_to_bfloat16_(source: np.ndarray, out: np.ndarray) -> None:
    """Write the bfloat16 bits (``uint16``) of float32 ``source`` into ``out``: round to
    nearest, ties to even; infinities stay, a NaN stays a NaN, too-large values become
    infinities. Both 1-D, C-contiguous, the same size."""
    _kernels()[0](source, out)


def widen_bfloat16_(source: np.ndarray, out: np.ndarray) -> None:
    """Write the float32 values of bfloat16 bits ``source`` into ``out`` (exact)."""
    _kernels()[1](source, out)


@functools.lru_cache(maxsize=256)
def shard_counts(elements: int, size: int) -> tuple[int, ...]:
    """Elements of each rank's shard of an ``elements``-long chunk (``replica_share``)."""
    shares = (replica_share(elements, r, size) for r in range(size))
    return tuple(share.stop - share.start for share in shares)


def allreduce_bfloat16_(communicator: Any, buffer: np.ndarray, send: np.ndarray | None,
                        scratch: ScratchBuffers, what: Any = "") -> None:
    """Sum float32 ``buffer`` (or ``send``, into ``buffer``) over all ranks, travelling as
    bfloat16 (see the module's docstring); ``scratch`` holds the wire buffers."""
    round_, widen_ = _kernels()
    elements, size, rank = buffer.size, communicator.size, communicator.rank
    counts = shard_counts(elements, size)
    mine = counts[rank]
    wire = scratch.get(np.dtype(np.uint16), elements, 0)
    round_(buffer if send is None else send, wire)
    rows = scratch.get(np.dtype(np.uint16), size * mine, 1)
    communicator.alltoallv_(wire, counts, rows, (mine,) * size, what)
    total = buffer[replica_share(elements, rank, size)]  # this rank's shard of the result
    addend = scratch.get(np.dtype(np.float32), mine, 2)
    widen_(rows[:mine], total)
    for q in range(1, size):  # float32, in rank order
        widen_(rows[q * mine:(q + 1) * mine], addend)
        np.add(total, addend, out=total)
    shard = scratch.get(np.dtype(np.uint16), mine, 3)
    round_(total, shard)
    communicator.allgatherv_(shard, wire, counts, what)
    widen_(wire, buffer)
