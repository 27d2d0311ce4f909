"""Kernels: blocked == plain expression, one flat buffer == one call per tensor, no allocation."""

import tracemalloc

import numpy as np
import pytest

import distsgd
from distsgd import kernels
from distsgd.optimizers import SGD
from tests.helpers import FLOAT_DTYPES


def _arrays(dtype, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_blocked_momentum_equals_the_plain_expression(dtype, nesterov, monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 1000)
    var, accum, grad = _arrays(dtype, 4321)
    lr, m = np.dtype(dtype).type(0.1), np.dtype(dtype).type(0.9)
    want_accum = accum * m - grad * lr
    want_var = var + (want_accum * m - grad * lr) if nesterov else var + want_accum
    kernels.keras_momentum_(var, accum, grad, lr=lr, momentum=m, nesterov=nesterov,
                            scratch=np.empty(2000, dtype))
    np.testing.assert_array_equal(accum, want_accum)
    np.testing.assert_array_equal(var, want_var)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_blocked_gradient_descent_equals_the_plain_expression(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 1000)
    var, _, grad = _arrays(dtype, 2500)
    lr = np.dtype(dtype).type(0.3)
    want = var - grad * lr
    kernels.gradient_descent_(var, grad, lr=lr, scratch=np.empty(1000, dtype))
    np.testing.assert_array_equal(var, want)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("nesterov", [False, True])
def test_flat_buffer_equals_per_tensor(momentum, nesterov):
    """One kernel call over tensors packed back to back == the optimizer's per-tensor path."""
    shapes = [(3, 4), (7,), (2, 2, 5), (1,)]
    rng = np.random.default_rng(1)
    starts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    steps = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]

    per_tensor = [distsgd.Variable(s) for s in starts]
    opt = SGD(0.05, momentum=momentum, nesterov=nesterov)
    for grads in steps:
        opt.apply_gradients(zip(grads, per_tensor, strict=True))

    flat_var = np.concatenate([s.reshape(-1) for s in starts])
    flat_accum = np.zeros_like(flat_var)
    fused = SGD(0.05, momentum=momentum, nesterov=nesterov)
    coefficients = {"lr_t": np.float32(np.float32(0.05)),
                    "momentum": np.float32(np.float32(momentum))}
    for grads in steps:
        flat_grad = np.concatenate([g.reshape(-1) for g in grads])
        fused._update_dense_(flat_var, flat_accum if momentum else None, flat_grad,
                             coefficients)
    np.testing.assert_array_equal(
        flat_var, np.concatenate([v.numpy().reshape(-1) for v in per_tensor]))


def test_dense_step_allocates_nothing_proportional_to_the_model():
    n = 2_000_000  # 8 MB per float32 tensor
    var = distsgd.Variable(np.zeros(n, np.float32))
    grad = np.ones(n, np.float32)
    opt = SGD(0.1, momentum=0.9, nesterov=True)
    opt.apply_gradients([(grad, var)])  # creates the slot and scratch
    tracemalloc.start()
    try:
        for _ in range(3):
            opt.apply_gradients([(grad, var)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * 4 / 20, f"peak {peak} bytes during steps of a {n * 4}-byte model"


def test_sparse_kernels():
    var = np.ones((4, 2))
    kernels.sparse_gradient_descent_(var, np.full((3, 2), 0.5), np.array([0, 0, 3]), lr=2.0)
    np.testing.assert_array_equal(var, [[-1, -1], [1, 1], [1, 1], [0, 0]])
    accum = np.zeros((4, 2))
    kernels.sparse_keras_momentum_(var, accum, np.ones((1, 2)), np.array([1]), lr=1.0,
                                   momentum=0.5, nesterov=False)
    np.testing.assert_array_equal(var[1], [0, 0])
    np.testing.assert_array_equal(accum, [[0, 0], [-1, -1], [0, 0], [0, 0]])


def test_scratch_buffers_grow_and_are_reused():
    scratch = kernels.ScratchBuffers()
    a = scratch.get(np.float32, 10)
    b = scratch.get(np.float32, 5)
    assert np.shares_memory(a, b)
    c = scratch.get(np.float32, 20)
    assert c.size == 20 and scratch.get(np.float64, 3).dtype == np.float64
