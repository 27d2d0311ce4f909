"""The subclass contract, proven the way a user would use it: Keras's Adam written from the
``distsgd.optimizers.Optimizer`` docstring alone trains on the fused, streamed distributed
path, matches Keras's published update, and keeps replicas bitwise equal."""

import numpy as np
import pytest

import distsgd
from distsgd.optimizers import Optimizer
from tests.mpi.conftest import assert_replicas_identical

pytestmark = pytest.mark.mpi


class Adam(Optimizer):
    """Keras OptimizerV2 Adam: ``lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)``,
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``w -= lr_t m / (sqrt(v) + eps)``."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 name="Adam"):
        super().__init__(name)
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("beta_1", beta_1)
        self._set_hyper("beta_2", beta_2)
        self.epsilon = epsilon
        self.calls = []  # the lengths _update_flat_ was called with

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "m")
        for var in var_list:
            self.add_slot(var, "v")

    def _prepare_local(self, var_dtype, apply_state):
        super()._prepare_local(var_dtype, apply_state)
        t = var_dtype.type(int(self.iterations.numpy()) + 1)
        b1, b2 = self._get_hyper("beta_1", var_dtype), self._get_hyper("beta_2", var_dtype)
        one = var_dtype.type(1)
        apply_state[var_dtype].update(
            lr=apply_state[var_dtype]["lr_t"] * np.sqrt(one - b2 ** t) / (one - b1 ** t),
            b1=b1, b2=b2, eps=var_dtype.type(self.epsilon))

    def _elementwise_slot_names(self):
        return ["m", "v"]

    def _update_flat_(self, var, slots, grad, coefficients, scratch):
        self.calls.append(var.size)
        m, v = slots
        c = coefficients
        m[...] = c["b1"] * m + (1 - c["b1"]) * grad
        v[...] = c["b2"] * v + (1 - c["b2"]) * grad * grad
        var -= c["lr"] * m / (np.sqrt(v) + c["eps"])

    def _resource_apply_dense(self, grad, var, apply_state):
        slots = (self.get_slot(var, "m")._array.reshape(-1),
                 self.get_slot(var, "v")._array.reshape(-1))
        self._update_flat_(var._array.reshape(-1), slots, grad.reshape(-1),
                           apply_state[var.dtype], None)

    def _resource_apply_sparse(self, grad, var, indices, apply_state):
        raise NotImplementedError


def adam_numpy(param, g, m, v, t, lr=0.001, beta1=0.9, beta2=0.999, epsilon=1e-7):
    """Keras's ``adam_update_numpy`` (adam_test.py), t counted from 0."""
    lr_t = lr * np.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return param - lr_t * m / (np.sqrt(v) + epsilon), m, v


def test_first_steps_match_keras(strategy):
    """Keras's testBasic: var0 = [1, 2], grads0 = [0.1, 0.1]; the first step moves each
    weight by almost exactly lr (0.00099997)."""
    with strategy.scope():
        var = distsgd.Variable(np.array([1.0, 2.0]), name="var0")
        opt = Adam()
    param, m, v = np.array([1.0, 2.0]), 0.0, 0.0
    for t in range(3):
        total = 0.1 * strategy.num_replicas_in_sync  # the summed gradient of every rank
        opt.apply_gradients([(np.array([0.1, 0.1]), var)])
        # hyperparameters are float32 variables cast to the variable's dtype, as in TF
        f32 = lambda x: float(np.float32(x))  # noqa: E731
        param, m, v = adam_numpy(param, total, m, v, t, f32(0.001), f32(0.9), f32(0.999))
        np.testing.assert_allclose(var.numpy(), param, rtol=1e-12)
    first = adam_numpy(np.array([1.0, 2.0]), 0.1, 0.0, 0.0, 0)[0]
    np.testing.assert_allclose(first, [0.99900003, 1.99900003], atol=1e-8)


def _train(strategy, elementwise=True):
    shapes = [(40, 30), (30,), (30, 10), (10,)]
    rng = np.random.default_rng(strategy.rank)
    with strategy.scope():
        variables = [distsgd.Variable(np.ones(s, np.float32), name=f"layer{i}")
                     for i, s in enumerate(shapes)]
        opt = Adam(0.01)
    if not elementwise:
        opt._elementwise_slot_names = lambda: None  # per tensor, after the aggregation
    for _ in range(4):  # outside the scope, as users loop
        grads = [rng.integers(-8, 8, s).astype(np.float32) for s in shapes]  # exact sums
        opt.apply_gradients(zip(grads, variables, strict=True))
    return variables, opt


def test_a_user_optimizer_streams_over_many_tensors_with_replicas_bitwise_equal(strategy):
    variables, opt = _train(strategy)
    total = sum(v.size for v in variables)
    if strategy.num_replicas_in_sync > 1:  # (one process reads separate arrays in place)
        assert max(opt.calls) == total  # one call covered all four tensors: the fused path
    assert_replicas_identical(strategy, *[v.numpy() for v in variables + opt.weights])
    assert strategy.check_replicas(variables, opt) == []
    per_tensor, per_tensor_opt = _train(strategy, elementwise=False)
    assert max(per_tensor_opt.calls) == 40 * 30
    for a, b in zip(variables + opt.weights, per_tensor + per_tensor_opt.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
