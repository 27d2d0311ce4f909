"""Sparse gradients: rows ``values[i]`` belong to row ``indices[i]`` of a dense tensor."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["IndexedSlices", "deduplicate", "to_dense"]


class IndexedSlices(NamedTuple):
    """A sparse representation of a gradient (tf.IndexedSlices).

    ``values`` has shape ``(len(indices),) + dense_shape[1:]``; duplicate indices
    mean their rows add up.
    """

    values: Any
    indices: Any
    dense_shape: Any = None

    def __repr__(self) -> str:
        values, indices = np.asarray(self.values), np.asarray(self.indices)
        return (f"IndexedSlices(values=<{values.shape} {values.dtype}>, "
                f"indices={np.array2string(indices, threshold=8)}, dense_shape={self.dense_shape})")


def deduplicate(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the rows of duplicate indices: returns ``(summed_values, unique_indices)``.

    Unique indices come out sorted; duplicates are added in input order.
    """
    unique, position = np.unique(indices, return_inverse=True)
    if len(unique) == len(indices):
        order = np.argsort(indices, kind="stable")
        return values[order], indices[order]
    summed = np.zeros((len(unique),) + values.shape[1:], dtype=values.dtype)
    np.add.at(summed, position.reshape(-1), values)
    return summed, unique


def to_dense(values: np.ndarray, indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The dense tensor of ``shape`` whose rows are the sums of the slices."""
    dense = np.zeros(shape, dtype=values.dtype)
    np.add.at(dense, indices, values)
    return dense
