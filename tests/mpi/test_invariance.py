"""World-size invariance: the same bits at every world size, and as one process.

Each rank trains with ``MPIStrategy(world_size_invariant=True)`` on its share of the
micro-batches, then alone (a one-rank communicator, ``COMM_SELF``) on all of them; the
digests must be equal, for every policy, dense, sparse and mixed gradients, float32 and
float64, and shares that the world size does not divide. Gradients span many orders of
magnitude, so any other order of additions changes bits (checked by a mutation)."""

import numpy as np
import pytest

import distsgd
from distsgd import VariableAggregation as Agg
from distsgd.distribute import MPIStrategy, state_digest
from distsgd.distribute.comm import launched_by_mpi
from distsgd.distribute.data import replica_share
from distsgd.optimizers import SGD

pytestmark = pytest.mark.mpi

SHAPES = [(6, 4), (5,), (3, 3), (9,)]


def _alone(micro_batches):
    if not launched_by_mpi():
        return MPIStrategy(world_size_invariant=True, micro_batches=micro_batches)
    from mpi4py import MPI

    return MPIStrategy(MPI.COMM_SELF, world_size_invariant=True, micro_batches=micro_batches)


def _gradient(kind, shape, dtype, step, index, position):
    rng = np.random.default_rng([step, index, position])
    scale = 10.0 ** rng.integers(-6, 6, shape)
    dense = (rng.standard_normal(shape) * scale).astype(dtype)
    if kind == "dense" or (kind == "mixed" and index % 3 != 1):
        return dense
    rows = rng.integers(0, shape[0], 4)  # duplicates likely
    return distsgd.IndexedSlices(dense[rows] * dtype(1.5), rows, shape)


def _train(strategy, policy, kind, dtype, micro_batches, steps=3):
    with strategy.scope():
        variables = [distsgd.Variable(np.ones(s, dtype), name=f"v{i}", aggregation=policy)
                     for i, s in enumerate(SHAPES)]
        opt = SGD(0.01, momentum=0.9, nesterov=True)
    accumulator = distsgd.GradientAccumulator(variables)
    share = replica_share(micro_batches, strategy.rank, strategy.num_replicas_in_sync)
    for step in range(steps):
        for index in range(share.start, share.stop):
            accumulator.add(gradients=[_gradient(kind, s, dtype, step, index, p)
                                       for p, s in enumerate(SHAPES)], index=index)
        opt.apply_gradients(accumulator)
    return state_digest(variables + opt.weights)


@pytest.mark.parametrize("micro_batches", [4, 7])  # 7: uneven shares at 2, 3 and 4 ranks
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["dense", "sparse", "mixed"])
@pytest.mark.parametrize("policy", [Agg.NONE, Agg.SUM, Agg.MEAN, Agg.ONLY_FIRST_REPLICA])
def test_every_world_size_gives_the_one_process_bits(strategy, policy, kind, dtype,
                                                      micro_batches):
    if strategy.num_replicas_in_sync > micro_batches:
        pytest.skip("more ranks than micro-batches")
    invariant = MPIStrategy(world_size_invariant=True, micro_batches=micro_batches)
    got = _train(invariant, policy, kind, dtype, micro_batches)
    want = _train(_alone(micro_batches), policy, kind, dtype, micro_batches)
    assert got == want
    assert len(set(invariant.communicator.allgather_object(got))) == 1


@pytest.mark.mpi(min_size=2)
def test_mpis_own_order_would_change_the_bits(strategy, monkeypatch):
    """The mutation: each rank sums its micro-batches in order, then one Allreduce (the
    usual way) — the digests then differ from one process, so the test above can fail."""
    from distsgd.distribute.transport import TreeTransport

    def allreduce_of_local_sums(self, communicator, values, out, what=""):
        np.copyto(out, values[0])
        for piece in values[1:]:
            np.add(out, piece, out=out)
        communicator.allreduce_(out, "sum", what=what)

    micro_batches = 2 * strategy.num_replicas_in_sync + 1
    want = _train(_alone(micro_batches), Agg.SUM, "dense", np.float32, micro_batches)
    monkeypatch.setattr(TreeTransport, "reduce_", allreduce_of_local_sums)
    invariant = MPIStrategy(world_size_invariant=True, micro_batches=micro_batches)
    got = _train(invariant, Agg.SUM, "dense", np.float32, micro_batches)
    assert got != want


def test_accumulators_refuse_micro_batches_out_of_turn(strategy):
    micro_batches = 2 * strategy.num_replicas_in_sync
    invariant = MPIStrategy(world_size_invariant=True, micro_batches=micro_batches)
    with invariant.scope():
        w = distsgd.Variable(np.zeros(3), name="w")
        opt = SGD(0.1)
    accumulator = distsgd.GradientAccumulator([w])
    first = accumulator.share().start
    with pytest.raises(ValueError, match=f"expects {first}"):
        accumulator.add(gradients=[np.ones(3)], index=first + 1)
    accumulator.add(gradients=[np.ones(3)], index=first)
    with pytest.raises(ValueError, match="added 1 of its micro-batches"):
        opt.apply_gradients(accumulator)
    with pytest.raises(ValueError, match="pass the step's gradients as a "
                                         "distsgd.GradientAccumulator"):
        opt.apply_gradients([(np.ones(3), w)])
    assert w.numpy().tolist() == [0, 0, 0] and opt.weights == []


def test_summing_accumulation_equals_one_big_batch(strategy):
    """Without invariance, micro-batches are summed, then aggregated as usual: with exact
    (integer) gradients, the same as applying their sum."""
    with strategy.scope():
        w = distsgd.Variable(np.zeros(4), name="w")
        reference = distsgd.Variable(np.zeros(4), name="reference")
        opt, reference_opt = SGD(0.5, momentum=0.5), SGD(0.5, momentum=0.5)
    accumulator = distsgd.GradientAccumulator([w])
    rng = np.random.default_rng(strategy.rank)
    for _ in range(2):
        parts = [rng.integers(-4, 5, 4).astype(np.float64) for _ in range(3)]
        for part in parts:
            accumulator.add(gradients=[part])
        opt.apply_gradients(accumulator)
        reference_opt.apply_gradients([(sum(parts), reference)])
    np.testing.assert_array_equal(w.numpy(), reference.numpy())


def test_minimize_takes_micro_batches(strategy):
    import autograd.numpy as anp

    micro_batches = strategy.num_replicas_in_sync + 1
    invariant = MPIStrategy(world_size_invariant=True, micro_batches=micro_batches)

    def run(strategy_):
        with strategy_.scope():
            w = distsgd.Variable(np.full(3, 0.5), name="w")
            opt = SGD(0.1, momentum=0.9)
        share = replica_share(micro_batches, strategy_.rank, strategy_.num_replicas_in_sync)
        for step in range(3):
            opt.minimize([(m, lambda m=m, step=step: anp.sum(anp.sin(w * (m + step + 1)) ** 2))
                          for m in range(share.start, share.stop)], [w])
        return state_digest([w, *opt.weights])

    assert run(invariant) == run(_alone(micro_batches))
