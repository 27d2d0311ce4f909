"""Learning-rate schedules (tf.keras.optimizers.schedules, TF 2.0).

A schedule is called with the optimizer's step (``iterations`` before the step's
increment, cast to the variable's dtype) and returns the learning rate. Built-ins
compute in float32 (the dtype TF gives a Python-float ``initial_learning_rate``).
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from distsgd._validation import check_number

__all__ = [
    "ExponentialDecay",
    "InverseTimeDecay",
    "LearningRateSchedule",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "deserialize",
    "serialize",
]

_F32 = np.float32


def _finite(name: str, value: Any) -> float:
    return check_number(name, value)


def _positive(name: str, value: Any) -> float:
    if check_number(name, value) <= 0:
        raise ValueError(f"{name}={value!r}; expected a finite number > 0")
    return value


class LearningRateSchedule(abc.ABC):
    """Base class: subclasses implement ``__call__(step)`` and ``get_config()``."""

    @abc.abstractmethod
    def __call__(self, step: Any) -> Any:
        """The learning rate at ``step``."""

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serializable."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LearningRateSchedule:
        """``cls(**config)``."""
        return cls(**config)


class _DecayByProgress(LearningRateSchedule):
    """Shared shape of ExponentialDecay and InverseTimeDecay: ``p = step / decay_steps``."""

    def __init__(self, initial_learning_rate: float, decay_steps: float, decay_rate: float,
                 staircase: bool = False, name: str | None = None) -> None:
        self.initial_learning_rate = _finite("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.decay_rate = _finite("decay_rate", decay_rate)
        self.staircase = bool(staircase)
        self.name = name

    def _progress(self, step: Any) -> np.float32:
        p = _F32(step) / _F32(self.decay_steps)
        return np.floor(p) if self.staircase else p

    def get_config(self) -> dict[str, Any]:
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "decay_rate": self.decay_rate,
                "staircase": self.staircase, "name": self.name}


class ExponentialDecay(_DecayByProgress):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)`` (floored if staircase)."""

    def __call__(self, step: Any) -> np.float32:
        return _F32(self.initial_learning_rate) * np.power(_F32(self.decay_rate),
                                                          self._progress(step))


class InverseTimeDecay(_DecayByProgress):
    """``initial_learning_rate / (1 + decay_rate * step / decay_steps)`` (floored if staircase)."""

    def __call__(self, step: Any) -> np.float32:
        return _F32(self.initial_learning_rate) / (
            _F32(1) + _F32(self.decay_rate) * self._progress(step))


def _as_tensor(value: Any) -> np.ndarray:
    """``value`` as ``tf.convert_to_tensor`` types it: Python floats as float32, Python
    ints as int32 (int64 beyond its range), numpy values keep their dtype."""
    if isinstance(value, np.generic | np.ndarray):
        return np.asarray(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return np.asarray(value, np.int32 if -2**31 <= value < 2**31 else np.int64)
    return np.asarray(value, np.float32)


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` up to ``boundaries[0]``, ``values[i+1]`` on ``(b_i, b_{i+1}]``, then last."""

    def __init__(self, boundaries: Sequence[float], values: Sequence[float],
                 name: str | None = None) -> None:
        boundaries, values = list(boundaries), list(values)
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                "The length of boundaries should be 1 less than the length of values "
                f"(got {len(boundaries)} boundaries and {len(values)} values)")
        for b in boundaries:
            _finite("boundaries", b)
        if any(b1 < b0 for b0, b1 in itertools.pairwise(boundaries)):
            raise ValueError(f"boundaries={boundaries!r}; expected a non-decreasing list")
        for v in values:
            _finite("values", v)
        self.boundaries, self.values, self.name = boundaries, values, name

    def __call__(self, step: Any) -> np.float32:
        """As TF compares: each boundary becomes a tensor (a Python float a float32, an
        int an int32), is cast to the step's dtype, and ``step <= boundary`` is decided
        in that dtype (so ``2.99999999`` is float32's ``3.0``)."""
        step = _as_tensor(step)
        bounds = np.array([_as_tensor(b).astype(step.dtype) for b in self.boundaries],
                          dtype=step.dtype)
        return _F32(self.values[int(np.searchsorted(bounds, step, side="left"))])

    def get_config(self) -> dict[str, Any]:
        return {"boundaries": self.boundaries, "values": self.values, "name": self.name}


class PolynomialDecay(LearningRateSchedule):
    """``(lr0 - end) * (1 - min(step, decay_steps) / decay_steps) ** power + end``.

    With ``cycle=True`` the horizon grows to ``decay_steps * ceil(step / decay_steps)``.
    """

    def __init__(self, initial_learning_rate: float, decay_steps: float,
                 end_learning_rate: float = 0.0001, power: float = 1.0, cycle: bool = False,
                 name: str | None = None) -> None:
        self.initial_learning_rate = _finite("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.end_learning_rate = _finite("end_learning_rate", end_learning_rate)
        self.power = _finite("power", power)
        self.cycle = bool(cycle)
        self.name = name

    def __call__(self, step: Any) -> np.float32:
        step, horizon = _F32(step), _F32(self.decay_steps)
        if self.cycle:
            horizon = horizon * (_F32(1) if step == 0 else np.ceil(step / horizon))
        else:
            step = np.minimum(step, horizon)
        p = step / horizon
        lr0, end = _F32(self.initial_learning_rate), _F32(self.end_learning_rate)
        return (lr0 - end) * np.power(_F32(1) - p, _F32(self.power)) + end

    def get_config(self) -> dict[str, Any]:
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": self.decay_steps, "end_learning_rate": self.end_learning_rate,
                "power": self.power, "cycle": self.cycle, "name": self.name}


_BUILTINS = {cls.__name__: cls for cls in
             (ExponentialDecay, InverseTimeDecay, PiecewiseConstantDecay, PolynomialDecay)}


def serialize(schedule: LearningRateSchedule) -> dict[str, Any]:
    """``{'class_name': <class name>, 'config': schedule.get_config()}``."""
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def deserialize(config: dict[str, Any],
                custom_objects: dict[str, Any] | None = None) -> LearningRateSchedule:
    """Rebuild a schedule from :func:`serialize`'s output; custom classes by name."""
    if not isinstance(config, dict) or "class_name" not in config or "config" not in config:
        raise ValueError(f"config={config!r}; expected {{'class_name': ..., 'config': ...}}")
    name = config["class_name"]
    cls = (custom_objects or {}).get(name) or _BUILTINS.get(name)
    if cls is None:
        raise ValueError(f"Unknown decay: {name}")
    return cls.from_config(dict(config["config"]))
