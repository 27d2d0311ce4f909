"""The Keras OptimizerV2 base class: hyperparameters, slots, weights, config, apply flow.

One ``apply_gradients`` call, in order (nothing is modified before step 5):

1. validate every (gradient, variable) pair (:mod:`~distsgd.optimizers.validation`);
2. agree with the other replicas on what moves (signature check; see
   :mod:`~distsgd.distribute.aggregation`): the aggregation plan, cached per variable
   list, with the dense gradients cut into chunks;
3. drop variables with no gradient anywhere (``ValueError`` if that is all of them);
4. evaluate the hyperparameters per variable dtype (errors raise here);
5. create ``iterations`` and slots on first use, then, streaming: pack, reduce, clip
   by value and apply each chunk while it is in cache, one kernel call per run of
   contiguous variable memory (:mod:`~distsgd.optimizers.segments`), then the sparse
   gradients; ``iterations += 1``; then the strategy's periodic replica check.

Clipping by norm and ``skip_nonfinite_steps`` need every aggregated gradient before
any update, as does an optimizer whose update is not element-wise: those steps
aggregate everything first (into the plan's bucket buffers), then clip, check and
apply the same chunked kernels.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distsgd import clipping, kernels
from distsgd._validation import check_number
from distsgd.distribute.aggregation import (
    _DENSE,
    AggregationPlan,
    GradientAggregator,
)
from distsgd.distribute.comm import SerialCommunicator
from distsgd.distribute.fusion import (
    DEFAULT_FUSION_THRESHOLD_BYTES,
    Chunk,
    stream_chunks,
)
from distsgd.distribute.strategy import get_strategy
from distsgd.gradients import GradientBuffer, gradients
from distsgd.indexed_slices import IndexedSlices, deduplicate
from distsgd.optimizers import schedules as schedules_lib
from distsgd.optimizers.segments import Segment, chunk_sources, plan_segments
from distsgd.optimizers.validation import FLOAT_DTYPES, PairValidator
from distsgd.timeline import timeline
from distsgd.variables import Variable, VariableAggregation, VariableSynchronization

__all__ = ["Optimizer"]

#: Below this many elements a step's update runs on the calling thread alone.
PARALLEL_MIN_ELEMENTS = 1 << 18
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
        self._validator = PairValidator()
        # where minimize() writes the gradients of its last variable list
        self._minimize_buffer: GradientBuffer | None = None
        # already aggregated gradients (and one process) are planned without collectives
        self._local_aggregator = GradientAggregator(
            SerialCommunicator(), fusion_threshold_bytes=DEFAULT_FUSION_THRESHOLD_BYTES,
            sparse_as_dense=False)
        self._token = object()  # this optimizer's key in plans' user_data
        self._num_threads = kernels.default_num_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._scratch = [kernels.ScratchBuffers() for _ in range(self._num_threads)]
        self._chunk_buffers = [kernels.ScratchBuffers() for _ in range(self._num_threads)]
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
        checked = self._validator(grads_and_vars)
        strategy = get_strategy()
        aggregator = strategy._gradient_aggregator() if experimental_aggregate_gradients \
            else self._local_aggregator
        grads = aggregator.local_form(checked.grads, checked.variables)
        with timeline.span("aggregate"):
            plan = aggregator.agree(grads, checked.variables, self._step_count(),
                                    checked.all_dense)
        updated = _updated_variables(plan, checked.variables)
        if self._streams(plan, checked.variables):
            # aggregate and update chunk by chunk: each reduced chunk is applied in cache
            apply_state = self._prepare(_dtypes(plan, updated))
            state = self._stream_state(plan, checked.variables, updated)
            grads = aggregator.densified(plan, grads, checked.variables)
            sources = None
            if checked.buffer is not None and not plan.densify:
                sources = state.sources.get(checked.buffer)
                if sources is None:  # (the plan forgets the buffer when it is gone)
                    sources = state.sources[checked.buffer] = chunk_sources(
                        plan.chunks, checked.grads)
            self._stream_update(plan, state.segments, grads, apply_state,
                                functools.partial(aggregator.reduce_chunk_, plan)
                                if aggregator.distributed else None,
                                checked.all_dense, self.clipvalue, sources)
            with timeline.span("aggregate"):
                gathered = aggregator.gather_sparse(plan, grads, checked.variables)
            with timeline.span("update"):
                self._apply_sparse(plan, grads, gathered, checked.variables, apply_state)
                for var in state.constrained:
                    var.assign(var.constraint(var))
                self.iterations._array += 1
        else:
            with timeline.span("aggregate"):
                grads = aggregator.reduce_planned(plan, grads, checked.variables)
            pairs = [(g, v) for g, v in zip(grads, checked.variables, strict=True)
                     if g is not None]
            if self.skip_nonfinite_steps and strategy._any_replica(
                    not all(_finite(g) for g, _ in pairs), "non-finite gradient check"):
                self.nonfinite_steps_skipped += 1
                warnings.warn(f"non-finite gradient: step skipped on every replica "
                              f"({self.nonfinite_steps_skipped} so far)", stacklevel=2)
                return self.iterations
            with timeline.span("update"):
                self._apply(pairs)
        strategy._after_apply(self, updated)
        return self.iterations

    def _streams(self, plan: AggregationPlan, variables: Sequence[Variable]) -> bool:
        """Whether this step can update each chunk as it is reduced: an element-wise
        update, no clipping by norms (they need every gradient first), no non-finite
        check, and each variable listed once."""
        return (self._flat_slot_names() is not None and self.clipnorm is None
                and self.global_clipnorm is None and not self.skip_nonfinite_steps
                and _distinct(variables, plan))

    def _stream_state(self, plan: AggregationPlan, variables: Sequence[Variable],
                      updated: list[Variable]) -> _StreamState:
        """This optimizer's per-plan data: slots made, segments planned (first use)."""
        state = plan.user_data.get(self._token)
        if state is None:
            self._create_hypers()
            _ = self.iterations
            self._create_slots(updated)
            names = self._flat_slot_names() or []
            arrays = [None if kind != _DENSE else
                      (var._array, *(self.get_slot(var, n)._array for n in names))
                      for var, kind in zip(variables, plan.kinds, strict=True)]
            state = plan.user_data[self._token] = _StreamState(
                plan_segments(plan.chunks, arrays),
                [v for v in updated if v.constraint is not None])
        return state

    def _stream_update(self, plan: AggregationPlan, segments: list[list[Segment]],
                       grads: Sequence[Any], apply_state: ApplyState,
                       reduce: Callable[[Chunk, np.ndarray], None] | None, all_dense: bool,
                       clipvalue: float | None,
                       sources: Sequence[np.ndarray | None] | None = None) -> None:
        """Pack (unless in place), reduce (``reduce``), clip by ``clipvalue`` (unless None)
        and apply each chunk."""

        def on_chunk(chunk: Chunk, grad: np.ndarray, offset: int, worker: int) -> None:
            coefficients = apply_state[chunk.bucket.dtype]
            if clipvalue is not None:
                limit = grad.dtype.type(clipvalue)
                np.minimum(grad, limit, out=grad)
                np.maximum(grad, -limit, out=grad)
            scratch = self._scratch[worker]
            end = offset + grad.size
            for segment in segments[chunk.index]:
                if offset <= segment.low and segment.high <= end:  # the common case
                    self._update_flat_(segment.var, segment.slots,
                                       grad[segment.low - offset:segment.high - offset],
                                       coefficients, scratch)
                elif segment.low < end and offset < segment.high:
                    low, high = max(segment.low, offset), min(segment.high, end)
                    part = slice(low - segment.low, high - segment.low)
                    self._update_flat_(segment.var[part], tuple(s[part] for s in segment.slots),
                                       grad[low - offset:high - offset], coefficients, scratch)

        workers = self._num_threads if plan.dense_elements >= PARALLEL_MIN_ELEMENTS else 1
        if workers > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self._num_threads - 1,
                                            thread_name_prefix="distsgd-update")
        with timeline.span("update"):  # chunks' packing and reduction: their own spans
            stream_chunks(plan.chunks, grads, on_chunk, reduce=reduce,
                          writable=clipvalue is not None, pool=self._pool, workers=workers,
                          buffers=self._chunk_buffers, any_none=not all_dense,
                          sources=sources)

    def _apply_sparse(self, plan: AggregationPlan, grads: Sequence[Any],
                      gathered: dict[int, IndexedSlices], variables: Sequence[Variable],
                      apply_state: ApplyState) -> None:
        for position in plan.sparse_positions:
            grad = gathered.get(position, grads[position])
            if self.clipvalue is not None:
                grad = clipping.clip_by_value(grad, self.clipvalue)
            self._resource_apply_sparse_duplicate_indices(
                grad.values, variables[position], grad.indices, apply_state)

    def _apply(self, pairs: list[tuple[Gradient, Variable]]) -> Variable:
        """Apply already aggregated gradients (clipped here), all validated."""
        apply_state = self._prepare({v.dtype for _, v in pairs})
        pairs = self._clip(pairs)
        var_list = [v for _, v in pairs]
        self._create_hypers()
        iterations = self.iterations
        self._create_slots(var_list)
        dense = [(g, v) for g, v in pairs if not isinstance(g, IndexedSlices)]
        if self._flat_slot_names() is not None and len({id(v) for v in var_list}) == len(pairs):
            # each variable once: all dense updates as chunks over contiguous memory
            grads = tuple(g for g, _ in dense)
            variables = tuple(v for _, v in dense)
            plan = self._local_aggregator.agree(grads, variables, all_dense=True)
            state = self._stream_state(plan, variables, list(variables))
            # already clipped above: no second clip (nor the copy it would force)
            self._stream_update(plan, state.segments, grads, apply_state, None, True, None)
        else:  # a variable listed twice gets sequential updates, in order
            for grad, var in dense:
                self._resource_apply_dense(grad, var, apply_state)
        for grad, var in pairs:
            if isinstance(grad, IndexedSlices):
                self._resource_apply_sparse_duplicate_indices(grad.values, var, grad.indices,
                                                              apply_state)
            elif var.constraint is not None:
                var.assign(var.constraint(var))
        iterations._array += 1
        return iterations

    def _prepare(self, dtypes: Iterable[np.dtype]) -> ApplyState:
        """This step's coefficients per variable dtype (hyperparameters evaluated here)."""
        apply_state: ApplyState = {}
        for dtype in sorted(dtypes, key=str):
            apply_state[dtype] = {}
            self._prepare_local(dtype, apply_state)
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

    def _flat_slot_names(self) -> list[str] | None:
        """The slots :meth:`_update_flat_` reads and writes, in order; None (the default)
        means the update is not element-wise, so each tensor goes through
        :meth:`_resource_apply_dense` after the whole aggregation."""
        return None

    def _update_flat_(self, var: np.ndarray, slots: tuple[np.ndarray, ...], grad: np.ndarray,
                      coefficients: dict[str, Any], scratch: kernels.ScratchBuffers) -> None:
        """Update 1-D ``var`` and ``slots`` in place from ``grad`` (the same length): any
        run of elements, possibly spanning several variables of one dtype."""
        raise NotImplementedError(f"{type(self).__name__} must implement _update_flat_")

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

        The gradients are written into a :class:`~distsgd.GradientBuffer` that the
        optimizer keeps for its last ``var_list`` (the same variables, in order), so a
        step allocates no gradient copies and reduces them where they lie.
        """
        variables = _resolve_var_list(loss, var_list)
        buffer = self._minimize_buffer
        if buffer is None or not buffer.is_for(variables):
            buffer = None
            if variables and all(type(v) is Variable and v.dtype in FLOAT_DTYPES
                                 for v in variables):
                buffer = self._minimize_buffer = GradientBuffer(variables)
        if buffer is None:  # the pair-by-pair path names what is wrong
            return self.apply_gradients(_paired(loss, variables, grad_loss), name)
        gradients(loss, variables, grad_loss, out=buffer)
        return self.apply_gradients(buffer, name)

    def get_gradients(self, loss: Callable[[], Any], params: Sequence[Variable]) -> list[Any]:
        """Gradients of ``loss()`` w.r.t. ``params``, clipped as configured.

        Raises:
            ValueError: a parameter has no gradient (the loss does not use it).
        """
        pairs = _paired(loss, _resolve_var_list(loss, params))
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


def _resolve_var_list(loss: Callable[[], Any], var_list: Any) -> list[Any]:
    """``var_list`` as a flat list; a callable one is evaluated after a first call of
    ``loss`` (which creates variables made lazily)."""
    if callable(var_list) and callable(loss):
        loss()
        var_list = var_list()
    return list(_flatten(var_list))


def _paired(loss: Callable[[], Any], variables: list[Any],
            grad_loss: Any = None) -> list[tuple[Any, Variable]]:
    """``(gradient, variable)`` pairs of ``loss()``, the gradients as new arrays."""
    return list(zip(gradients(loss, variables, grad_loss), variables, strict=True))


def _flatten(items: Any) -> Iterable[Any]:
    if isinstance(items, list | tuple):
        for item in items:
            yield from _flatten(item)
    else:
        yield items


@dataclass
class _StreamState:
    """An optimizer's data for one aggregation plan: where each chunk lands."""

    segments: list[list[Segment]]
    constrained: list[Variable]
    #: per GradientBuffer passed with the plan, the chunks it holds in place
    sources: weakref.WeakKeyDictionary[Any, list[np.ndarray | None]] = field(
        default_factory=weakref.WeakKeyDictionary)


