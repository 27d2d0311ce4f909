"""The streaming step across ranks: in-place buffers, minimize, the pipelined worker, the
materialized path and tiny chunks all give bitwise the same replicas; a step allocates nothing
proportional to the model."""

import tracemalloc

import autograd.numpy as anp
import numpy as np
import pytest

import distsgd
from distsgd import VariableAggregation as Agg
from distsgd import VariableSynchronization as Sync
from distsgd.distribute import MPIStrategy
from distsgd.optimizers import SGD
from tests.mpi.conftest import assert_replicas_identical

pytestmark = pytest.mark.mpi

# every route, interleaved, several dtypes, a tensor larger than a small chunk
LAYOUT = [((40, 30), np.float32, Sync.AUTO, Agg.NONE), ((7,), np.float64, Sync.AUTO, Agg.MEAN),
          ((5, 3), np.float32, Sync.AUTO, Agg.ONLY_FIRST_REPLICA),
          ((11,), np.float32, Sync.NONE, Agg.NONE), ((300,), np.float32, Sync.AUTO, Agg.MEAN),
          ((2, 2), np.float64, Sync.ON_WRITE, Agg.SUM), ((64,), np.float32, Sync.AUTO, Agg.SUM)]


def _train(strategy, form="arrays", steps=3, configure=lambda optimizer: None):
    """Integer-valued gradients (exact sums in any order); returns every array of the state."""
    rng = np.random.default_rng(strategy.rank)
    with strategy.scope():
        variables = [distsgd.Variable(np.zeros(s, d), name=f"v{i}", synchronization=sync,
                                      aggregation=agg)
                     for i, (s, d, sync, agg) in enumerate(LAYOUT)]
        opt = SGD(0.125, momentum=0.5, nesterov=True)
        configure(opt)
        buffer = distsgd.GradientBuffer(variables)
        for _ in range(steps):
            grads = [rng.integers(-8, 8, s).astype(d) for s, d, _, _ in LAYOUT]
            if form == "arrays":
                opt.apply_gradients(zip(grads, variables, strict=True))
            elif form == "minimize":  # autograd's gradient of sum(v * g) is exactly g
                opt.minimize(lambda grads=grads: sum(anp.sum(v * g) for v, g in
                                                     zip(variables, grads, strict=True)),
                             variables)
            else:
                for target, grad in zip(buffer.grads, grads, strict=True):
                    target[...] = grad
                opt.apply_gradients(buffer if form == "buffer" else
                                    zip(buffer.grads, variables, strict=True))
    return [v.numpy() for v in variables] + [w.numpy() for w in opt.weights]


def _shared(state):
    """The state every replica must agree on (rank-local variable #3 and its slot excluded)."""
    return [a for i, a in enumerate(state) if i not in (3, len(LAYOUT) + 1 + 3)]


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def reference(strategy):
    return _train(strategy)


@pytest.mark.parametrize("form", ["buffer", "zip", "minimize"])
def test_gradient_buffers_equal_separate_arrays(strategy, reference, form):
    got = _train(strategy, form)
    _assert_same(got, reference)
    assert_replicas_identical(strategy, *_shared(got))


@pytest.mark.parametrize("chunk_bytes", [4, 64, 1000])
def test_tiny_chunks_equal_the_default(reference, chunk_bytes):
    _assert_same(_train(MPIStrategy(allreduce_chunk_bytes=chunk_bytes)), reference)


@pytest.mark.parametrize("configure", [
    lambda opt: setattr(opt, "skip_nonfinite_steps", True),  # reduces everything first
    lambda opt: setattr(opt, "clipvalue", 1e6),  # clips each chunk in place
], ids=["nonfinite-check", "clipvalue"])
def test_other_paths_equal_plain_streaming(strategy, reference, configure):
    _assert_same(_train(strategy, configure=configure), reference)
    _assert_same(_train(strategy, "buffer", configure=configure), reference)


def test_materialized_path_equals_streaming(strategy, reference, monkeypatch):
    monkeypatch.setattr(SGD, "_elementwise_slot_names", lambda self: None)  # kept, per tensor
    _assert_same(_train(strategy), reference)
    _assert_same(_train(strategy, "buffer"), reference)


@pytest.mark.parametrize("form", ["arrays", "buffer"])
def test_a_step_allocates_nothing_proportional_to_the_model(strategy, form):
    n = 2_000_000  # 8 MB per float32 tensor
    with strategy.scope():
        variables = [distsgd.Variable(np.zeros(n, np.float32), name="big"),
                     distsgd.Variable(np.zeros(n // 2, np.float32), name="mean",
                                      aggregation=Agg.MEAN)]
        opt = SGD(0.1, momentum=0.9, nesterov=True)
        buffer = distsgd.GradientBuffer(variables)
        grads = [np.ones(n, np.float32), np.ones(n // 2, np.float32)]

        def step():
            if form == "buffer":
                buffer.flat[np.dtype(np.float32)].fill(1)
                opt.apply_gradients(buffer)
            else:
                opt.apply_gradients(zip(grads, variables, strict=True))

        step()  # creates the slots, plans and chunk buffers
        tracemalloc.start()
        try:
            for _ in range(3):
                step()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    model_bytes = 1.5 * n * 4
    assert peak < model_bytes / 20, f"peak {peak} bytes during steps of a {model_bytes}-byte model"
