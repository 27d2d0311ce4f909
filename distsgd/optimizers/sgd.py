"""Stochastic gradient descent with Keras momentum and Nesterov (tf.keras.optimizers.SGD)."""

from __future__ import annotations

from typing import Any

import numpy as np

from distsgd import kernels
from distsgd._validation import check_number
from distsgd.optimizers.optimizer import ApplyState, Optimizer
from distsgd.variables import Variable

__all__ = ["SGD"]


class SGD(Optimizer):
    """Gradient descent with optional momentum, exactly as TF 2.0 Keras computes it::

        momentum == 0:  w = w - lr_t * g
        momentum > 0:   v = m * v - lr_t * g;  w = w + v
        nesterov:       v = m * v - lr_t * g;  w = w + (m * v - lr_t * g)

    ``v`` is the ``"momentum"`` slot; ``lr_t = lr / (1 + decay * t)`` (or a schedule
    at ``t``), with ``t`` the ``iterations`` count before the step. Python-number
    hyperparameters are held as float32 and cast to each variable's dtype. With
    Nesterov the variable stores ``theta + m * v`` (compute gradients at it).

    Args:
        learning_rate: float >= 0, a zero-argument callable, or a
            :class:`~distsgd.optimizers.schedules.LearningRateSchedule`.
        momentum: float in [0, 1] or a callable. Whether momentum is used (and a slot
            created) is decided here: callables always use it, numbers when > 0.
        nesterov: use Nesterov momentum (ignored when momentum is 0, as in TF).
        name: prefix for the optimizer's variable names.
        **kwargs: ``lr`` (wins over ``learning_rate``), ``decay``, ``clipnorm``,
            ``clipvalue``, ``global_clipnorm``.

    Raises:
        ValueError: momentum outside [0, 1]; negative or non-finite learning rate or kwarg.
        TypeError: an unknown keyword argument, or a non-numeric hyperparameter.
    """

    def __init__(self, learning_rate: Any = 0.01, momentum: Any = 0.0, nesterov: bool = False,
                 name: str | None = "SGD", **kwargs: Any) -> None:
        if not isinstance(nesterov, bool | np.bool_):
            raise TypeError(f"nesterov={nesterov!r}; expected a bool")
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", kwargs.get("lr", learning_rate))
        self._set_hyper("decay", self._initial_decay)
        dynamic = callable(momentum) or isinstance(momentum, Variable)
        if not dynamic:
            check_number("momentum", momentum, low=0.0, high=1.0,
                         what="a number between [0, 1]")
        self._momentum = dynamic or momentum > 0
        self._set_hyper("momentum", momentum)
        self.nesterov = bool(nesterov)

    def _create_slots(self, var_list: list[Variable]) -> None:
        if self._momentum:
            for var in var_list:
                self.add_slot(var, "momentum")

    def _prepare_local(self, var_dtype: np.dtype, apply_state: ApplyState) -> None:
        super()._prepare_local(var_dtype, apply_state)
        momentum = self._get_hyper("momentum", var_dtype)
        if not np.isfinite(momentum) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum evaluated to {float(momentum)!r}; "
                             "expected a number in [0, 1]")
        apply_state[var_dtype]["momentum"] = momentum
        apply_state[var_dtype]["kernels"] = kernels.dense_kernels(var_dtype)

    def _elementwise_slot_names(self) -> list[str] | None:
        if type(self)._resource_apply_dense is not SGD._resource_apply_dense:
            return None  # a subclass with its own dense update gets it called per tensor
        return ["momentum"] if self._momentum else []

    def _update_flat_(self, var: np.ndarray, slots: tuple[np.ndarray, ...], grad: np.ndarray,
                      coefficients: dict[str, Any], scratch: kernels.ScratchBuffers) -> None:
        """The update over 1-D arrays: one tensor, or a run of many back to back."""
        descent, momentum = coefficients["kernels"]
        if slots:
            momentum(var, slots[0], grad, coefficients["lr_t"], coefficients["momentum"],
                     self.nesterov, scratch)
        else:
            descent(var, grad, coefficients["lr_t"], scratch)

    def _resource_apply_dense(self, grad: np.ndarray, var: Variable,
                              apply_state: ApplyState) -> None:
        slots = (self.get_slot(var, "momentum")._array.reshape(-1),) if self._momentum else ()
        self._update_flat_(var._array.reshape(-1), slots, grad.reshape(-1),
                           apply_state[var.dtype], self._engine.scratch)

    def _resource_apply_sparse(self, grad: np.ndarray, var: Variable, indices: np.ndarray,
                               apply_state: ApplyState) -> None:
        coefficients = apply_state[var.dtype]
        if self._momentum:
            kernels.sparse_keras_momentum_(
                var._array, self.get_slot(var, "momentum")._array, grad, indices,
                lr=coefficients["lr_t"], momentum=coefficients["momentum"],
                nesterov=self.nesterov)
        else:
            kernels.sparse_gradient_descent_(var._array, grad, indices, lr=coefficients["lr_t"])

    def _resource_apply_sparse_duplicate_indices(self, values: np.ndarray, var: Variable,
                                                 indices: np.ndarray,
                                                 apply_state: ApplyState) -> None:
        if self._momentum:
            super()._resource_apply_sparse_duplicate_indices(values, var, indices, apply_state)
        else:  # scatter-add accumulates duplicates itself (TF's GD path)
            self._resource_apply_sparse(values, var, indices, apply_state)

    def get_config(self) -> dict[str, Any]:
        """Keras keys: name, [clip options], learning_rate, decay, momentum, nesterov."""
        config = super().get_config()
        config.update({
            "learning_rate": self._serialize_hyperparameter("learning_rate"),
            "decay": self._serialize_hyperparameter("decay"),
            "momentum": self._serialize_hyperparameter("momentum"),
            "nesterov": self.nesterov,
        })
        return config
