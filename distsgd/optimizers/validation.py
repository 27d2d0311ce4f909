"""Validation of ``apply_gradients``' (gradient, variable) pairs, before anything changes.

Every error names the pair, the value and what was expected; nothing is modified
before all pairs are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from distsgd.gradients import GradientBuffer
from distsgd.indexed_slices import IndexedSlices
from distsgd.variables import Variable

__all__ = ["FLOAT_DTYPES", "Checked", "validate_gradient", "validate_pairs"]

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_FLOATS = frozenset(FLOAT_DTYPES)


@dataclass(frozen=True)
class Checked:
    """A validated call: gradients and variables by position; ``all_dense``: every
    gradient is a numpy array of its variable's shape and dtype (no ``None``)."""

    grads: tuple[Any, ...]
    variables: tuple[Variable, ...]
    all_dense: bool
    #: the GradientBuffer whose arrays ``grads`` are, if they are
    buffer: GradientBuffer | None = None
    #: the GradientAccumulator passed instead of pairs (``grads`` are then unused)
    accumulator: Any = None


def validate_pairs(grads_and_vars: Any) -> Checked:
    """Check every pair; raises ``TypeError``/``ValueError`` naming the first bad one.

    A :class:`~distsgd.GradientBuffer` (or ``zip(buffer.grads, buffer.variables)``) is
    recognised: its arrays were made to match, and it is reduced in place.
    """
    from distsgd.accumulation import GradientAccumulator

    if isinstance(grads_and_vars, GradientAccumulator):  # (its gradients: checked at add)
        accumulator = grads_and_vars
        return Checked((None,) * len(accumulator.variables), accumulator.variables, False,
                       accumulator=accumulator)
    if type(grads_and_vars) is GradientBuffer:
        buffer = grads_and_vars
        if buffer.missing:
            return Checked(buffer.pair_grads(), buffer.variables, False, buffer)
        return Checked(buffer.grads, buffer.variables, True, buffer)
    try:
        items = list(grads_and_vars)
    except TypeError:
        raise TypeError(f"grads_and_vars={grads_and_vars!r}; expected an iterable of "
                        "(gradient, variable) pairs") from None
    grads, variables = [], []
    all_dense = True
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"grads_and_vars[{i}]={item!r}; expected a (gradient, variable) "
                            "pair")
        grad, var = item
        if not isinstance(var, Variable):
            raise TypeError(f"grads_and_vars[{i}] variable is {var!r}; expected a "
                            "distsgd.Variable")
        storage = var._array
        if type(grad) is np.ndarray and grad.dtype is storage.dtype and \
                storage.dtype in _FLOATS and grad.shape == storage.shape:
            grads.append(grad)  # the common case, checked without building any message
        else:
            if var.dtype not in FLOAT_DTYPES:
                raise ValueError(f"Invalid type {var.dtype} for variable {var.name!r}, "
                                 f"expected: {[d.name for d in FLOAT_DTYPES]}.")
            grad = validate_gradient(grad, var, i)
            grads.append(grad)
            all_dense = all_dense and type(grad) is np.ndarray
        variables.append(var)
    buffer = GradientBuffer.holding(grads) if all_dense else None
    if buffer is not None and not buffer.is_for(variables):
        buffer = None
    return Checked(tuple(grads), tuple(variables), all_dense, buffer)


def _as_array(value: Any, var: Variable, what: str) -> np.ndarray:
    if isinstance(value, Variable):
        value = value._array
    has_dtype = isinstance(value, np.ndarray | np.generic)
    try:
        array = np.asarray(value) if has_dtype else np.asarray(value, dtype=var.dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{what}={value!r} is not a numeric array") from None
    if array.dtype != var.dtype:
        raise TypeError(f"{what} has dtype {array.dtype}; variable {var.name!r} has dtype "
                        f"{var.dtype}")
    return array if array.flags.c_contiguous else array.copy(order="C")


def validate_gradient(grad: Any, var: Variable, i: int) -> np.ndarray | IndexedSlices | None:
    """``grad`` as a C-contiguous array of ``var``'s shape and dtype, checked
    :class:`IndexedSlices` (int64 indices in range), or None."""
    if grad is None:
        return None
    if type(grad) is np.ndarray and grad.dtype == var.dtype and grad.shape == var.shape:
        return grad
    what = f"gradient for variable {var.name!r} (grads_and_vars[{i}])"
    if not isinstance(grad, IndexedSlices):
        array = _as_array(grad, var, what)
        if array.shape != var.shape:
            raise ValueError(f"{what} has shape {array.shape}; expected the variable's shape "
                             f"{var.shape}")
        return array
    if var.constraint is not None:
        raise RuntimeError(f"Cannot use a constraint function on a sparse variable "
                           f"({var.name!r}).")
    values = _as_array(grad.values, var, f"{what}.values")
    try:
        indices = np.asarray(grad.indices)
    except (TypeError, ValueError):
        raise TypeError(f"{what}.indices={grad.indices!r} is not an integer array") from None
    if indices.dtype.kind not in "iu" and not (indices.size == 0 and indices.dtype.kind == "f"):
        raise TypeError(f"{what}.indices has dtype {indices.dtype}; expected integers")
    if var.ndim < 1:
        raise ValueError(f"{what}: a sparse gradient needs a variable of rank >= 1; "
                         f"{var.name!r} has shape {var.shape}")
    if indices.ndim != 1:
        raise ValueError(f"{what}.indices has shape {indices.shape}; expected one dimension")
    if values.shape != (len(indices),) + var.shape[1:]:
        raise ValueError(f"{what}.values has shape {values.shape}; expected "
                         f"{(len(indices),) + var.shape[1:]} (one row per index)")
    indices = indices.astype(np.int64)
    bad = np.flatnonzero((indices < 0) | (indices >= var.shape[0]))
    if bad.size:
        raise ValueError(f"{what}.indices[{bad[0]}] = {indices[bad[0]]} is not in "
                         f"[0, {var.shape[0]})")
    return IndexedSlices(values, indices, var.shape)
