"""The SGD update math as plain in-place functions over numpy arrays (Keras convention).

Dense kernels take 1-D C-contiguous arrays (one tensor's ``reshape(-1)`` view, or a
flat buffer holding many tensors back to back); the math is element-wise, so one
call over a flat buffer gives bitwise the same result as one call per tensor.
They walk the arrays in cache-sized blocks through a caller-owned scratch buffer,
so a step allocates nothing proportional to the model size. Every operation is
rounded in the variable's dtype, in the order TF's kernels evaluate it.

:func:`dense_kernels` gives, with the optional ``numba`` package (``pip install
distsgd[fast]``), one fused loop that reads ``grad, accum, var`` and writes ``accum,
var`` once (the memory-traffic floor); otherwise the blocked numpy kernels. Both
evaluate the same per-element expression in the same dtype without fused multiply-add,
so they give bitwise the same results (tested). Both release the GIL, so callers may
run them on disjoint slices from several threads. Set ``DISTSGD_KERNELS=numpy`` to
force numpy; ``DISTSGD_NUM_THREADS`` sizes callers' thread pools.

Names ending in ``_`` mutate their first arguments. Nothing here imports distsgd.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from distsgd.arena import huge_page_zeros

__all__ = [
    "BLOCK_ELEMENTS",
    "DenseKernels",
    "ScratchBuffers",
    "compiled",
    "default_num_threads",
    "dense_kernels",
    "gradient_descent_",
    "keras_momentum_",
    "numba_cache_dir",
    "sparse_gradient_descent_",
    "sparse_keras_momentum_",
]

#: Elements per block of the dense kernels (128 Ki: five float32 blocks stay in L2).
BLOCK_ELEMENTS = 1 << 17


class ScratchBuffers:
    """Reusable work arrays per (dtype, slot), grown on demand and kept across steps."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[np.dtype, int], np.ndarray] = {}

    def get(self, dtype: np.dtype, elements: int, slot: int = 0) -> np.ndarray:
        """A 1-D array of ``elements`` items of ``dtype`` (contents undefined); distinct
        ``slot`` numbers give arrays that never overlap."""
        key = (np.dtype(dtype), slot)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < elements:
            buffer = self._buffers[key] = huge_page_zeros(elements, dtype)
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

_compiled: dict[str, Any] = {}
_building: set[str] = set()
_numba_lock = threading.Lock()


def compiled(name: str, build: Callable[[Callable[..., Any]], Any], *,
             wait: bool = True) -> Any:
    """``build(jit)`` with ``jit`` = numba's ``njit(nogil=True, cache=True)``, made once per
    process and kept under ``name``; None without numba or with ``DISTSGD_KERNELS=numpy``
    (read on every call, so tests can compare both).

    With ``wait=False`` the build (importing numba, then compiling, or loading the cache)
    runs on a background thread and None is returned until it is done, so no step waits
    for it: the numpy kernels give the same bits meanwhile. ``DISTSGD_KERNELS=numba``
    always waits.

    The compiled machine code is cached in ``NUMBA_CACHE_DIR`` if set, else in
    :func:`numba_cache_dir`, never inside the installed package (which may be read-only,
    and is shared by every user of it).
    """
    choice = os.environ.get("DISTSGD_KERNELS", "").lower()
    if choice == "numpy":
        return None
    if name in _compiled:
        return _compiled[name]
    if wait or choice == "numba":
        return _build(name, build)
    with _numba_lock:
        if name not in _building:
            _building.add(name)
            threading.Thread(target=_build, args=(name, build), daemon=True,
                             name=f"distsgd-compile-{name}").start()
    return _compiled.get(name)


def _build(name: str, build: Callable[[Callable[..., Any]], Any]) -> Any:
    with _numba_lock:
        if name not in _compiled:
            try:
                from numba import config, njit
            except ImportError:
                _compiled[name] = None
            else:
                previous = config.CACHE_DIR
                if not os.environ.get("NUMBA_CACHE_DIR"):
                    config.CACHE_DIR = numba_cache_dir()  # read when a function is decorated
                try:
                    functions = build(njit(nogil=True, cache=True))
                finally:
                    config.CACHE_DIR = previous
                _compiled[name] = functions
        return _compiled[name]


def numba_cache_dir() -> str:
    """Where distsgd's compiled kernels are cached: ``$XDG_CACHE_HOME/distsgd/numba``
    (default ``~/.cache/distsgd/numba``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distsgd", "numba")


def _build_sgd(jit: Callable[..., Any]) -> tuple[Callable[..., None], Callable[..., None]]:
    @jit
    def gradient_descent(var, grad, lr):  # type: ignore[no-untyped-def]
        for i in range(var.size):
            var[i] = var[i] - grad[i] * lr

    @jit
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

    for dtype in _FUSABLE_DTYPES:  # compile (or load from the cache) the usual signatures
        one = np.zeros(1, dtype)
        gradient_descent(one, one, dtype.type(0))
        momentum(one, one.copy(), one, dtype.type(0), dtype.type(0), False)
    return gradient_descent, momentum


def _numba(wait: bool = True) -> tuple[Callable[..., None], Callable[..., None]] | None:
    """The compiled (gradient descent, momentum) loops, or None (``wait=False``: until the
    background build is done)."""
    return compiled("sgd", _build_sgd, wait=wait)


_FUSABLE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: ``gradient_descent(var, grad, lr, scratch)`` and
#: ``momentum(var, accum, grad, lr, momentum, nesterov, scratch)``
DenseKernels = tuple[Callable[..., None], Callable[..., None]]


def dense_kernels(dtype: np.dtype) -> DenseKernels:
    """The dense update functions for ``dtype``: numba's fused loops when available (and
    ``DISTSGD_KERNELS`` is not ``numpy``), else the blocked numpy kernels.

    ``scratch`` is the calling thread's :class:`ScratchBuffers` (only numpy uses it).
    Resolve once per step, call per slice: both release the GIL.
    """
    fused = _numba(wait=False) if np.dtype(dtype) in _FUSABLE_DTYPES else None
    if fused is not None:
        fused_descent, fused_momentum = fused
        return (lambda var, grad, lr, scratch: fused_descent(var, grad, lr),
                lambda var, accum, grad, lr, momentum, nesterov, scratch:
                fused_momentum(var, accum, grad, lr, momentum, nesterov))
    return (lambda var, grad, lr, scratch: gradient_descent_(
                var, grad, lr=lr, scratch=scratch.get(var.dtype, min(var.size, BLOCK_ELEMENTS))),
            lambda var, accum, grad, lr, momentum, nesterov, scratch: keras_momentum_(
                var, accum, grad, lr=lr, momentum=momentum, nesterov=nesterov,
                scratch=scratch.get(var.dtype, 2 * min(var.size, BLOCK_ELEMENTS))))


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
