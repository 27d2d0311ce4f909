"""The SGD update math as plain in-place functions over numpy arrays (Keras convention).

Dense kernels take 1-D C-contiguous arrays (one tensor's ``reshape(-1)`` view, or a
flat buffer holding many tensors back to back); the math is element-wise, so one
call over a flat buffer gives bitwise the same result as one call per tensor.
They walk the arrays in cache-sized blocks through a caller-owned scratch buffer,
so a step allocates nothing proportional to the model size. Every operation is
rounded in the variable's dtype, in the order TF's kernels evaluate it.

Names ending in ``_`` mutate their first arguments. Nothing here imports distsgd.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "BLOCK_ELEMENTS",
    "ScratchBuffers",
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
