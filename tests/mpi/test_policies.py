"""Every row of the aggregation-policy table, dense and sparse, at any world size."""

import numpy as np
import pytest

import distsgd
from distsgd import VariableAggregation as Agg
from distsgd import VariableSynchronization as Sync
from distsgd.optimizers import SGD
from tests.mpi.conftest import assert_replicas_identical

pytestmark = pytest.mark.mpi

POLICIES = [
    (Sync.AUTO, Agg.NONE, "sum"), (Sync.ON_WRITE, Agg.NONE, "sum"),
    (Sync.AUTO, Agg.SUM, "sum"), (Sync.ON_WRITE, Agg.SUM, "sum"),
    (Sync.AUTO, Agg.MEAN, "mean"), (Sync.ON_WRITE, Agg.MEAN, "mean"),
    (Sync.AUTO, Agg.ONLY_FIRST_REPLICA, "first"),
    (Sync.ON_WRITE, Agg.ONLY_FIRST_REPLICA, "first"),
    (Sync.NONE, Agg.NONE, "local"), (Sync.NONE, Agg.SUM, "local"),
    (Sync.NONE, Agg.MEAN, "local"), (Sync.NONE, Agg.ONLY_FIRST_REPLICA, "local"),
]


def expected_gradient(route, rank, size, local):
    """What every rank applies when rank r's gradient is local(r)."""
    return {"sum": sum(local(r) for r in range(size)),
            "mean": sum(local(r) for r in range(size)) / size,
            "first": local(0), "local": local(rank)}[route]


@pytest.mark.parametrize(("sync", "agg", "route"), POLICIES,
                         ids=[f"{s.name}-{a.name}" for s, a, _ in POLICIES])
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_dense_policy(strategy, sync, agg, route, momentum, nesterov):
    rank, size = strategy.rank, strategy.num_replicas_in_sync
    local = lambda r: np.array([r + 1.0, 2.0 * r - 1.0, 0.5])  # noqa: E731
    with strategy.scope():
        var = distsgd.Variable(np.zeros(3), synchronization=sync, aggregation=agg, name="v")
        opt = SGD(0.5, momentum=momentum, nesterov=nesterov)
    reference = distsgd.Variable(np.zeros(3))
    reference_opt = SGD(0.5, momentum=momentum, nesterov=nesterov)
    for step in range(3):
        with strategy.scope():
            opt.apply_gradients([(local(rank) * (step + 1), var)])
        want = expected_gradient(route, rank, size, local) * (step + 1)
        reference_opt.apply_gradients([(want, reference)])
        np.testing.assert_allclose(var.numpy(), reference.numpy(), rtol=1e-12)
    if route != "local":
        assert_replicas_identical(strategy, var.numpy(), *opt.get_weights())


@pytest.mark.parametrize(("agg", "route"), [(Agg.NONE, "sum"), (Agg.SUM, "sum"),
                                            (Agg.MEAN, "mean"),
                                            (Agg.ONLY_FIRST_REPLICA, "first")])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_policy_gathers_rows(strategy, agg, route, momentum):
    rank, size = strategy.rank, strategy.num_replicas_in_sync
    rows = size + 2
    with strategy.scope():
        emb = distsgd.Variable(np.ones((rows, 2)), aggregation=agg, name="emb")
        opt = SGD(1.0, momentum=momentum)
        # rank r touches rows r and r+1, with values r+1: neighbours overlap (duplicates)
        opt.apply_gradients([(distsgd.IndexedSlices(np.full((2, 2), rank + 1.0),
                                                    [rank, rank + 1], (rows, 2)), emb)])
    contribution = np.zeros((rows, 2))
    senders = {"sum": range(size), "mean": range(size), "first": [0]}[route]
    for r in senders:
        contribution[[r, r + 1]] += r + 1.0
    if route == "mean":
        contribution /= size
    np.testing.assert_allclose(emb.numpy(), 1.0 - contribution, atol=1e-12)
    if momentum:
        touched = contribution.any(axis=1)
        slot = opt.get_slot(emb, "momentum").numpy()
        assert np.all(slot[~touched] == 0) and np.all(slot[touched] != 0)
    assert_replicas_identical(strategy, emb.numpy(), *opt.get_weights())


def test_sparse_as_dense_option(strategy):
    from distsgd.distribute import MPIStrategy

    dense_strategy = MPIStrategy(sparse_as_dense=True)
    rank, size = strategy.rank, strategy.num_replicas_in_sync
    with dense_strategy.scope():
        emb = distsgd.Variable(np.ones((size + 1, 1)), name="emb")
        opt = SGD(1.0, momentum=0.5)
        for _ in range(2):
            opt.apply_gradients([(distsgd.IndexedSlices(np.ones((1, 1)), [rank], None), emb)])
    # densified: untouched row (the last) still decays through the dense momentum path
    dense_reference = distsgd.Variable(np.ones((size + 1, 1)))
    ref_opt = SGD(1.0, momentum=0.5)
    g = np.vstack([np.ones((size, 1)), np.zeros((1, 1))])
    for _ in range(2):
        ref_opt.apply_gradients([(g, dense_reference)])
    np.testing.assert_array_equal(emb.numpy(), dense_reference.numpy())


def test_on_read_trainable_is_refused(strategy):
    with strategy.scope(), pytest.raises(ValueError, match="ON_READ only for non-trainable"):
        distsgd.Variable(0.0, trainable=True, synchronization=Sync.ON_READ)


@pytest.mark.parametrize(("agg", "want"), [
    (Agg.SUM, lambda size: size * (size + 1) / 2), (Agg.MEAN, lambda size: (size + 1) / 2),
    (Agg.ONLY_FIRST_REPLICA, lambda size: 1.0)])
def test_on_read_metric_combined_when_read(strategy, agg, want):
    with strategy.scope():
        metric = distsgd.Variable(0.0, synchronization=Sync.ON_READ, aggregation=agg,
                                  dtype=np.float64)
    metric.assign(strategy.rank + 1.0)  # each replica counts its own
    assert float(strategy.read_var(metric)) == want(strategy.num_replicas_in_sync)
    assert float(metric.numpy()) == strategy.rank + 1.0


def test_on_read_metric_without_aggregation_cannot_be_read(strategy):
    with strategy.scope():
        metric = distsgd.Variable(0.0, synchronization=Sync.ON_READ)
    with pytest.raises(ValueError, match="Could not convert"):
        strategy.read_var(metric)
