"""Replicas start equal, stay bitwise equal, and equal one process on the global batch."""

import autograd.numpy as anp
import numpy as np
import pytest

import distsgd
from distsgd.distribute import MPIStrategy, ShardedBatches, get_strategy
from distsgd.optimizers import SGD
from tests.mpi.conftest import aggregated, assert_replicas_identical

pytestmark = pytest.mark.mpi


def test_variables_start_from_rank_0_value(strategy):
    rng = np.random.default_rng(strategy.rank + 100)  # every rank draws differently
    with strategy.scope():
        w = distsgd.Variable(rng.standard_normal((4, 3)), name="w")
        local = distsgd.Variable(np.full(2, float(strategy.rank)), name="local",
                                 synchronization=distsgd.VariableSynchronization.NONE)
    assert_replicas_identical(strategy, w.numpy())
    np.testing.assert_array_equal(
        w.numpy(), np.random.default_rng(100).standard_normal((4, 3)))
    assert local.numpy().tolist() == [strategy.rank] * 2


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_sync_after_every_step(strategy, momentum, nesterov, dtype):
    rank = strategy.rank
    rng = np.random.default_rng(rank)
    with strategy.scope():
        dense = distsgd.Variable(np.zeros((5, 7), dtype), name="dense")
        mean = distsgd.Variable(np.zeros(9, dtype), name="mean",
                                aggregation=distsgd.VariableAggregation.MEAN)
        emb = distsgd.Variable(np.zeros((6, 3), dtype), name="emb")
        opt = SGD(0.1, momentum=momentum, nesterov=nesterov, decay=0.01)
        for _ in range(4):
            opt.apply_gradients([
                (rng.standard_normal((5, 7)).astype(dtype), dense),
                (rng.standard_normal(9).astype(dtype), mean),
                (distsgd.IndexedSlices(rng.standard_normal((3, 3)).astype(dtype),
                                       rng.integers(0, 6, 3), None), emb)])
            assert_replicas_identical(strategy, dense.numpy(), mean.numpy(), emb.numpy(),
                                      *opt.get_weights())


@pytest.mark.parametrize("aggregation", ["NONE", "MEAN"])
def test_p_ranks_equal_one_process_on_the_global_batch(strategy, aggregation):
    """P ranks x batch b == one process x batch P*b (loss scaled per tf.distribute)."""
    size, rank = strategy.num_replicas_in_sync, strategy.rank
    data_rng = np.random.default_rng(0)
    x = data_rng.standard_normal((60 * size, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.1
    global_batch = 6 * size
    policy = distsgd.VariableAggregation[aggregation]

    def train(strat, rank_count):
        with strat.scope():
            w = distsgd.Variable(np.zeros(4), name="w", aggregation=policy)
            b = distsgd.Variable(0.0, name="b", dtype=np.float64, aggregation=policy)
            opt = SGD(0.05, momentum=0.9, nesterov=True)
        batches = ShardedBatches([x, y], global_batch, strat, seed=3)
        # SUM over ranks: divide by the global batch; MEAN over ranks: by the local batch
        # times... the per-replica mean is then averaged, equal when shares are equal.
        for epoch in range(2):
            for _, (xb, yb) in batches.epoch(epoch):
                scale = global_batch if aggregation == "NONE" else global_batch / rank_count

                def loss(xb=xb, yb=yb, scale=scale):
                    return anp.sum((anp.dot(xb, w) + b - yb) ** 2) / scale

                with strat.scope():
                    opt.minimize(loss, [w, b])
        return w.numpy(), b.numpy()

    w_dist, b_dist = train(strategy, size)
    w_one, b_one = train(get_strategy(), 1)
    np.testing.assert_allclose(w_dist, w_one, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b_dist, b_one, rtol=1e-10, atol=1e-12)
    assert_replicas_identical(strategy, w_dist, b_dist)
    assert rank == strategy.rank


@pytest.mark.parametrize("threshold", [0, 64, 1 << 20])
def test_fusion_threshold_does_not_change_results(strategy, threshold):
    """Fused buckets, tiny buckets and one buffer per tensor give bitwise the same weights."""
    shapes = [(3, 4), (17,), (2, 2, 2), (1,), (40,)]

    def run(fusion_threshold_bytes):
        strat = MPIStrategy(fusion_threshold_bytes=fusion_threshold_bytes)
        rng = np.random.default_rng(strat.rank)
        with strat.scope():
            variables = [distsgd.Variable(np.zeros(s, np.float32), name=f"v{i}")
                         for i, s in enumerate(shapes)]
            opt = SGD(0.1, momentum=0.9)
            for _ in range(3):
                # integer-valued floats: exact sums in any reduction order
                opt.apply_gradients([(rng.integers(-8, 8, s).astype(np.float32), v)
                                     for s, v in zip(shapes, variables, strict=True)])
        return [v.numpy() for v in variables]

    for got, want in zip(run(threshold), run(64 << 20), strict=True):
        np.testing.assert_array_equal(got, want)


def test_aggregation_caches_stay_bounded(strategy):
    from distsgd.distribute import aggregation, plans

    aggregator = aggregation.GradientAggregator(strategy.communicator,
                                                fusion_threshold_bytes=1 << 20)
    for i in range(200):  # a fresh variable list every call, as a lazily built model might
        var = distsgd.Variable(np.zeros(i % 7 + 1), name=f"v{i}")
        result = aggregated(aggregator, [np.ones(i % 7 + 1)], [var], step=i)
        assert result[0].tolist() == [strategy.num_replicas_in_sync] * (i % 7 + 1)
    assert len(aggregator._signatures) <= plans.CACHED_PLANS
    assert len(aggregator._plans) <= plans.CACHED_PLANS
    # results live in one array per dtype shared by all plans, not one per plan
    assert len(aggregator._results._buffers) <= 1
