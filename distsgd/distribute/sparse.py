"""Sparse gradients across ranks, and the agreed non-finite check of a step's results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from distsgd.distribute.layout import Route, route_of
from distsgd.distribute.plans import StepPlan
from distsgd.indexed_slices import IndexedSlices
from distsgd.variables import Variable

__all__ = ["all_finite", "gather_sparse"]


def gather_sparse(communicator: Any, plan: StepPlan, grads: Sequence[Any],
                  variables: Sequence[Variable], label: str,
                  divisor: int) -> dict[int, IndexedSlices]:
    """Every sparse gradient of ``plan``; crossing ones gathered from every rank
    (``Allgatherv``, rank order; ``MEAN``: values divided by ``divisor``)."""
    result = {i: grads[i] for i in plan.sparse if i not in plan.gathered}
    if not plan.gathered:
        return result
    size = communicator.size
    rows = np.array([0 if grads[i] is None else len(grads[i].indices)
                     for i in plan.gathered], dtype=np.int64)
    all_rows = communicator.allgatherv(
        rows, np.full(size, len(plan.gathered)), what=f"{label}: sparse row counts"
    ).reshape(size, len(plan.gathered))
    for column, position in enumerate(plan.gathered):
        var = variables[position]
        grad = grads[position]
        if grad is None:
            values = np.zeros((0,) + var.shape[1:], dtype=var.dtype)
            indices = np.zeros(0, dtype=np.int64)
        else:
            values, indices = grad.values, grad.indices
        what = f"{label}: sparse gradient of {var.name!r}"
        counts = all_rows[:, column]
        all_values = communicator.allgatherv(
            np.ascontiguousarray(values).reshape(-1), counts * math.prod(var.shape[1:]),
            what=what).reshape((-1,) + var.shape[1:])
        all_indices = communicator.allgatherv(indices, counts, what=what)
        route = route_of(var)
        if route is Route.FIRST:
            all_values, all_indices = all_values[:counts[0]], all_indices[:counts[0]]
        elif route is Route.MEAN:
            np.divide(all_values, divisor, out=all_values)
        result[position] = IndexedSlices(all_values, all_indices, var.shape)
    return result


def all_finite(communicator: Any, dense: Sequence[np.ndarray | None],
               sparse: dict[int, IndexedSlices], label: str) -> bool:
    """Whether no rank's aggregated gradients hold NaN or inf (agreed)."""
    arrays = [g for g in dense if g is not None] + [s.values for s in sparse.values()]
    # one float64 sum per array: NaN and inf survive it, and it makes no copy
    bad = np.array([not all(np.isfinite(np.add.reduce(a.reshape(-1), dtype=np.float64))
                            for a in arrays)], dtype=np.uint8)
    if communicator.size > 1:
        communicator.allreduce_(bad, "max", what=f"{label}: non-finite check")
    return not bad[0]
