"""The weights half of the OptimizerV2 contract: ``iterations``, slots, ``weights``.

Slots and ``iterations`` belong to the strategy of the variables the optimizer updates
(:attr:`~distsgd.Variable.distribute_strategy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distsgd.optimizers.hyperparameters import make_initial
from distsgd.variables import Variable, VariableAggregation, VariableSynchronization

__all__ = ["WeightsMixin"]


class WeightsMixin:
    """``iterations``, ``add_weight``, ``add_slot``/``get_slot``/``get_slot_names``,
    ``weights``/``variables``, ``get_weights``/``set_weights``."""

    _name: str
    _strategy: Any
    _slots: dict[int, dict[str, Variable]]
    _slot_names: list[str]
    _weights: list[Variable]
    _iterations: Variable | None

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
        initial = make_initial(initializer, tuple(shape), dtype)
        return Variable(initial, name=f"{self._name}/{name}", trainable=trainable,
                        dtype=dtype, synchronization=synchronization, aggregation=aggregation,
                        _owner=self._strategy)

    def add_slot(self, var: Variable, slot_name: str, initializer: Any = "zeros") -> Variable:
        """The slot ``slot_name`` of ``var``, created (shape and dtype of ``var``) if new."""
        slots = self._slots.setdefault(var._unique_id, {})
        if slot_name not in slots:
            initial = make_initial(initializer, var.shape, var.dtype)
            slot = Variable(initial, name=f"{self._name}/{var.name}/{slot_name}",
                            trainable=False, dtype=var.dtype, _owner=self._strategy)
            if slot.shape != var.shape:
                raise ValueError(f"slot {slot_name!r} initial value has shape {slot.shape}; "
                                 f"expected {var.shape}")
            if slot_name not in self._slot_names:
                self._slot_names.append(slot_name)
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
