"""Reverse-mode gradients of numpy-style loss code with respect to Variables (autograd)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distsgd.variables import Variable, register_with_autograd, trace_reads

__all__ = ["gradients", "value_and_gradients"]


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
