"""Aggregation overlapped with the backward pass is bitwise the plain step, at any world
size: every route (interleaved, so some chunks are packed), several dtypes, chunks small
enough that many overlap, variables without a gradient somewhere or everywhere, autograd's
backward pass and an explicit one (the training program's MLP)."""

import autograd.numpy as anp
import numpy as np
import pytest

import distsgd
from distsgd import VariableAggregation as Agg
from distsgd import VariableSynchronization as Sync
from distsgd.distribute import MPIStrategy
from distsgd.optimizers import SGD
from distsgd.train.model import MLP
from tests.mpi.conftest import assert_replicas_identical

pytestmark = pytest.mark.mpi

LAYOUT = [((40, 30), np.float32, Sync.AUTO, Agg.NONE), ((7,), np.float64, Sync.AUTO, Agg.MEAN),
          ((5, 3), np.float32, Sync.AUTO, Agg.ONLY_FIRST_REPLICA),
          ((11,), np.float32, Sync.NONE, Agg.NONE), ((300,), np.float32, Sync.AUTO, Agg.MEAN),
          ((2, 2), np.float64, Sync.ON_WRITE, Agg.SUM), ((64,), np.float32, Sync.AUTO, Agg.SUM)]


def _train(overlap, backward, missing=(), steps=4):
    strategy = MPIStrategy(allreduce_chunk_bytes=256)  # many chunks
    rng = np.random.default_rng([strategy.rank, 9])
    with strategy.scope():
        variables = [distsgd.Variable(np.ones(s, d), name=f"v{i}", synchronization=sync,
                                      aggregation=agg)
                     for i, (s, d, sync, agg) in enumerate(LAYOUT)]
        opt = SGD(0.01, momentum=0.9, nesterov=True)
    buffer = distsgd.GradientBuffer(variables)
    if overlap:
        opt.overlap(buffer)
    for _ in range(steps):
        weights = [rng.standard_normal(s).astype(d) for s, d, _, _ in LAYOUT]
        skipped = {i for i in missing if i != "rank 0" or strategy.rank == 0}
        skipped = {i if isinstance(i, int) else 1 for i in skipped}
        if backward == "autograd":
            def loss(weights=weights, skipped=skipped):
                return sum(anp.sum(anp.sin(v * w)) for i, (v, w) in
                           enumerate(zip(variables, weights, strict=True)) if i not in skipped)
            distsgd.gradients(loss, variables, out=buffer)
        else:  # a backward pass of one's own, last variable first
            for i in reversed(range(len(variables))):  # (a missing one holds zeros)
                buffer.grads[i][...] = 0 if i in skipped else \
                    np.cos(variables[i].numpy() * weights[i]) * weights[i]
                buffer.ready(i)
            buffer.missing = frozenset(skipped)
        opt.apply_gradients(buffer)
    return strategy, [v.numpy() for v in variables] + [w.numpy() for w in opt.weights]


@pytest.mark.parametrize("backward", ["autograd", "own"])
@pytest.mark.parametrize("missing", [(), (3,), ("rank 0",)])
def test_overlapped_steps_equal_plain_steps(backward, missing):
    strategy, plain = _train(False, backward, missing)
    _, overlapped = _train(True, backward, missing)
    for a, b in zip(plain, overlapped, strict=True):
        np.testing.assert_array_equal(a, b)
    shared = [a for i, a in enumerate(overlapped) if i not in (3, len(LAYOUT) + 1 + 3)]
    assert_replicas_identical(strategy, *shared)


def test_the_mlps_backward_pass_marks_layers_ready_last_first_and_overlaps():
    strategy = MPIStrategy(allreduce_chunk_bytes=4096)
    results = []
    for overlap in (False, True):
        with strategy.scope():
            model = MLP([20, 64, 64, 5], seed=1)
            opt = SGD(0.1, momentum=0.9)
        buffer = distsgd.GradientBuffer(model.variables)
        order = []
        if overlap:
            opt.overlap(buffer)
            hook = buffer.on_ready or (lambda i: None)
            buffer.on_ready = lambda i, hook=hook, order=order: (order.append(i), hook(i))
        rng = np.random.default_rng(strategy.rank)
        for _ in range(3):
            x = rng.standard_normal((16, 20)).astype(np.float32)
            y = rng.integers(0, 5, 16)
            model.loss_and_gradients(x, y, 1 / 64, buffer, ready=buffer.ready)
            opt.apply_gradients(buffer)
        results.append([v.numpy() for v in model.variables + opt.weights])
        if overlap and strategy.num_replicas_in_sync > 1:
            assert order[:6] == [4, 5, 2, 3, 0, 1]
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.mpi(min_size=2)
def test_a_mismatch_during_an_overlapped_step_is_named_on_every_rank(strategy):
    from distsgd.distribute import MismatchError

    shape = (3,) if strategy.rank == 0 else (4,)
    var = distsgd.Variable(np.zeros(shape), name="w", _owner=strategy)
    opt = SGD(0.1)
    buffer = opt.overlap(distsgd.GradientBuffer([var]))
    buffer.grads[0][...] = 1
    buffer.ready(0)
    with pytest.raises(MismatchError, match="overlapped gradient aggregation at step 0"):
        opt.apply_gradients(buffer)
    assert var.numpy().sum() == 0
