"""Hyperparameters as Keras's OptimizerV2 holds them: numbers, callables, schedules, variables.

Python-number hyperparameters become float32 scalar variables on first use and are cast
to each variable's dtype when used, as in TF (so a float64 variable sees
``float64(float32(0.1))``). ``optimizer.learning_rate`` (or ``lr``) reads and assigns
them.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from distsgd._validation import check_number
from distsgd.optimizers import schedules as schedules_lib
from distsgd.variables import Variable, VariableAggregation

__all__ = ["HyperparameterMixin", "cast_hyperparameter", "make_initial", "unique_name"]

#: Range rules for hyperparameters given as numbers: (low, high).
_HYPER_RANGES = {"learning_rate": (0.0, math.inf), "decay": (0.0, math.inf),
                 "momentum": (0.0, 1.0)}
_name_counts: dict[str, itertools.count] = {}


def unique_name(base: str) -> str:
    """``base``, then ``base_1``, ``base_2``, ... (Keras's unique object names)."""
    count = next(_name_counts.setdefault(base, itertools.count()))
    return base if count == 0 else f"{base}_{count}"


def make_initial(initializer: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """The initial value an ``add_weight``/``add_slot`` initializer stands for."""
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


def cast_hyperparameter(value: Any, dtype: np.dtype) -> np.generic:
    """Cast a hyperparameter to ``dtype`` the way TF does (Python floats via float32)."""
    if isinstance(value, Variable):
        value = value._array
    elif isinstance(value, float | int) and not isinstance(value, np.generic):
        value = np.float32(value)
    return np.asarray(value).astype(dtype)[()]



class HyperparameterMixin:
    """The hyperparameter half of the OptimizerV2 contract (``_hyper``, ``_set_hyper``,
    ``_get_hyper``, attribute access); the optimizer provides ``add_weight`` and
    ``_step_count``."""

    _hyper: dict[str, Any]
    _hypers_created: bool
    _initial_decay: float

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
        return cast_hyperparameter(value, np.dtype(dtype))

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
            lr_t = cast_hyperparameter(lr_t(dtype.type(self._step_count())), dtype)
        if self._initial_decay > 0.0:
            step = dtype.type(self._step_count())
            lr_t = lr_t / (dtype.type(1) + self._get_hyper("decay", dtype) * step)
        return lr_t
