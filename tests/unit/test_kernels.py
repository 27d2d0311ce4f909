"""Kernels: blocked == plain expression, one flat buffer == one call per tensor, no allocation."""

import os
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


def _segment_count(optimizer):
    """How many contiguous runs the optimizer's last plan updates (one kernel call each)."""
    return sum(len(s) for s in list(optimizer._plans.values())[-1].segments)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("nesterov", [False, True])
def test_back_to_back_variables_take_one_call_and_equal_per_tensor_calls(momentum, nesterov):
    """Variables made one after another form one run (one kernel call); the same update
    over variables scattered in memory (one call each) gives bitwise the same state."""
    shapes = [(3, 4), (7,), (2, 2, 5), (1,), (0,), (6,)]
    rng = np.random.default_rng(1)
    starts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    steps = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]

    def run(scattered):
        spacers = []
        variables = []
        for start in starts:
            variables.append(distsgd.Variable(start))
            if scattered:
                spacers.append(distsgd.Variable(np.zeros(1, np.float32)))
        opt = SGD(0.05, momentum=momentum, nesterov=nesterov)
        for grads in steps:
            opt.apply_gradients(zip(grads, variables, strict=True))
        return variables, opt

    fused, fused_opt = run(scattered=False)
    apart, apart_opt = run(scattered=True)
    assert _segment_count(fused_opt) == 1
    assert _segment_count(apart_opt) == len(shapes) - 1  # the empty tensor has no elements
    for a, b in zip(fused + fused_opt.weights, apart + apart_opt.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_flat_update_over_a_concatenation_equals_per_tensor():
    shapes = [(3, 4), (7,), (2, 2, 5)]
    rng = np.random.default_rng(4)
    var = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grad = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    flat_var, flat_grad = np.concatenate([v.ravel() for v in var]), \
        np.concatenate([g.ravel() for g in grad])
    flat_accum = np.zeros_like(flat_var)
    opt = SGD(0.05, momentum=0.9, nesterov=True)
    coefficients = {"lr_t": np.float32(0.05), "momentum": np.float32(0.9),
                    "kernels": kernels.dense_kernels(np.dtype(np.float32))}
    scratch = kernels.ScratchBuffers()
    opt._update_flat_(flat_var, (flat_accum,), flat_grad, coefficients, scratch)
    for v, g in zip(var, grad, strict=True):
        accum = np.zeros_like(v)
        opt._update_flat_(v.reshape(-1), (accum.reshape(-1),), g.reshape(-1), coefficients,
                          scratch)
    np.testing.assert_array_equal(flat_var, np.concatenate([v.ravel() for v in var]))


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
    assert not np.shares_memory(scratch.get(np.float32, 20, slot=1), c)


def _train(shapes, dtype, momentum, nesterov, steps=3, seed=5):
    rng = np.random.default_rng(seed)
    variables = [distsgd.Variable(rng.standard_normal(n).astype(dtype)) for n in shapes]
    opt = SGD(0.01, momentum=momentum, nesterov=nesterov)
    for _ in range(steps):
        opt.apply_gradients([(rng.standard_normal(n).astype(dtype), v)
                             for n, v in zip(shapes, variables, strict=True)])
    return [v.numpy() for v in variables] + [w.numpy() for w in opt.weights]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_fused_numba_loops_equal_numpy_kernels(dtype, momentum, nesterov, monkeypatch):
    pytest.importorskip("numba")
    sizes = [1000, 1, 70_000, 300_000, 33, 5_000_000]
    monkeypatch.setenv("DISTSGD_NUM_THREADS", "3")
    monkeypatch.setenv("DISTSGD_KERNELS", "numba")
    fused = _train(sizes, dtype, momentum, nesterov)
    assert kernels._numba() is not None
    monkeypatch.setenv("DISTSGD_KERNELS", "numpy")
    reference = _train(sizes, dtype, momentum, nesterov)
    assert kernels._numba() is None
    for got, want in zip(fused, reference, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", [2, 5])
def test_threaded_steps_equal_one_thread(threads, monkeypatch):
    sizes = [3_000_000, 5, 2_000_000, 77] + [64] * 300
    monkeypatch.setenv("DISTSGD_NUM_THREADS", "1")
    want = _train(sizes, np.float32, 0.9, True)
    monkeypatch.setenv("DISTSGD_NUM_THREADS", str(threads))
    got = _train(sizes, np.float32, 0.9, True)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_thread_shares_cover_every_element_once_in_order_and_are_equal(workers):
    from distsgd.distribute.layout import Entry, Route, plan_buckets, plan_chunks
    from distsgd.optimizers.engine import _shares

    f32 = np.dtype(np.float32)
    entries = [Entry(i, f32, Route.LOCAL, (n,)) for i, n in
               enumerate([10, 0, 25, 3, 40, 7, 90])]
    chunks = plan_chunks(plan_buckets(entries, 1 << 20), 40)  # 10 elements a chunk
    parts = [(c, np.arange(c.size, dtype=f32) + 1000 * c.index, 0) for c in chunks]
    shares = _shares(parts, workers)
    assert 1 <= len(shares) <= workers
    flat = [(p[0].index, p[2] + i, p[1][i]) for share in shares for p in share
            for i in range(p[1].size)]
    assert flat == [(c.index, i, i + 1000 * c.index) for c in chunks for i in range(c.size)]
    sizes = [sum(p[1].size for p in share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_default_num_threads_splits_cores_between_local_ranks(monkeypatch):
    monkeypatch.delenv("DISTSGD_NUM_THREADS", raising=False)
    monkeypatch.setenv("MPI_LOCALNRANKS", "1000")
    assert kernels.default_num_threads() == 1
    monkeypatch.setenv("DISTSGD_NUM_THREADS", "3")
    assert kernels.default_num_threads() == 3
    monkeypatch.setenv("DISTSGD_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="DISTSGD_NUM_THREADS"):
        kernels.default_num_threads()


def test_numba_caches_outside_the_package(tmp_path):
    """Compiled kernels go to the user's cache directory (or NUMBA_CACHE_DIR), never into
    the installed package."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("numba")
    package = Path(kernels.__file__).parent
    before = set(package.rglob("*.nb[ic]"))
    program = ("import numpy as np, distsgd; from distsgd.optimizers import SGD; "
               "v = distsgd.Variable(np.zeros(8, np.float32)); "
               "SGD(0.1, momentum=0.9).apply_gradients([(np.ones(8, np.float32), v)])")
    for env in ({"XDG_CACHE_HOME": str(tmp_path / "xdg")},
                {"NUMBA_CACHE_DIR": str(tmp_path / "numba")}):
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "DISTSGD_KERNELS")}
        subprocess.run([sys.executable, "-c", program], check=True,  # numba: wait for it
                       env={**environment, **env, "DISTSGD_KERNELS": "numba"})
    assert list((tmp_path / "xdg" / "distsgd" / "numba").rglob("*.nbi"))
    assert list((tmp_path / "numba").rglob("*.nbi"))
    assert set(package.rglob("*.nb[ic]")) == before
