"""Reverse-mode gradients of numpy-style loss code with respect to Variables (autograd)."""

from __future__ import annotations

import operator
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from distsgd.variables import Variable, register_with_autograd, trace_reads

__all__ = ["GradientBuffer", "gradients", "value_and_gradients"]


def gradients(loss: Callable[[], Any], variables: Sequence[Variable],
              grad_loss: Any = None) -> list[np.ndarray | None]:
    """Gradients of ``loss()`` with respect to each variable (tf.GradientTape.gradient).

    ``loss`` is a zero-argument callable written with ``autograd.numpy`` functions
    and Variable operators. A non-scalar loss is summed, or weighted by
    ``grad_loss`` (the upstream gradient, of the loss's shape). A variable the loss
    does not read gets ``None``. Gradients come back in each variable's dtype.
    """
    return value_and_gradients(loss, variables, grad_loss)[1]


def value_and_gradients(loss: Callable[[], Any], variables: Sequence[Variable],
                        grad_loss: Any = None) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """``(loss(), gradients(loss, variables, grad_loss))`` from one forward pass."""
    from autograd import make_vjp

    if not callable(loss):
        raise TypeError(f"loss={loss!r}; expected a zero-argument callable")
    variables = list(variables)
    for i, var in enumerate(variables):
        if not isinstance(var, Variable):
            raise ValueError(f"variables[{i}]={var!r} is not a distsgd.Variable")
    if not variables:
        return np.asarray(loss()), []
    register_with_autograd()
    first: dict[int, int] = {}
    for i, var in enumerate(variables):
        first.setdefault(id(var), i)
    used: set[int] = set()

    def traced(values: Any) -> Any:
        boxes = {key: values[i] for key, i in first.items()}
        with trace_reads(boxes, used):
            return loss()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Output seems independent of input")
        vjp, value = make_vjp(traced)(tuple(v._array for v in variables))
        value = np.asarray(value)
        seed = np.ones_like(value) if grad_loss is None else np.asarray(grad_loss,
                                                                        dtype=value.dtype)
        if seed.shape != value.shape:
            raise ValueError(f"grad_loss has shape {seed.shape}; expected the loss's shape "
                             f"{value.shape}")
        grads = vjp(seed)
    return value, [np.array(grads[i], dtype=var.dtype, order="C")
                   if id(var) in used and i == first[id(var)] else None
                   for i, var in enumerate(variables)]


class GradientBuffer:
    """Gradients of a list of variables, stored back to back: one flat array per dtype.

    Write each gradient in place into ``buffer.grads[i]`` (an array of variable ``i``'s
    shape and dtype, zeros at first) and pass ``zip(buffer.grads, variables)`` to
    ``apply_gradients``. The optimizer then recognises the arrays (validated once,
    here) and reads, and across ranks reduces, whole runs of them where they lie: no
    packing copy, and no per-array checks. ``apply_gradients`` leaves the gradient it
    applied in the buffer (summed or averaged over ranks per each variable's policy,
    and clipped by ``clipvalue``), as DDP leaves the reduced ``.grad``.

    Args:
        variables: the variables, in the order the gradients will be passed.
    """

    _by_first_array: weakref.WeakValueDictionary[int, GradientBuffer] = \
        weakref.WeakValueDictionary()

    def __init__(self, variables: Sequence[Variable]) -> None:
        self.variables = tuple(variables)
        for i, var in enumerate(self.variables):
            if not isinstance(var, Variable):
                raise TypeError(f"variables[{i}]={var!r}; expected a distsgd.Variable")
        sizes: dict[np.dtype, int] = {}
        for var in self.variables:
            sizes[var.dtype] = sizes.get(var.dtype, 0) + var.size
        #: the flat storage, one array per dtype, gradients in variable order
        self.flat = {dtype: np.zeros(size, dtype=dtype) for dtype, size in sizes.items()}
        grads, used = [], dict.fromkeys(sizes, 0)
        for var in self.variables:
            start = used[var.dtype]
            grads.append(self.flat[var.dtype][start:start + var.size].reshape(var.shape))
            used[var.dtype] = start + var.size
        #: one array per variable, views of :attr:`flat`
        self.grads: tuple[np.ndarray, ...] = tuple(grads)
        if grads:
            GradientBuffer._by_first_array[id(grads[0])] = self

    def zero_(self) -> None:
        """Set every gradient to zero."""
        for flat in self.flat.values():
            flat.fill(0)

    def __len__(self) -> int:
        return len(self.grads)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.grads)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.grads[index]

    @classmethod
    def holding(cls, grads: Sequence[Any]) -> GradientBuffer | None:
        """The buffer whose :attr:`grads` are exactly ``grads`` (the same arrays), if any."""
        if not grads:
            return None
        buffer = cls._by_first_array.get(id(grads[0]))
        if buffer is None or len(buffer.grads) != len(grads) or \
                not all(map(operator.is_, grads, buffer.grads)):
            return None
        return buffer
