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
              grad_loss: Any = None, out: GradientBuffer | None = None) -> Any:
    """Gradients of ``loss()`` with respect to each variable (tf.GradientTape.gradient).

    ``loss`` is a zero-argument callable written with ``autograd.numpy`` functions
    and Variable operators. A non-scalar loss is summed, or weighted by
    ``grad_loss`` (the upstream gradient, of the loss's shape). A variable the loss
    does not read gets ``None``. Gradients come back in each variable's dtype, as a
    list, or written into ``out`` (a :class:`GradientBuffer` of ``variables``), which
    is returned.
    """
    return value_and_gradients(loss, variables, grad_loss, out)[1]


def value_and_gradients(loss: Callable[[], Any], variables: Sequence[Variable],
                        grad_loss: Any = None, out: GradientBuffer | None = None
                        ) -> tuple[np.ndarray, Any]:
    """``(loss(), gradients(loss, variables, grad_loss, out))`` from one forward pass."""
    from autograd import make_vjp

    if not callable(loss):
        raise TypeError(f"loss={loss!r}; expected a zero-argument callable")
    variables = list(variables)
    for i, var in enumerate(variables):
        if not isinstance(var, Variable):
            raise ValueError(f"variables[{i}]={var!r} is not a distsgd.Variable")
    if out is not None and (not isinstance(out, GradientBuffer) or not out.is_for(variables)):
        raise ValueError(f"out={out!r}; expected a GradientBuffer of these {len(variables)} "
                         "variables, in this order")
    if not variables:
        return np.asarray(loss()), out if out is not None else []
    register_with_autograd()
    first: dict[int, int] = {}
    for i, var in enumerate(variables):
        first.setdefault(id(var), i)
    used: set[int] = set()
    inputs: dict[int, Any] = {}  # position -> the box standing for the variable

    def traced(values: Any) -> Any:
        boxes = {key: values[i] for key, i in first.items()}
        inputs.update({i: boxes[key] for key, i in first.items()})
        with trace_reads(boxes, used):
            return loss()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Output seems independent of input")
        if out is not None:
            return _into_buffer(traced, variables, inputs, grad_loss, out), out
        vjp, value = make_vjp(traced)(tuple(v._array for v in variables))
        grads = vjp(_seed(value, grad_loss))
    value = np.asarray(value)
    present = [id(var) in used and i == first[id(var)] for i, var in enumerate(variables)]
    return value, [np.array(grads[i], dtype=var.dtype, order="C") if present[i] else None
                   for i, var in enumerate(variables)]


def _seed(value: Any, grad_loss: Any) -> np.ndarray:
    value = np.asarray(value)
    seed = np.ones_like(value) if grad_loss is None else np.asarray(grad_loss,
                                                                    dtype=value.dtype)
    if seed.shape != value.shape:
        raise ValueError(f"grad_loss has shape {seed.shape}; expected the loss's shape "
                         f"{value.shape}")
    return seed


def _into_buffer(traced: Callable[[Any], Any], variables: list[Variable],
                 inputs: dict[int, Any], grad_loss: Any, out: GradientBuffer) -> np.ndarray:
    """autograd's backward pass, walked here so that each variable's gradient is written
    into ``out`` (and ``out.ready(i)`` called) as soon as it is complete: the graph is
    visited children first, so a variable's node is reached once all its uses are done,
    in about the reverse order of the forward pass."""
    from autograd.core import VJPNode, add_outgrads
    from autograd.tracer import toposort, trace

    value, end = trace(VJPNode.new_root(), traced, tuple(v._array for v in variables))
    nodes = {box._node: position for position, box in inputs.items()}
    done: set[int] = set()
    if end is not None:
        outgrads = {end: (_seed(value, grad_loss), False)}
        for node in toposort(end):
            if node not in outgrads:  # the root of the inputs: not needed
                continue
            grad = outgrads.pop(node)[0]
            position = nodes.get(node)
            if position is not None:  # a variable's gradient, complete
                np.copyto(out.grads[position], grad, casting="unsafe")
                done.add(position)
                out.ready(position)
                continue
            for parent, ingrad in zip(node.parents, node.vjp(grad), strict=True):
                outgrads[parent] = add_outgrads(outgrads.get(parent), ingrad)
    out.missing = frozenset(i for i in range(len(variables)) if i not in done)
    for position in sorted(out.missing):
        out.grads[position].fill(0)
        out.ready(position)
    return np.asarray(value)


