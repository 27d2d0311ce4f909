"""The Keras OptimizerV2 base class: hyperparameters, slots, weights, config, apply flow.

One ``apply_gradients`` call, in order (nothing is modified before step 4):

1. validate every (gradient, variable) pair (:mod:`~distsgd.optimizers.validation`);
2. find the strategy from the variables (never from the active scope; see
   :func:`~distsgd.distribute.strategy_of`): mixing strategies raises here;
3. one call into the strategy's aggregator, the owner of the step's collectives
   (:meth:`~distsgd.distribute.aggregation.GradientAggregator.reduce`). Once every
   rank agreed on what moves, this optimizer drops the variables with no gradient
   anywhere (``ValueError`` if that is all of them), evaluates the hyperparameters per
   variable dtype and creates ``iterations`` and slots on first use;
4. streamed (an element-wise update, no clipping by norm, no non-finite check, each
   variable listed once): each reduced chunk is clipped by value and applied while in
   cache by the update engine (:mod:`~distsgd.optimizers.engine`), one kernel call per
   run of contiguous variable memory, then the sparse gradients, in order. Otherwise
   the aggregated gradients are kept, clipped, checked, and applied tensor by tensor
   in list order through the ``_resource_apply_*`` hooks;
5. constraints, then ``iterations += 1``.
"""

from __future__ import annotations

import operator
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distsgd import clipping, kernels
from distsgd._validation import check_number
from distsgd.distribute import StepPlan, get_strategy, has_strategy, strategy_of
from distsgd.distribute.aggregation import ChunkPart
from distsgd.distribute.plans import Kind
from distsgd.gradients import GradientBuffer
from distsgd.indexed_slices import IndexedSlices, deduplicate
from distsgd.optimizers import schedules as schedules_lib
from distsgd.optimizers.engine import Segment, UpdateEngine, plan_segments
from distsgd.optimizers.hyperparameters import HyperparameterMixin, unique_name
from distsgd.optimizers.losses import LossMixin
from distsgd.optimizers.validation import validate_pairs
from distsgd.optimizers.weights import WeightsMixin
from distsgd.variables import Variable

__all__ = ["ApplyState", "Optimizer"]

_ALLOWED_KWARGS = ("clipnorm", "clipvalue", "global_clipnorm", "lr", "decay")
_unique_id = operator.attrgetter("_unique_id")

Gradient = np.ndarray | IndexedSlices
#: per variable dtype, this step's coefficients (``lr_t``, and the subclass's own)
ApplyState = dict[np.dtype, dict[str, Any]]


