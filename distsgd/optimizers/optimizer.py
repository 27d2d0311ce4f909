"""The Keras OptimizerV2 base class: hyperparameters, slots, weights, config, apply flow.

One ``apply_gradients`` call, in order (nothing is modified before step 5):

1. validate every (gradient, variable) pair;
2. aggregate across replicas through the current strategy (identity in one process);
3. drop variables with no gradient anywhere (``ValueError`` if that is all of them);
   with ``skip_nonfinite_steps``, skip the whole step on every replica if any
   aggregated gradient holds NaN or inf;
4. evaluate the hyperparameters per variable dtype and clip the aggregated gradients
   (clipvalue, clipnorm per tensor, global_clipnorm);
5. create ``iterations`` and slots, run the in-place kernels (all dense updates of a
   dtype in one threaded call), ``iterations += 1``; then the strategy's periodic
   replica check, if configured.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from distsgd import clipping, kernels
from distsgd._validation import check_number
from distsgd.distribute.strategy import get_strategy
from distsgd.gradients import gradients
from distsgd.indexed_slices import IndexedSlices, deduplicate
from distsgd.optimizers import schedules as schedules_lib
from distsgd.timeline import timeline
from distsgd.variables import Variable, VariableAggregation, VariableSynchronization

__all__ = ["Optimizer"]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_ALLOWED_KWARGS = ("clipnorm", "clipvalue", "global_clipnorm", "lr", "decay")
#: Range rules for hyperparameters given as numbers: (low, high).
_HYPER_RANGES = {"learning_rate": (0.0, math.inf), "decay": (0.0, math.inf),
                 "momentum": (0.0, 1.0)}
_name_counts: dict[str, itertools.count] = {}

Gradient = np.ndarray | IndexedSlices
ApplyState = dict[np.dtype, dict[str, Any]]


def _unique_name(base: str) -> str:
    count = next(_name_counts.setdefault(base, itertools.count()))
    return base if count == 0 else f"{base}_{count}"


def _make_initial(initializer: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    if initializer in ("zeros", None):
        return np.zeros(shape, dtype=dtype)
    if initializer == "ones":
        return np.ones(shape, dtype=dtype)
    if isinstance(initializer, str):
        raise ValueError(f"initializer={initializer!r}; expected 'zeros', 'ones', a callable "
                         "(shape, dtype) -> array, or an initial value")
    if callable(initializer):
        return initializer(shape=shape, dtype=dtype)
    return initializer


class Optimizer:
    """Base class for optimizers with the tf.keras OptimizerV2 API.

    Subclasses set hyperparameters with :meth:`_set_hyper` and implement
    :meth:`_create_slots`, :meth:`_resource_apply_dense` and
    :meth:`_resource_apply_sparse`; :meth:`_prepare_local` may add per-dtype
    coefficients to ``apply_state``.

    Args:
        name: name prefix of the optimizer's variables; a falsy name becomes a unique
            lower-case one (``"sgd"``, ``"sgd_1"``, ...).
        **kwargs: ``clipnorm``, ``clipvalue``, ``global_clipnorm`` (each >= 0),
            ``lr`` (alias of ``learning_rate``, handled by the subclass) and ``decay``
            (>= 0: ``lr_t = lr / (1 + decay * iterations)``).

    Raises:
        TypeError: an unknown keyword argument.
        ValueError: a negative or non-finite kwarg, or ``clipnorm`` with ``global_clipnorm``.
    """

    def __init__(self, name: str | None, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            if key not in _ALLOWED_KWARGS:
                raise TypeError(f"Unexpected keyword argument passed to optimizer: {key}. "
                                f"Allowed kwargs are {list(_ALLOWED_KWARGS)}.")
            if key != "lr" and value is not None:
                check_number(key, value, low=0.0, what=f"{key} >= 0 (a finite number)")
        if kwargs.get("clipnorm") is not None and kwargs.get("global_clipnorm") is not None:
            raise ValueError("Cannot accept both `clipnorm` and `global_clipnorm`: "
                             f"clipnorm={kwargs['clipnorm']!r}, "
                             f"global_clipnorm={kwargs['global_clipnorm']!r}.")
        object.__setattr__(self, "_hyper", {})
        self._name = name if name else _unique_name(type(self).__name__.lower())
        self._hypers_created = False
        self._slots: dict[int, dict[str, Variable]] = {}
        self._slot_names: list[str] = []
        self._weights: list[Variable] = []
        self._iterations: Variable | None = None
        self._updater = kernels.DenseUpdater()
        self._initial_decay = kwargs.get("decay") or 0.0
        #: distsgd extension (not in the config): skip a step whose aggregated gradients
        #: hold NaN or inf, on every replica alike, and count it. Off by default: NaN
        #: propagates into the variables, as in Keras.
        self.skip_nonfinite_steps = False
        self.nonfinite_steps_skipped = 0
        self.clipnorm = kwargs.get("clipnorm")
        self.clipvalue = kwargs.get("clipvalue")
        self.global_clipnorm = kwargs.get("global_clipnorm")

    # --- hyperparameters ---------------------------------------------------------------
    def _set_hyper(self, name: str, value: Any) -> None:
        """Set hyperparameter ``name`` to a number, callable, schedule or variable.

        Once the hyperparameter variables exist, a number is assigned into the existing
        float32 variable, a schedule replaces it, and a plain callable is a TypeError
        (as in tf.keras).
        """
        dynamic = callable(value) or isinstance(value, Variable)
        if not dynamic:
            low, high = _HYPER_RANGES.get(name, (-math.inf, math.inf))
            check_number(name, value, low=low, high=high)
        previous = self._hyper.get(name)
        if isinstance(previous, Variable) and not dynamic:
            previous.assign(np.float32(value))
            return
        if isinstance(previous, Variable) and callable(value) and \
                not isinstance(value, schedules_lib.LearningRateSchedule):
            raise TypeError(f"{name}={value!r}: cannot replace the hyperparameter variable "
                            "with a callable once it exists (as in tf.keras)")
        self._hyper[name] = value

    def _create_hypers(self) -> None:
        if self._hypers_created:
            return
        self._hypers_created = True
        for name, value in sorted(self._hyper.items()):
            if not callable(value) and not isinstance(value, Variable):
                self._hyper[name] = self.add_weight(
                    name, shape=(), initializer=np.float32(value), trainable=False,
                    aggregation=VariableAggregation.ONLY_FIRST_REPLICA)

    def _get_hyper(self, name: str, dtype: Any = None) -> Any:
        """The hyperparameter's value (a schedule is returned as is), cast to ``dtype``."""
        self._create_hypers()
        value = self._hyper[name]
        if isinstance(value, schedules_lib.LearningRateSchedule):
            return value
        if callable(value) and not isinstance(value, Variable):
            value = value()
        if dtype is None:
            return value
        return _cast(value, np.dtype(dtype))

    def _serialize_hyperparameter(self, name: str) -> Any:
        value = self._hyper[name]
        if isinstance(value, schedules_lib.LearningRateSchedule):
            return schedules_lib.serialize(value)
        if callable(value) and not isinstance(value, Variable):
            value = value()
        if isinstance(value, Variable | np.ndarray | np.generic):
            return float(np.asarray(value))
        return value

    def __getattr__(self, name: str) -> Any:
        hyper = self.__dict__.get("_hyper", {})
        key = "learning_rate" if name == "lr" else name
        if key in hyper:
            return self._get_hyper(key)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        key = "learning_rate" if name == "lr" else name
        if key in self.__dict__.get("_hyper", {}):
            self._set_hyper(key, value)
        else:
            object.__setattr__(self, name, value)

    def _decayed_lr(self, dtype: np.dtype) -> np.generic:
        """``lr_t`` in ``dtype``: schedule(t) or lr, divided by ``1 + decay * t``."""
        lr_t = self._get_hyper("learning_rate", dtype)
        if isinstance(lr_t, schedules_lib.LearningRateSchedule):
            lr_t = _cast(lr_t(dtype.type(self._step_count())), dtype)
        if self._initial_decay > 0.0:
            step = dtype.type(self._step_count())
            lr_t = lr_t / (dtype.type(1) + self._get_hyper("decay", dtype) * step)
        return lr_t

    # --- variables the optimizer owns ----------------------------------------------------
    def _step_count(self) -> int:
        """``iterations`` as an int, without creating the variable (0 before it exists)."""
        return 0 if self._iterations is None else int(self._iterations._array)

    @property
    def iterations(self) -> Variable:
        """int64 variable: the number of ``apply_gradients`` calls made."""
        if self._iterations is None:
            self._iterations = self.add_weight(
                "iter", shape=(), dtype=np.int64, trainable=False,
                aggregation=VariableAggregation.ONLY_FIRST_REPLICA)
            self._weights.append(self._iterations)
        return self._iterations

    @iterations.setter
    def iterations(self, variable: Variable) -> None:
        if self._iterations is not None:
            raise RuntimeError("Cannot set `iterations` to a new Variable after the Optimizer "
                               "weights have been created")
        if not isinstance(variable, Variable) or variable.shape != () or \
                variable.dtype.kind not in "iu":
            raise TypeError(f"iterations={variable!r}; expected a scalar integer Variable")
        self._iterations = variable
        self._weights.append(variable)

    def add_weight(self, name: str, shape: Sequence[int], dtype: Any = None,
                   initializer: Any = "zeros", trainable: bool | None = None,
                   synchronization: VariableSynchronization = VariableSynchronization.AUTO,
                   aggregation: VariableAggregation = VariableAggregation.NONE) -> Variable:
        """Create a variable owned by the optimizer (not added to :attr:`weights`)."""
        dtype = np.dtype(np.float32 if dtype is None else dtype)
        initial = _make_initial(initializer, tuple(shape), dtype)
        return Variable(initial, name=f"{self._name}/{name}", trainable=trainable,
                        dtype=dtype, synchronization=synchronization, aggregation=aggregation,
                        _mirror=False)

    def add_slot(self, var: Variable, slot_name: str, initializer: Any = "zeros") -> Variable:
        """The slot ``slot_name`` of ``var``, created (shape and dtype of ``var``) if new."""
        if slot_name not in self._slot_names:
            self._slot_names.append(slot_name)
        slots = self._slots.setdefault(var._unique_id, {})
        if slot_name not in slots:
            initial = _make_initial(initializer, var.shape, var.dtype)
            slot = Variable(initial, name=f"{self._name}/{var.name}/{slot_name}",
                            trainable=False, dtype=var.dtype, _mirror=False)
            if slot.shape != var.shape:
                raise ValueError(f"slot {slot_name!r} initial value has shape {slot.shape}; "
                                 f"expected {var.shape}")
            slots[slot_name] = slot
            self._weights.append(slot)
        return slots[slot_name]

    def get_slot(self, var: Variable, slot_name: str) -> Variable:
        """The slot variable; ``KeyError`` if ``var`` has no slot of that name."""
        try:
            return self._slots[var._unique_id][slot_name]
        except (KeyError, AttributeError):
            raise KeyError(f"no slot {slot_name!r} for variable "
                           f"{getattr(var, 'name', var)!r}") from None

    def get_slot_names(self) -> list[str]:
        """Names of the slots this optimizer has created (``['momentum']`` for SGD)."""
        return self._slot_names

    @property
    def weights(self) -> list[Variable]:
        """``[iterations] + slots`` in creation order (hyperparameters excluded)."""
        return self._weights

    def variables(self) -> list[Variable]:
        """The same list as :attr:`weights`."""
        return self._weights

    def get_weights(self) -> list[np.ndarray]:
        """Copies of :attr:`weights` values."""
        return [w.numpy() for w in self._weights]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Assign values to :attr:`weights` (cast to each dtype); all checked first."""
        params = self._weights
        if len(params) != len(weights):
            raise ValueError(
                f"You called `set_weights(weights)` on optimizer {self._name} with a weight "
                f"list of length {len(weights)}, but the optimizer was expecting "
                f"{len(params)} weights. Provided weights: {str(weights)[:50]}...")
        arrays = []
        for i, (param, weight) in enumerate(zip(params, weights, strict=True)):
            array = np.asarray(weight)
            if array.shape != param.shape:
                raise ValueError(f"Optimizer weight shape {param.shape} not compatible with "
                                 f"provided weight shape {array.shape} (weights[{i}], "
                                 f"{param.name!r})")
            arrays.append(array.astype(param.dtype))
        for param, array in zip(params, arrays, strict=True):
            np.copyto(param._array, array)

    # --- the apply flow ------------------------------------------------------------------
    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Variable]],
                        name: str | None = None,
                        experimental_aggregate_gradients: bool = True) -> Variable:
        """Apply gradients to variables; returns :attr:`iterations` (incremented).

        Args:
            grads_and_vars: (gradient, variable) pairs; a gradient is an array-like of
                the variable's shape and dtype, an :class:`IndexedSlices`, or ``None``.
            name: unused (kept for tf.keras compatibility).
            experimental_aggregate_gradients: ``False`` skips cross-replica aggregation
                (the gradients are already aggregated).

        Raises:
            TypeError: malformed ``grads_and_vars`` or a gradient of the wrong dtype.
            ValueError: a shape mismatch, bad sparse indices, a non-float variable, or no
                gradient for any variable.
        """
        del name
        pairs = _validate_grads_and_vars(grads_and_vars)
        grads = [g for g, _ in pairs]
        if experimental_aggregate_gradients:
            with timeline.span("aggregate"):
                grads = get_strategy()._aggregate_gradients(pairs, self._step_count())
        pairs = _filter_grads(list(zip(grads, (v for _, v in pairs), strict=True)))
        if self.skip_nonfinite_steps and get_strategy()._any_replica(
                not all(_finite(g) for g, _ in pairs), "non-finite gradient check"):
            self.nonfinite_steps_skipped += 1
            warnings.warn(f"non-finite gradient: step skipped on every replica "
                          f"({self.nonfinite_steps_skipped} so far)", stacklevel=2)
            return self.iterations
        with timeline.span("update"):
            iterations = self._apply(pairs)
        get_strategy()._after_apply(self, [v for _, v in pairs])
        return iterations

    def _apply(self, pairs: list[tuple[Gradient, Variable]]) -> Variable:
        apply_state = self._prepare(pairs)
        pairs = self._clip(pairs)

        var_list = [v for _, v in pairs]
        self._create_hypers()
        iterations = self.iterations
        self._create_slots(var_list)
        # each variable once: all dense updates in one batch; a variable listed twice gets
        # sequential updates, in order
        batched = len({id(v) for v in var_list}) == len(var_list)
        if batched:
            self._apply_dense_batch([(g, v) for g, v in pairs
                                     if not isinstance(g, IndexedSlices)], apply_state)
        for grad, var in pairs:
            if isinstance(grad, IndexedSlices):
                self._resource_apply_sparse_duplicate_indices(grad.values, var, grad.indices,
                                                              apply_state)
                continue
            if not batched:
                self._resource_apply_dense(grad, var, apply_state)
            if var.constraint is not None:
                var.assign(var.constraint(var))
        iterations._array += 1
        return iterations

    def _apply_dense_batch(self, pairs: list[tuple[np.ndarray, Variable]],
                           apply_state: ApplyState) -> None:
        """All dense updates of a step (distinct variables); override to fuse them."""
        for grad, var in pairs:
            self._resource_apply_dense(grad, var, apply_state)

    def _prepare(self, pairs: Sequence[tuple[Gradient, Variable]]) -> ApplyState:
        apply_state: ApplyState = {}
        for _, var in pairs:
            if var.dtype not in apply_state:
                apply_state[var.dtype] = {}
                self._prepare_local(var.dtype, apply_state)
        return apply_state

    def _prepare_local(self, var_dtype: np.dtype, apply_state: ApplyState) -> None:
        """Fill ``apply_state[var_dtype]`` with this step's coefficients (``lr_t``)."""
        lr_t = self._decayed_lr(var_dtype)
        if not np.isfinite(lr_t) or lr_t < 0:
            raise ValueError(f"learning rate evaluated to {float(lr_t)!r} at iterations="
                             f"{self._step_count()}; expected a finite number >= 0")
        apply_state[var_dtype]["lr_t"] = lr_t

    def _clip(self, pairs: list[tuple[Gradient, Variable]]) -> list[tuple[Gradient, Variable]]:
        grads = [g for g, _ in pairs]
        if self.clipvalue is not None:
            grads = [clipping.clip_by_value(g, self.clipvalue) for g in grads]
        if self.clipnorm is not None:
            grads = [clipping.clip_by_norm(g, self.clipnorm) for g in grads]
        if self.global_clipnorm is not None:
            grads = clipping.clip_by_global_norm(grads, self.global_clipnorm)
        return list(zip(grads, (v for _, v in pairs), strict=True))

    def _resource_apply_sparse_duplicate_indices(self, values: np.ndarray, var: Variable,
                                                 indices: np.ndarray,
                                                 apply_state: ApplyState) -> None:
        summed, unique = deduplicate(values, indices)
        self._resource_apply_sparse(summed, var, unique, apply_state)

    # --- subclass hooks ------------------------------------------------------------------
    def _create_slots(self, var_list: list[Variable]) -> None:
        """Create the slots the update needs (called on every apply; add_slot is idempotent)."""

    def _resource_apply_dense(self, grad: np.ndarray, var: Variable,
                              apply_state: ApplyState) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _resource_apply_dense")

    def _resource_apply_sparse(self, grad: np.ndarray, var: Variable, indices: np.ndarray,
                               apply_state: ApplyState) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _resource_apply_sparse")

    # --- gradients from a loss -----------------------------------------------------------
    def minimize(self, loss: Callable[[], Any],
                 var_list: Sequence[Variable] | Callable[[], Sequence[Variable]],
                 grad_loss: Any = None, name: str | None = None) -> Variable:
        """Compute gradients of ``loss()`` with autograd and apply them.

        ``loss`` is a zero-argument callable written with ``autograd.numpy`` (or
        Variable operators); a non-scalar loss is summed, or weighted by ``grad_loss``.
        A callable ``var_list`` is evaluated after a first call of ``loss``.
        """
        return self.apply_gradients(self._compute_gradients(loss, var_list, grad_loss), name)

    def get_gradients(self, loss: Callable[[], Any], params: Sequence[Variable]) -> list[Any]:
        """Gradients of ``loss()`` w.r.t. ``params``, clipped as configured.

        Raises:
            ValueError: a parameter has no gradient (the loss does not use it).
        """
        pairs = self._compute_gradients(loss, params)
        for grad, param in pairs:
            if grad is None:
                raise ValueError(f"Variable {param.name!r} has `None` for gradient. Please make "
                                 "sure that all of your ops have a gradient defined (i.e. are "
                                 "differentiable) and that the loss uses the variable.")
        return [g for g, _ in self._clip(pairs)]

    def get_updates(self, loss: Callable[[], Any], params: Sequence[Variable]) -> list[Variable]:
        """``[apply_gradients(zip(get_gradients(loss, params), params))]``."""
        grads = self.get_gradients(loss, params)
        return [self.apply_gradients(list(zip(grads, params, strict=True)))]

    def _compute_gradients(self, loss: Callable[[], Any], var_list: Any,
                           grad_loss: Any = None) -> list[tuple[Any, Variable]]:
        if callable(var_list) and callable(loss):
            loss()  # variables created lazily by the loss exist after a first call
            var_list = var_list()
        var_list = list(_flatten(var_list))
        return list(zip(gradients(loss, var_list, grad_loss), var_list, strict=True))

    # --- config --------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """``{'name': ...}`` plus each clip option that is set (subclasses add the rest)."""
        config: dict[str, Any] = {"name": self._name}
        for key in ("clipnorm", "clipvalue", "global_clipnorm"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any],
                    custom_objects: dict[str, Any] | None = None) -> Optimizer:
        """Create an optimizer from :meth:`get_config`'s output (schedules included)."""
        config = dict(config)
        if "lr" in config:
            config["learning_rate"] = config.pop("lr")
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules_lib.deserialize(config["learning_rate"],
                                                                custom_objects)
        return cls(**config)


