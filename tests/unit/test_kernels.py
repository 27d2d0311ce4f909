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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_fused_numba_loops_equal_numpy_kernels(dtype, momentum, nesterov, monkeypatch):
    pytest.importorskip("numba")
    sizes = [1000, 1, 70_000, 300_000, 33]
    rng = np.random.default_rng(5)

    def run(env):
        monkeypatch.setenv("DISTSGD_KERNELS", env)
        var = [rng_copy.astype(dtype) for rng_copy in starts]
        accum = [np.zeros_like(v) for v in var]
        updater = kernels.DenseUpdater(num_threads=3)
        lr, m = np.dtype(dtype).type(0.01), np.dtype(dtype).type(momentum)
        for g in steps:
            if momentum:
                updater.keras_momentum_(var, accum, [x.astype(dtype) for x in g], lr=lr,
                                        momentum=m, nesterov=nesterov)
            else:
                updater.gradient_descent_(var, [x.astype(dtype) for x in g], lr=lr)
        return var, accum

    starts = [rng.standard_normal(n) for n in sizes]
    steps = [[rng.standard_normal(n) for n in sizes] for _ in range(3)]
    fused = run("numba")
    assert kernels._numba() is not None
    reference = run("numpy")
    assert kernels._numba() is None
    for got, want in zip(fused[0] + fused[1], reference[0] + reference[1], strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_threaded_updater_equals_one_call(threads):
    rng = np.random.default_rng(2)
    sizes = [300_000, 5, 200_000, 77]
    var = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    accum = [np.zeros(n, np.float32) for n in sizes]
    grad = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    flat = [np.concatenate(var), np.concatenate(accum), np.concatenate(grad)]
    lr, m = np.float32(0.1), np.float32(0.9)
    kernels.DenseUpdater(threads).keras_momentum_(var, accum, grad, lr=lr, momentum=m,
                                                  nesterov=True)
    kernels.keras_momentum_(flat[0], flat[1], flat[2], lr=lr, momentum=m, nesterov=True,
                            scratch=np.empty(2 * kernels.BLOCK_ELEMENTS, np.float32))
    np.testing.assert_array_equal(np.concatenate(var), flat[0])
    np.testing.assert_array_equal(np.concatenate(accum), flat[1])


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_partition_covers_every_element_once_in_equal_shares(workers):
    sizes = [10, 0, 25, 3, 40]
    shares = kernels._partition(sizes, workers)
    covered = [np.zeros(n, int) for n in sizes]
    for share in shares:
        for i, part in share:
            covered[i][part] += 1
    assert all((c == 1).all() for c in covered)
    totals = [sum(p.stop - p.start for _, p in share) for share in shares]
    assert max(totals) - min(totals) <= -(-sum(sizes) // workers)


def test_default_num_threads_splits_cores_between_local_ranks(monkeypatch):
    monkeypatch.delenv("DISTSGD_NUM_THREADS", raising=False)
    monkeypatch.setenv("MPI_LOCALNRANKS", "1000")
    assert kernels.default_num_threads() == 1
    monkeypatch.setenv("DISTSGD_NUM_THREADS", "3")
    assert kernels.default_num_threads() == 3
    monkeypatch.setenv("DISTSGD_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="DISTSGD_NUM_THREADS"):
        kernels.default_num_threads()