class Optimizer(HyperparameterMixin, WeightsMixin, LossMixin):
    """Base class for optimizers with the tf.keras OptimizerV2 API.

    **Subclass contract.** Set hyperparameters in ``__init__`` with :meth:`_set_hyper`
    and implement:

    - :meth:`_create_slots` (``var_list``): create slots with :meth:`add_slot`;
    - :meth:`_prepare_local` (``var_dtype, apply_state``): add this step's coefficients
      for ``var_dtype`` to ``apply_state[var_dtype]`` (call ``super()`` for ``lr_t``);
    - :meth:`_resource_apply_dense` (``grad, var, apply_state``) and
      :meth:`_resource_apply_sparse` (``grad, var, indices, apply_state``, unique
      indices): update one variable in place (``var._array``, slots' ``_array``).

    To get the fused, streamed distributed path (each reduced chunk applied while in
    cache, over many tensors per call), also implement, for an element-wise update:

    - :meth:`_elementwise_slot_names`: the slots the update reads and writes, in order;
    - :meth:`_update_flat_` (``var, slots, grad, coefficients, scratch``): update 1-D
      ``var`` and ``slots`` in place from ``grad``, element by element. It is called on
      any run of elements, possibly spanning several variables of one dtype, and from
      several threads at once on disjoint runs; ``coefficients`` is
      ``apply_state[dtype]``, ``scratch`` a reusable work-array pool of the thread.

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
        self._name = name if name else unique_name(type(self).__name__.lower())
        self._hypers_created = False
        self._slots: dict[int, dict[str, Variable]] = {}
        self._slot_names: list[str] = []
        self._weights: list[Variable] = []
        self._iterations: Variable | None = None
        # the strategy whose variables this optimizer updates: the one whose scope it
        # was created in, else that of the variables of its first step
        self._strategy = get_strategy() if has_strategy() else None
        self._last_strategy: tuple[Any, tuple[int, ...], Any, bool] | None = None
        self._plans: OrderedDict[StepPlan, _PlanData] = OrderedDict()
        self._minimize_buffer: GradientBuffer | None = None  # minimize()'s gradients
        self._accumulator: Any = None  # minimize()'s, for micro-batches
        self._overlap_minimize = False
        self._engine = UpdateEngine(self._update_flat_)
        self._initial_decay = kwargs.get("decay") or 0.0
        #: distsgd extension (not in the config): skip a step whose aggregated gradients
        #: hold NaN or inf, on every replica alike, and count it. Off by default: NaN
        #: propagates into the variables, as in Keras.
        self.skip_nonfinite_steps = False
        self.nonfinite_steps_skipped = 0
        self.clipnorm = kwargs.get("clipnorm")
        self.clipvalue = kwargs.get("clipvalue")
        self.global_clipnorm = kwargs.get("global_clipnorm")

    # --- the apply flow ------------------------------------------------------------------
    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Variable]],
                        name: str | None = None,
                        experimental_aggregate_gradients: bool = True) -> Variable:
        """Apply gradients to variables; returns :attr:`iterations` (incremented).

        Args:
            grads_and_vars: (gradient, variable) pairs, or a :class:`~distsgd.GradientBuffer`;
                a gradient is an array-like of the variable's shape and dtype, an
                :class:`IndexedSlices`, or ``None``.
            name: unused (kept for tf.keras compatibility).
            experimental_aggregate_gradients: ``False`` skips cross-replica aggregation
                (the gradients are already aggregated).

        Raises:
            TypeError: malformed ``grads_and_vars`` or a gradient of the wrong dtype.
            ValueError: a shape mismatch, bad sparse indices, a non-float variable, no
                gradient for any variable, or variables of another strategy.
        """
        del name
        checked = validate_pairs(grads_and_vars)
        strategy, distinct = self._strategy_for(checked.variables, "apply_gradients")
        streamed = self._elementwise_slot_names() is not None and self.clipnorm is None \
            and self.global_clipnorm is None and not self.skip_nonfinite_steps and distinct
        consumer = _StreamedUpdate(self, checked.variables) if streamed else None
        reduction = strategy.aggregator.reduce(
            checked.grads, checked.variables, step=self._step_count(),
            all_dense=checked.all_dense, buffer=checked.buffer, consumer=consumer,
            aggregate=experimental_aggregate_gradients,
            check_finite=self.skip_nonfinite_steps,
            replica_state=lambda: (*checked.variables, *self._weights),
            accumulator=checked.accumulator)
        if consumer is not None:
            data, apply_state = consumer.data, consumer.apply_state
            for position in reduction.plan.sparse:
                grad = reduction.sparse[position]
                if self.clipvalue is not None:
                    grad = clipping.clip_by_value(grad, self.clipvalue)
                self._resource_apply_sparse_duplicate_indices(
                    grad.values, checked.variables[position], grad.indices, apply_state)
        else:
            data = self._plan_data(reduction.plan, checked.variables)
            apply_state = self._prepare(data.dtypes)
            if reduction.finite is False:
                self.nonfinite_steps_skipped += 1
                warnings.warn(f"non-finite gradient: step skipped on every replica "
                              f"({self.nonfinite_steps_skipped} so far)", stacklevel=2)
                return self.iterations
            self._create_state(data.updated)
            positions = reduction.plan.updated
            grads = self._clip([reduction.dense[i] if reduction.plan.kinds[i] is Kind.DENSE
                                else reduction.sparse[i] for i in positions])
            for position, grad in zip(positions, grads, strict=True):
                var = checked.variables[position]
                if isinstance(grad, IndexedSlices):
                    self._resource_apply_sparse_duplicate_indices(grad.values, var,
                                                                  grad.indices, apply_state)
                else:
                    self._resource_apply_dense(grad, var, apply_state)
        for var in data.constrained:
            var.assign(var.constraint(var))
        iterations = self.iterations
        np.add(iterations._array, 1, out=iterations._array)
        return iterations

    def _strategy_for(self, variables: Sequence[Variable], what: str) -> tuple[Any, bool]:
        """The strategy of ``variables`` (see ``strategy_of``), which this optimizer, its
        iterations and slots then belong to; and whether each variable is listed once."""
        last = self._last_strategy
        if last is not None and last[0] is variables:  # a GradientBuffer's, every step
            return last[2], last[3]
        key = tuple(map(_unique_id, variables))
        if last is not None and last[1] == key:
            return last[2], last[3]
        strategy = strategy_of(variables, self._strategy, what=f"{self._name}.{what}")
        if self._strategy is None:
            self._strategy = strategy
            for weight in self._weights:
                weight._distribute_strategy = strategy
        distinct = len(set(key)) == len(key)
        self._last_strategy = (variables, key, strategy, distinct)
        return strategy, distinct

    def _plan_data(self, plan: StepPlan, variables: Sequence[Variable]) -> _PlanData:
        """This optimizer's data for ``plan`` (made once); warns about variables without
        a gradient, as TF does.

        Raises:
            ValueError: no variable has a gradient.
        """
        data = self._plans.get(plan)
        if data is None:
            updated = [variables[i] for i in plan.updated]
            data = _PlanData(updated, {v.dtype for v in updated},
                             [v for v in updated if v.constraint is not None])
            self._plans[plan] = data
            while len(self._plans) > 64:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(plan)
        if variables and not data.updated:
            raise ValueError(
                f"No gradients provided for any variable: {[v.name for v in variables]}.")
        if plan.missing:
            warnings.warn("Gradients do not exist for variables "
                          f"{[variables[i].name for i in plan.missing]} when minimizing the "
                          "loss.", stacklevel=4)
        return data

    def _create_state(self, updated: list[Variable]) -> None:
        """Hyperparameter variables, ``iterations`` and slots, on first use."""
        self._create_hypers()
        _ = self.iterations
        self._create_slots(updated)

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

    def _clip(self, grads: list[Gradient]) -> list[Gradient]:
        """Keras's clipping, in its order: by value, by norm per tensor, by global norm."""
        if self.clipvalue is not None:
            grads = [clipping.clip_by_value(g, self.clipvalue) for g in grads]
        if self.clipnorm is not None:
            grads = [clipping.clip_by_norm(g, self.clipnorm) for g in grads]
        if self.global_clipnorm is not None:
            grads = clipping.clip_by_global_norm(grads, self.global_clipnorm)
        return grads

    def _resource_apply_sparse_duplicate_indices(self, values: np.ndarray, var: Variable,
                                                 indices: np.ndarray,
                                                 apply_state: ApplyState) -> None:
        summed, unique = deduplicate(values, indices)
        self._resource_apply_sparse(summed, var, unique, apply_state)

    # --- subclass hooks ------------------------------------------------------------------
    def _create_slots(self, var_list: list[Variable]) -> None:
        """Create the slots the update needs (called on every apply; add_slot is idempotent)."""

    def _elementwise_slot_names(self) -> list[str] | None:
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