def _updated_variables(plan: AggregationPlan, variables: Sequence[Variable]) -> list[Variable]:
    """The variables some rank has a gradient for; warns about the others, as TF does.

    Raises:
        ValueError: no variable has a gradient.
    """
    updated = plan.user_data.get("updated")
    if updated is None:
        updated = plan.user_data["updated"] = [
            v for v, kind in zip(variables, plan.kinds, strict=True) if kind is not None]
    if len(updated) == len(variables):
        return updated
    if not updated:
        raise ValueError(f"No gradients provided for any variable: {[v.name for v in variables]}.")
    missing = [v.name for v, kind in zip(variables, plan.kinds, strict=True) if kind is None]
    warnings.warn(f"Gradients do not exist for variables {missing} when minimizing the loss.",
                  stacklevel=3)
    return updated


def _dtypes(plan: AggregationPlan, updated: Sequence[Variable]) -> set[np.dtype]:
    """The dtypes of the updated variables (cached with the plan)."""
    dtypes = plan.user_data.get("dtypes")
    if dtypes is None:
        dtypes = plan.user_data["dtypes"] = {v.dtype for v in updated}
    return dtypes


def _distinct(variables: Sequence[Variable], plan: AggregationPlan) -> bool:
    """Each variable appears once (cached with the plan)."""
    distinct = plan.user_data.get("distinct")
    if distinct is None:
        distinct = plan.user_data["distinct"] = len({id(v) for v in variables}) == len(variables)
    return distinct
