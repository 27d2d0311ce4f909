"""The SGD update math as plain in-place functions over numpy arrays (Keras convention).

Dense kernels take 1-D C-contiguous arrays (one tensor's ``reshape(-1)`` view, or a
flat buffer holding many tensors back to back); the math is element-wise, so one
call over a flat buffer gives bitwise the same result as one call per tensor.
They walk the arrays in cache-sized blocks through a caller-owned scratch buffer,
so a step allocates nothing proportional to the model size. Every operation is
rounded in the variable's dtype, in the order TF's kernels evaluate it.

:class:`DenseUpdater` runs one step's dense updates over many tensors at once, split
into contiguous element ranges across a small thread pool (numpy and numba release the
GIL). With the optional ``numba`` package (``pip install distsgd[fast]``) each range is
one fused loop that reads ``grad, accum, var`` and writes ``accum, var`` once (the
memory-traffic floor); otherwise the blocked numpy kernels below run. Both evaluate the
same per-element expression in the same dtype without fused multiply-add, so they give
bitwise the same results (tested). Set ``DISTSGD_KERNELS=numpy`` to force numpy and
``DISTSGD_NUM_THREADS`` to size the pool.

Names ending in ``_`` mutate their first arguments. Nothing here imports distsgd.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "BLOCK_ELEMENTS",
    "DenseUpdater",
    "ScratchBuffers",
    "default_num_threads",
    "gradient_descent_",
    "keras_momentum_",
    "sparse_gradient_descent_",
    "sparse_keras_momentum_",
]

#: Elements per block of the dense kernels (128 Ki: five float32 blocks stay in L2).
BLOCK_ELEMENTS = 1 << 17


class ScratchBuffers:
    """Reusable per-dtype work arrays, grown on demand and kept across steps."""

    def __init__(self) -> None:
        self._buffers: dict[np.dtype, np.ndarray] = {}

    def get(self, dtype: np.dtype, elements: int) -> np.ndarray:
        """A 1-D array of at least ``elements`` items of ``dtype`` (contents undefined)."""
        buffer = self._buffers.get(np.dtype(dtype))
        if buffer is None or buffer.size < elements:
            buffer = np.empty(elements, dtype=dtype)
            self._buffers[np.dtype(dtype)] = buffer
        return buffer[:elements]


def _blocks(total: int, block: int) -> Iterator[slice]:
    for start in range(0, total, block):
        yield slice(start, min(start + block, total))


def gradient_descent_(
    var: np.ndarray, grad: np.ndarray, *, lr: np.generic, scratch: np.ndarray
) -> None:
    """``var = var - grad * lr`` (ResourceApplyGradientDescent).

    Args:
        var, grad: 1-D arrays of equal length and the same dtype.
        lr: the learning rate as a scalar of that dtype.
        scratch: work array of at least ``min(len(var), BLOCK_ELEMENTS)`` items.
    """
    block = min(var.size, BLOCK_ELEMENTS)
    for part in _blocks(var.size, block):
        step = scratch[: part.stop - part.start]
        np.multiply(grad[part], lr, out=step)
        np.subtract(var[part], step, out=var[part])


def keras_momentum_(
    var: np.ndarray,
    accum: np.ndarray,
    grad: np.ndarray,
    *,
    lr: np.generic,
    momentum: np.generic,
    nesterov: bool,
    scratch: np.ndarray,
) -> None:
    """Keras momentum (ResourceApplyKerasMomentum), in place::

        accum = accum * momentum - grad * lr
        var   = var + accum                               # nesterov=False
        var   = var + (accum * momentum - grad * lr)      # nesterov=True, new accum

    Args:
        var, accum, grad: 1-D arrays of equal length and the same dtype.
        lr, momentum: scalars of that dtype.
        nesterov: use the Keras Nesterov form (``var`` stores theta + m*v).
        scratch: work array of at least ``2 * min(len(var), BLOCK_ELEMENTS)`` items.
    """
    block = min(var.size, BLOCK_ELEMENTS)
    for part in _blocks(var.size, block):
        n = part.stop - part.start
        g_lr, look_ahead = scratch[:n], scratch[block : block + n]
        a, v = accum[part], var[part]
        np.multiply(grad[part], lr, out=g_lr)
        np.multiply(a, momentum, out=a)
        np.subtract(a, g_lr, out=a)
        if nesterov:
            np.multiply(a, momentum, out=look_ahead)
            np.subtract(look_ahead, g_lr, out=look_ahead)
            np.add(v, look_ahead, out=v)
        else:
            np.add(v, a, out=v)


def sparse_gradient_descent_(
    var: np.ndarray, values: np.ndarray, indices: np.ndarray, *, lr: np.generic
) -> None:
    """``var[indices] += -values * lr`` as a scatter-add (duplicates accumulate in order)."""
    np.add.at(var, indices, -(values * lr))


def sparse_keras_momentum_(
    var: np.ndarray,
    accum: np.ndarray,
    values: np.ndarray,
    unique_indices: np.ndarray,
    *,
    lr: np.generic,
    momentum: np.generic,
    nesterov: bool,
) -> None:
    """Keras momentum on the listed rows only (SparseApplyKerasMomentum).

    ``unique_indices`` must hold no duplicates (sum them first); rows not listed
    keep both their ``var`` and their ``accum`` (no decay, no carry-over step).
    """
    g_lr = values * lr
    a = accum[unique_indices]
    np.multiply(a, momentum, out=a)
    np.subtract(a, g_lr, out=a)
    accum[unique_indices] = a
    if nesterov:
        var[unique_indices] += a * momentum - g_lr
    else:
        var[unique_indices] += a


# --- fused loops (numba, optional) -----------------------------------------------------

_numba_kernels: tuple[Callable[..., None], Callable[..., None]] | None = None
_numba_lock = threading.Lock()


def _numba() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """The compiled (gradient descent, momentum) loops, or None without numba."""
    global _numba_kernels
    if os.environ.get("DISTSGD_KERNELS", "").lower() == "numpy":
        return None  # read on every call, so tests can compare both
    with _numba_lock:
        if _numba_kernels is None:
            try:
                from numba import njit
            except ImportError:
                _numba_kernels = ()  # type: ignore[assignment]
            else:
                @njit(nogil=True, cache=True)
                def gradient_descent(var, grad, lr):  # type: ignore[no-untyped-def]
                    for i in range(var.size):
                        var[i] = var[i] - grad[i] * lr

                @njit(nogil=True, cache=True)
                def momentum(var, accum, grad, lr, m, nesterov):  # type: ignore[no-untyped-def]
                    if nesterov:
                        for i in range(var.size):
                            a = accum[i] * m - grad[i] * lr
                            accum[i] = a
                            var[i] = var[i] + (a * m - grad[i] * lr)
                    else:
                        for i in range(var.size):
                            a = accum[i] * m - grad[i] * lr
                            accum[i] = a
                            var[i] = var[i] + a

                _numba_kernels = (gradient_descent, momentum)
    return _numba_kernels or None


def default_num_threads() -> int:
    """``DISTSGD_NUM_THREADS``, else this process's share of the usable cores.

    MPI ranks on the same host split the cores (hydra's ``MPI_LOCALNRANKS``, Open
    MPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``), so P ranks never start P x cores threads.
    """
    raw = os.environ.get("DISTSGD_NUM_THREADS")
    if raw:
        value = int(raw)
        if value < 1:
            raise ValueError(f"DISTSGD_NUM_THREADS={raw!r}; expected an integer >= 1")
        return value
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    local = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    return max(1, cores // max(1, int(local or 1)))


#: Below this many elements a step's update runs on the calling thread alone.
PARALLEL_MIN_ELEMENTS = 1 << 18


class DenseUpdater:
    """One step's dense updates over many tensors, split evenly across threads.

    Args:
        num_threads: worker count including the calling thread (default
            :func:`default_num_threads`).
    """

    def __init__(self, num_threads: int | None = None) -> None:
        self.num_threads = default_num_threads() if num_threads is None else int(num_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._scratch = [ScratchBuffers() for _ in range(self.num_threads)]
        self._shares: dict[tuple[int, ...], list[list[tuple[int, slice | None]]]] = {}

    def gradient_descent_(self, variables: Sequence[np.ndarray], grads: Sequence[np.ndarray],
                          *, lr: np.generic) -> None:
        """``var -= grad * lr`` for each pair of 1-D arrays (all of one dtype)."""
        fused = _numba() if _fusable(variables) else None

        def run(worker: int, parts: list[tuple[int, slice | None]]) -> None:
            for i, part in parts:
                var, grad = (variables[i], grads[i]) if part is None else \
                    (variables[i][part], grads[i][part])
                if fused is not None:
                    fused[0](var, grad, lr)
                else:
                    gradient_descent_(var, grad, lr=lr, scratch=self._scratch[worker].get(
                        var.dtype, min(var.size, BLOCK_ELEMENTS)))

        self._run(variables, run)

    def keras_momentum_(self, variables: Sequence[np.ndarray], accums: Sequence[np.ndarray],
                        grads: Sequence[np.ndarray], *, lr: np.generic, momentum: np.generic,
                        nesterov: bool) -> None:
        """:func:`keras_momentum_` for each triple of 1-D arrays (all of one dtype)."""
        fused = _numba() if _fusable(variables) else None

        def run(worker: int, parts: list[tuple[int, slice | None]]) -> None:
            for i, part in parts:
                var, accum, grad = (variables[i], accums[i], grads[i]) if part is None else \
                    (variables[i][part], accums[i][part], grads[i][part])
                if fused is not None:
                    fused[1](var, accum, grad, lr, momentum, nesterov)
                else:
                    keras_momentum_(var, accum, grad, lr=lr, momentum=momentum,
                                    nesterov=nesterov, scratch=self._scratch[worker].get(
                                        var.dtype, 2 * min(var.size, BLOCK_ELEMENTS)))

        self._run(variables, run)

    def _run(self, variables: Sequence[np.ndarray],
             run: Callable[[int, list[tuple[int, slice | None]]], None]) -> None:
        sizes = tuple(v.size for v in variables)
        shares = self._shares.get(sizes)
        if shares is None:  # the same model gives the same partition every step
            workers = 1 if sum(sizes) < PARALLEL_MIN_ELEMENTS else self.num_threads
            shares = [[(i, None if part == slice(0, sizes[i]) else part) for i, part in share]
                      for share in _partition(sizes, workers)]
            if len(self._shares) >= 8:
                self._shares.pop(next(iter(self._shares)))
            self._shares[sizes] = shares
        if len(shares) == 1:
            run(0, shares[0])
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads - 1,
                                            thread_name_prefix="distsgd-kernel")
        futures = [self._pool.submit(run, w, shares[w]) for w in range(1, len(shares))]
        run(0, shares[0])
        for future in futures:
            future.result()


def _fusable(variables: Sequence[np.ndarray]) -> bool:
    return bool(variables) and variables[0].dtype in (np.float32, np.float64)


def _partition(sizes: Sequence[int], workers: int) -> list[list[tuple[int, slice]]]:
    """Split tensors (by element count) into ``workers`` contiguous, equal shares."""
    total = sum(sizes)
    per = -(-total // workers) if total else 0
    shares: list[list[tuple[int, slice]]] = [[] for _ in range(workers)]
    worker, room = 0, per
    for i, size in enumerate(sizes):
        start = 0
        while start < size:
            take = min(size - start, room) if worker < workers - 1 else size - start
            shares[worker].append((i, slice(start, start + take)))
            start += take
            room -= take
            if room == 0 and worker < workers - 1:
                worker, room = worker + 1, per
    return shares