@dataclass
class _PlanData:
    """An optimizer's data for one step plan: what it updates, and where chunks land."""

    updated: list[Variable]
    dtypes: set[np.dtype]
    constrained: list[Variable]
    segments: list[list[Segment]] | None = None


class _StreamedUpdate:
    """The consumer of a streamed step's reduced chunks (see ``ChunkConsumer``)."""

    def __init__(self, optimizer: Optimizer, variables: Sequence[Variable]) -> None:
        self.optimizer, self.variables = optimizer, variables

    def prepare(self, plan: StepPlan) -> None:
        optimizer = self.optimizer
        self.data = data = optimizer._plan_data(plan, self.variables)
        self.apply_state = optimizer._prepare(data.dtypes)
        if data.segments is None:
            optimizer._create_state(data.updated)
            names = optimizer._elementwise_slot_names() or []
            arrays = [None if kind is not Kind.DENSE else
                      (var._array, *(optimizer.get_slot(var, n)._array for n in names))
                      for var, kind in zip(self.variables, plan.kinds, strict=True)]
            data.segments = plan_segments(plan.chunks, arrays)

    def consume(self, parts: Sequence[ChunkPart]) -> None:
        self.optimizer._engine.apply(parts, self.data.segments, self.apply_state,
                                     self.optimizer.clipvalue)