class GradientBuffer:
    """The gradients of a list of variables, stored back to back: one flat array per dtype.

    Write gradients in place into ``buffer.grads[i]`` (an array of variable ``i``'s
    shape and dtype, zeros at first), then pass the buffer itself to
    ``apply_gradients``: it is the step's ``(gradient, variable)`` pairs. The optimizer
    then checks nothing per pair (the arrays were made to match) and reads, and across
    ranks reduces, whole runs of gradients where they lie, with no packing copy.
    ``zip(buffer.grads, variables)`` is recognised too, at the cost of one identity
    check per pair. ``apply_gradients`` reduces across ranks (and clips by
    ``clipvalue``) in the buffer, as DDP reduces ``.grad`` in place: afterwards its
    contents are unspecified until the next gradients are written.

    ``gradients(loss, variables, out=buffer)`` fills it from autograd; the positions
    the loss does not use are then listed in :attr:`missing` and their gradient is
    ``None`` in the pairs (as in TF: not updated).

    Args:
        variables: floating-point variables, in the order of the pairs.

    Raises:
        TypeError: an element is not a :class:`~distsgd.Variable`.
        ValueError: a variable is not float16, float32 or float64.
    """

    _by_first_array: weakref.WeakValueDictionary[int, GradientBuffer] = \
        weakref.WeakValueDictionary()

    def __init__(self, variables: Sequence[Variable]) -> None:
        self.variables: tuple[Variable, ...] = tuple(variables)
        for i, var in enumerate(self.variables):
            if not isinstance(var, Variable):
                raise TypeError(f"variables[{i}]={var!r}; expected a distsgd.Variable")
            if var.dtype.kind != "f":
                raise ValueError(f"variables[{i}] {var.name!r} has dtype {var.dtype}; "
                                 "expected float16, float32 or float64")
        sizes: dict[np.dtype, int] = {}
        for var in self.variables:
            sizes[var.dtype] = sizes.get(var.dtype, 0) + var.size
        #: the storage: one flat array per dtype, the gradients in variable order
        self.flat = {dtype: np.zeros(size, dtype=dtype) for dtype, size in sizes.items()}
        grads, used = [], dict.fromkeys(sizes, 0)
        for var in self.variables:
            start = used[var.dtype]
            grads.append(self.flat[var.dtype][start:start + var.size].reshape(var.shape))
            used[var.dtype] = start + var.size
        #: one array per variable, views of :attr:`flat`
        self.grads: tuple[np.ndarray, ...] = tuple(grads)
        #: positions whose gradient is absent (``None`` in the pairs; they hold zeros)
        self.missing: frozenset[int] = frozenset()
        #: called by :meth:`ready` (an overlapped reduction sets it)
        self.on_ready: Callable[[int], None] | None = None
        if grads:
            GradientBuffer._by_first_array[id(grads[0])] = self

    def ready(self, position: int) -> None:
        """Variable ``position``'s gradient is complete: with an overlapped reduction
        (``optimizer.overlap(buffer)``) its chunks may start crossing ranks now, while the
        backward pass goes on; otherwise nothing happens."""
        if self.on_ready is not None:
            self.on_ready(position)

    def zero_(self) -> None:
        """Set every gradient to zero."""
        for flat in self.flat.values():
            flat.fill(0)

    def __len__(self) -> int:
        return len(self.grads)

    def is_for(self, variables: Sequence[Variable]) -> bool:
        """Whether this buffer holds the gradients of exactly ``variables`` (the same
        objects, in order)."""
        return len(self.variables) == len(variables) and \
            all(map(operator.is_, self.variables, variables))

    def __iter__(self) -> Iterator[tuple[np.ndarray | None, Variable]]:
        """The ``(gradient, variable)`` pairs."""
        return zip(self.pair_grads(), self.variables, strict=True)

    def pair_grads(self) -> tuple[np.ndarray | None, ...]:
        """:attr:`grads` with ``None`` at the :attr:`missing` positions."""
        if not self.missing:
            return self.grads
        return tuple(None if i in self.missing else g for i, g in enumerate(self.grads))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{flat.size} {dtype.name}" for dtype, flat in self.flat.items())
        return f"<distsgd.GradientBuffer of {len(self)} gradients ({sizes})>"

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