def _cast(value: Any, dtype: np.dtype) -> np.generic:
    """Cast a hyperparameter to ``dtype`` the way TF does (Python floats via float32)."""
    if isinstance(value, Variable):
        value = value._array
    elif isinstance(value, float | int) and not isinstance(value, np.generic):
        value = np.float32(value)
    return np.asarray(value).astype(dtype)[()]


def _finite(grad: Gradient) -> bool:
    """No NaN or inf in ``grad``: one float64 sum (NaN and inf survive it), no copy."""
    values = grad.values if isinstance(grad, IndexedSlices) else grad
    return bool(np.isfinite(np.add.reduce(values.reshape(-1), dtype=np.float64)))


def _flatten(items: Any) -> Iterable[Any]:
    if isinstance(items, list | tuple):
        for item in items:
            yield from _flatten(item)
    else:
        yield items


def _validate_grads_and_vars(grads_and_vars: Any) -> list[tuple[Gradient | None, Variable]]:
    """Check every pair and convert gradients to contiguous arrays; raises before any change."""
    try:
        items = tuple(grads_and_vars)
    except TypeError:
        raise TypeError(f"grads_and_vars={grads_and_vars!r}; expected an iterable of "
                        "(gradient, variable) pairs") from None
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(f"grads_and_vars[{i}]={item!r}; expected a (gradient, variable) "
                            "pair")
        grad, var = item
        if not isinstance(var, Variable):
            raise TypeError(f"grads_and_vars[{i}] variable is {var!r}; expected a "
                            "distsgd.Variable")
        if var.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"Invalid type {var.dtype} for variable {var.name!r}, expected: "
                             f"{[d.name for d in _FLOAT_DTYPES]}.")
        pairs.append((_validate_gradient(grad, var, i), var))
    return pairs


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


def _validate_gradient(grad: Any, var: Variable, i: int) -> Gradient | None:
    if grad is None:
        return None
    if type(grad) is np.ndarray and grad.dtype == var.dtype and grad.shape == var.shape \
            and grad.flags.c_contiguous:
        return grad  # the common case, checked without building any message
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


def _filter_grads(pairs: list[tuple[Gradient | None, Variable]]
                  ) -> list[tuple[Gradient, Variable]]:
    filtered = [(g, v) for g, v in pairs if g is not None]
    if pairs and not filtered:
        raise ValueError(f"No gradients provided for any variable: {[v.name for _, v in pairs]}.")
    missing = [v.name for g, v in pairs if g is None]
    if missing:
        warnings.warn(f"Gradients do not exist for variables {missing} when minimizing the loss.",
                      stacklevel=3)
    return filtered
