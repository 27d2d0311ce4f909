"""Pure gradient clipping (Keras semantics); each function returns new gradients.

Gradients are numpy arrays or :class:`~distsgd.IndexedSlices`; for slices only the
``values`` are clipped and norms are taken over the values as given (not
deduplicated), as in TF. Arithmetic is in each gradient's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from distsgd.indexed_slices import IndexedSlices

__all__ = ["clip_by_global_norm", "clip_by_norm", "clip_by_value", "global_norm"]

Gradient = TypeVar("Gradient", np.ndarray, IndexedSlices)


def _values(grad: np.ndarray | IndexedSlices) -> np.ndarray:
    return grad.values if isinstance(grad, IndexedSlices) else grad


def _with_values(grad: Gradient, values: np.ndarray) -> Gradient:
    return grad._replace(values=values) if isinstance(grad, IndexedSlices) else values


def clip_by_value(grad: Gradient, clipvalue: float) -> Gradient:
    """``max(min(g, clipvalue), -clipvalue)`` element-wise."""
    values = _values(grad)
    limit = values.dtype.type(clipvalue)
    return _with_values(grad, np.maximum(np.minimum(values, limit), -limit))


def clip_by_norm(grad: Gradient, clipnorm: float) -> Gradient:
    """``g * clipnorm / max(||g||_2, clipnorm)`` for one tensor (tf.clip_by_norm)."""
    values = _values(grad)
    l2sum = np.sum(values * values)
    l2norm = np.sqrt(l2sum) if l2sum > 0 else values.dtype.type(0)
    limit = values.dtype.type(clipnorm)
    return _with_values(grad, values * limit / np.maximum(l2norm, limit))


def global_norm(grads: Sequence[np.ndarray | IndexedSlices]) -> float:
    """``sqrt(sum_i ||g_i||^2)`` over all gradients, accumulated in float64."""
    total = 0.0
    for grad in grads:
        values = _values(grad).astype(np.float64, copy=False).reshape(-1)
        total += float(np.dot(values, values))
    return math.sqrt(total)


def clip_by_global_norm(grads: Sequence[Gradient], clipnorm: float) -> list[Gradient]:
    """Scale all gradients by ``clipnorm * min(1/global_norm, 1/clipnorm)``."""
    norm = global_norm(grads)
    scale = clipnorm * min(1.0 / norm if norm > 0 else math.inf, 1.0 / clipnorm) \
        if clipnorm > 0 else (0.0 if norm > 0 else math.nan)
    return [_with_values(g, _values(g) * _values(g).dtype.type(scale)) for g in grads]
