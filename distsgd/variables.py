"""Numpy-backed variables with tf.distribute's synchronization and aggregation policies.

A :class:`Variable` owns one C-contiguous numpy array for its whole life and changes
only through ``assign``/``assign_add``/``assign_sub`` (or the optimizer's in-place
kernels), so views of its storage stay valid. Floating-point tensors are allocated
from :data:`distsgd.arena.default_arena`, so variables created one after another lie
back to back in memory and a step updates many of them in one kernel call. Reads inside
:func:`distsgd.optimizers.Optimizer.minimize` return autograd boxes, which is how
gradients of numpy-style loss code are taken.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from distsgd.arena import default_arena

__all__ = ["Variable", "VariableAggregation", "VariableSynchronization", "variable_creator_scope"]


class VariableSynchronization(enum.Enum):
    """When a distributed variable is synchronized (tf.VariableSynchronization)."""

    AUTO = 0
    NONE = 1
    ON_WRITE = 2
    ON_READ = 3


class VariableAggregation(enum.Enum):
    """How per-replica values of a variable are combined (tf.VariableAggregation)."""

    NONE = 0
    SUM = 1
    MEAN = 2
    ONLY_FIRST_REPLICA = 3


_unique_ids = itertools.count()
_local = threading.local()


def _creator_stack() -> list[tuple[Any, Callable[[Variable], None]]]:
    if not hasattr(_local, "creators"):
        _local.creators = []
    return _local.creators


@contextlib.contextmanager
def variable_creator_scope(owner: Any, on_create: Callable[[Variable], None]) -> Iterator[None]:
    """Variables created inside belong to ``owner`` (a distribution strategy), which
    ``on_create(variable)`` is called with to mirror them (broadcast rank 0's initial
    value). Optimizer-owned variables (slots, ``iterations``) name their owner instead.
    """
    stack = _creator_stack()
    stack.append((owner, on_create))
    try:
        yield
    finally:
        stack.pop()


_FROM_SCOPE = object()


# --- autograd tracing: Variable reads return boxes while a loss is traced -----------------


def _trace_map() -> dict[int, Any] | None:
    return getattr(_local, "trace", None)


@contextlib.contextmanager
def trace_reads(boxes: dict[int, Any], used: set[int]) -> Iterator[None]:
    """While active, reading variable ``v`` with ``id(v) in boxes`` yields ``boxes[id(v)]``.

    Ids of the variables actually read are added to ``used`` (a variable never read
    has no gradient: ``None``, as in TF).
    """
    previous = getattr(_local, "trace", None), getattr(_local, "trace_used", None)
    _local.trace, _local.trace_used = boxes, used
    try:
        yield
    finally:
        _local.trace, _local.trace_used = previous


def register_with_autograd() -> None:
    """Let autograd primitives accept Variables as the boxes they stand for (idempotent)."""
    from autograd.tracer import Box

    Box.types.add(Variable)


def _to_dtype(dtype: Any) -> np.dtype:
    try:
        return np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"dtype={dtype!r} is not a numpy dtype") from err


def _initial_array(initial_value: Any, dtype: np.dtype | None) -> np.ndarray:
    if callable(initial_value):
        initial_value = initial_value()
    if isinstance(initial_value, Variable):
        initial_value = initial_value.numpy()
    if dtype is None and not isinstance(initial_value, np.ndarray | np.generic):
        probe = np.asarray(initial_value)
        # TF converts Python floats to float32 and Python ints to int32.
        if probe.dtype == np.float64:
            dtype = np.dtype(np.float32)
        elif probe.dtype == np.int64:
            dtype = np.dtype(np.int32)
    value = np.asarray(initial_value, dtype=dtype)
    if value.dtype == object:
        raise TypeError(f"initial_value={initial_value!r} is not numeric")
    if value.dtype.kind != "f" or value.ndim == 0:
        return np.array(value, order="C", copy=True)
    # floating-point tensors go back to back in the arena: a model's variables (and an
    # optimizer's slots) then form a few contiguous runs that one kernel call covers
    storage = default_arena.empty(value.shape, value.dtype)
    np.copyto(storage, value)
    return storage


class Variable:
    """A mutable numpy tensor with a name and distribution policies (tf.Variable).

    Args:
        initial_value: array-like, or a zero-argument callable returning one.
        name: the variable's name (default ``"Variable"``; names need not be unique).
        trainable: whether optimizers may update it. Defaults to ``True``, or to
            ``False`` for ``synchronization=ON_READ``.
        dtype: numpy dtype; by default taken from ``initial_value`` with Python
            floats as float32 and Python ints as int32, as in TF.
        synchronization: a :class:`VariableSynchronization`.
        aggregation: a :class:`VariableAggregation`.
        constraint: optional function applied after each optimizer update
            (``var.assign(constraint(var))``).

    Raises:
        ValueError: ``synchronization=ON_READ`` with ``trainable=True``, as in TF.
        TypeError: non-numeric initial value or a bad policy type.
    """

    __array_priority__ = 100

    def __init__(
        self,
        initial_value: Any,
        name: str | None = None,
        trainable: bool | None = None,
        dtype: Any = None,
        synchronization: VariableSynchronization = VariableSynchronization.AUTO,
        aggregation: VariableAggregation = VariableAggregation.NONE,
        constraint: Callable[[Any], Any] | None = None,
        *,
        _owner: Any = _FROM_SCOPE,
    ) -> None:
        if not isinstance(synchronization, VariableSynchronization):
            raise TypeError(
                f"synchronization={synchronization!r}; expected a VariableSynchronization"
            )
        if not isinstance(aggregation, VariableAggregation):
            raise TypeError(f"aggregation={aggregation!r}; expected a VariableAggregation")
        if synchronization is VariableSynchronization.ON_READ:
            if trainable:
                raise ValueError(
                    "Synchronization value can be set to VariableSynchronization.ON_READ only "
                    "for non-trainable variables. You have specified trainable=True and "
                    f"synchronization=VariableSynchronization.ON_READ (variable {name!r})."
                )
            trainable = False
        if constraint is not None and not callable(constraint):
            raise TypeError(f"constraint={constraint!r}; expected a callable or None")
        self._array = _initial_array(initial_value, None if dtype is None else _to_dtype(dtype))
        self._name = "Variable" if name is None else str(name)
        self._trainable = True if trainable is None else bool(trainable)
        self._synchronization = synchronization
        self._aggregation = aggregation
        self.constraint = constraint
        self._unique_id = next(_unique_ids)
        self._distribute_strategy = None if _owner is _FROM_SCOPE else _owner
        if _owner is _FROM_SCOPE and _creator_stack():
            self._distribute_strategy, on_create = _creator_stack()[-1]
            on_create(self)

    # --- properties --------------------------------------------------------------------
    name = property(lambda self: self._name, doc="The variable's name.")
    shape = property(lambda self: self._array.shape, doc="Shape tuple.")
    dtype = property(lambda self: self._array.dtype, doc="numpy dtype.")
    ndim = property(lambda self: self._array.ndim)
    size = property(lambda self: self._array.size)
    trainable = property(lambda self: self._trainable)
    synchronization = property(lambda self: self._synchronization)
    aggregation = property(lambda self: self._aggregation)
    distribute_strategy = property(
        lambda self: self._distribute_strategy,
        doc="The strategy whose ``scope()`` created the variable (None: created outside "
            "any scope); an optimizer's slots and iterations belong to the strategy of "
            "the variables it updates.")

    def _read(self) -> Any:
        trace = _trace_map()
        if trace is not None and id(self) in trace:
            _local.trace_used.add(id(self))
            return trace[id(self)]
        return self._array

    # While a loss is traced, autograd treats a Variable as the box standing for it (the
    # class is registered as a box type by ``register_with_autograd``); untraced, its
    # trace level -2 ranks below autograd's "no box" level -1, so primitives see the
    # plain Variable and read it through ``__array__``.
    @property
    def _trace(self) -> int:
        read = self._read()
        return -2 if read is self._array else read._trace

    @property
    def _node(self) -> Any:
        return self._read()._node

    @property
    def _value(self) -> Any:
        read = self._read()
        return read if read is self._array else read._value

    def numpy(self) -> np.ndarray:
        """A copy of the current value."""
        return self._array.copy()

    def value(self) -> Any:
        """The current value: a read-only view (an autograd box while a loss is traced)."""
        read = self._read()
        if read is self._array:
            read = self._array.view()
            read.flags.writeable = False
        return read

    read_value = value

    def _reject_while_traced(self, method: str) -> None:
        if _trace_map() is not None and id(self) in _trace_map():
            raise RuntimeError(f"{method} on variable {self._name!r} inside a traced loss")

    def _as_value(self, value: Any, method: str) -> np.ndarray:
        self._reject_while_traced(method)
        array = np.asarray(value.numpy() if isinstance(value, Variable) else value)
        if array.shape != self._array.shape:
            raise ValueError(
                f"{method}: value of shape {array.shape} for variable {self._name!r} "
                f"of shape {self._array.shape}"
            )
        if not np.can_cast(array.dtype, self._array.dtype, casting="same_kind"):
            raise TypeError(
                f"{method}: value of dtype {array.dtype} for variable {self._name!r} "
                f"of dtype {self._array.dtype}"
            )
        return array

    def assign(self, value: Any) -> Variable:
        """Write ``value`` into the variable's storage (shape must match)."""
        np.copyto(self._array, self._as_value(value, "assign"), casting="same_kind")
        return self

    def assign_add(self, delta: Any) -> Variable:
        """``self += delta`` in place."""
        np.add(self._array, self._as_value(delta, "assign_add"), out=self._array,
               casting="same_kind")
        return self

    def assign_sub(self, delta: Any) -> Variable:
        """``self -= delta`` in place."""
        np.subtract(self._array, self._as_value(delta, "assign_sub"), out=self._array,
                    casting="same_kind")
        return self

    def __repr__(self) -> str:
        return (f"<distsgd.Variable {self._name!r} shape={self.shape} dtype={self.dtype.name} "
                f"numpy={np.array2string(self._array, threshold=6)}>")

    # --- numpy interoperability ----------------------------------------------------------
    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy:
            return np.array(self._array, dtype=dtype, copy=True)
        view = self._array.view() if dtype is None else self._array.astype(dtype)
        view.flags.writeable = False
        return view

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if "out" in kwargs:
            return NotImplemented
        args = [x._read() if isinstance(x, Variable) else x for x in inputs]
        if _any_box(args):
            if method != "__call__":
                return NotImplemented
            return _autograd_function(ufunc.__name__)(*args, **kwargs)
        return getattr(ufunc, method)(*args, **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        args = _substitute(args)
        kwargs = _substitute(kwargs)
        if _any_box(args) or _any_box(list(kwargs.values())):
            return _autograd_function(func.__name__)(*args, **kwargs)
        return func(*args, **kwargs)

    def __getitem__(self, key: Any) -> Any:
        return self._read()[key]

    def __len__(self) -> int:
        return len(self._array)

    def __float__(self) -> float:
        return float(self._array)

    def __int__(self) -> int:
        return int(self._array)

    def __bool__(self) -> bool:
        return bool(self._array)

    @property
    def T(self) -> Any:
        return self._read().T

    def __neg__(self) -> Any:
        return np.negative(self)

    def __abs__(self) -> Any:
        return np.abs(self)

    def __pos__(self) -> Any:
        return self._read()


def _binary(ufunc: np.ufunc) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def forward(self: Variable, other: Any) -> Any:
        return ufunc(self, other)

    def reflected(self: Variable, other: Any) -> Any:
        return ufunc(other, self)

    return forward, reflected


for _name, _ufunc in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
    "floordiv": np.floor_divide, "mod": np.mod, "pow": np.power, "matmul": np.matmul,
}.items():
    _fwd, _rev = _binary(_ufunc)
    setattr(Variable, f"__{_name}__", _fwd)
    setattr(Variable, f"__r{_name}__", _rev)
for _name, _ufunc in {"lt": np.less, "le": np.less_equal, "gt": np.greater,
                      "ge": np.greater_equal}.items():
    setattr(Variable, f"__{_name}__", _binary(_ufunc)[0])
del _name, _ufunc, _fwd, _rev


def _substitute(obj: Any) -> Any:
    if isinstance(obj, Variable):
        return obj._read()
    if isinstance(obj, list | tuple):
        return type(obj)(_substitute(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _substitute(v) for k, v in obj.items()}
    return obj


def _any_box(values: Any) -> bool:
    if _trace_map() is None:
        return False
    from autograd.tracer import isbox

    return any(isbox(v) or (isinstance(v, list | tuple) and _any_box(v)) for v in values)


def _autograd_function(name: str) -> Callable[..., Any]:
    import autograd.numpy as anp

    function = getattr(anp, name, None)
    if function is None:
        raise TypeError(f"numpy.{name} has no autograd gradient; write the loss with "
                        "autograd.numpy operations")
    return function
