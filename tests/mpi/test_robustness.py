"""Missing gradients, mismatched programs, and the strategy's collectives."""

import contextlib

import numpy as np
import pytest

import distsgd
from distsgd.distribute import MismatchError, ReduceOp, ShardedBatches, get_strategy
from distsgd.distribute.data import replica_share
from distsgd.optimizers import SGD
from tests.mpi.conftest import assert_replicas_identical

pytestmark = pytest.mark.mpi


def test_gradient_missing_on_some_ranks_is_reduced_as_zeros(strategy):
    rank, size = strategy.rank, strategy.num_replicas_in_sync
    with strategy.scope():
        a = distsgd.Variable(np.zeros(2), name="a")
        emb = distsgd.Variable(np.zeros((3, 1)), name="emb")
        opt = SGD(1.0)
        # rank 0 has no gradient for either variable; with one rank nobody has one
        grad_a = None if rank == 0 else np.ones(2)
        grad_emb = None if rank == 0 else distsgd.IndexedSlices(np.ones((1, 1)), [1], None)
        alone = pytest.warns(UserWarning, match="do not exist") if size == 1 else \
            contextlib.nullcontext()
        with alone:
            opt.apply_gradients([(grad_a, a), (grad_emb, emb), (np.ones(2), a)])
    np.testing.assert_allclose(a.numpy(), [-(size - 1) - size] * 2)
    np.testing.assert_allclose(emb.numpy().ravel(), [0, -(size - 1), 0])
    assert_replicas_identical(strategy, a.numpy(), emb.numpy(), *opt.get_weights())


def test_variable_without_gradient_anywhere_is_skipped_with_a_warning(strategy):
    with strategy.scope():
        a, b = distsgd.Variable([1.0], name="a"), distsgd.Variable([1.0], name="b")
        opt = SGD(1.0)
        with pytest.warns(UserWarning, match=r"\['b'\]"):
            opt.apply_gradients([(np.float32([1.0]), a), (None, b)])
        with pytest.raises(ValueError, match="No gradients provided for any variable"):
            opt.apply_gradients([(None, a), (None, b)])
    assert b.numpy().tolist() == [1.0]
    assert int(opt.iterations.numpy()) == 1


def test_dense_on_some_ranks_sparse_on_others_is_densified(strategy):
    rank, size = strategy.rank, strategy.num_replicas_in_sync
    with strategy.scope():
        emb = distsgd.Variable(np.zeros((2, 1)), name="emb")
        grad = np.ones((2, 1)) if rank % 2 else distsgd.IndexedSlices(np.ones((1, 1)), [0],
                                                                       None)
        SGD(1.0).apply_gradients([(grad, emb)])
    odd = size // 2
    np.testing.assert_allclose(emb.numpy().ravel(), [-size, -odd])


@pytest.mark.mpi(min_size=2)
def test_shape_mismatch_raises_the_same_error_on_every_rank(strategy):
    rank = strategy.rank
    shape = (4, 5) if rank != 1 else (5, 4)
    var = distsgd.Variable(np.zeros(shape), name="kernel", _owner=strategy)  # not mirrored
    with strategy.scope(), pytest.raises(MismatchError) as error:
        SGD(1.0).apply_gradients([(np.ones(shape), var)])
    message = str(error.value)
    assert "variable #0" in message and "'kernel' shape (5, 4) float64 (sum)" in message
    assert "rank 1: 'kernel' shape (5, 4)" in message
    assert len(set(strategy.communicator.allgather_object(message))) == 1
    assert var.numpy().sum() == 0


@pytest.mark.mpi(min_size=2)
def test_variable_count_mismatch_is_named(strategy):
    rank = strategy.rank
    variables = [distsgd.Variable(np.zeros(2), name=f"v{i}", _owner=strategy) for i in range(3)]
    chosen = variables if rank == 0 else variables[:2]
    with strategy.scope(), pytest.raises(MismatchError, match=r"2 vs 3 variables"):
        SGD(1.0).apply_gradients([(np.ones(2), v) for v in chosen])


@pytest.mark.mpi(min_size=2)
def test_mirrored_creation_mismatch_is_named(strategy):
    shape = (3,) if strategy.rank == 0 else (2,)
    with strategy.scope(), pytest.raises(MismatchError, match="creation of variable 'w'"):
        distsgd.Variable(np.zeros(shape), name="w")


def test_reduce_broadcast_barrier(strategy):
    rank, size = strategy.rank, strategy.num_replicas_in_sync
    np.testing.assert_array_equal(strategy.reduce(ReduceOp.SUM, np.array([rank, 1.0])),
                                  [size * (size - 1) / 2, size])
    assert strategy.reduce("mean", np.float64(rank + 1)) == (size + 1) / 2
    per_example = np.full((rank + 1, 2), 1.0)  # ranks hold different batch sizes
    np.testing.assert_array_equal(strategy.reduce("MEAN", per_example, axis=0), [1.0, 1.0])
    np.testing.assert_array_equal(strategy.broadcast(np.array([rank, rank])), [0, 0])
    var = distsgd.Variable([float(rank)])
    assert strategy.broadcast(var, root=size - 1) is var
    assert var.numpy().tolist() == [size - 1]
    strategy.barrier()
    with pytest.raises(ValueError, match="reduce_op='max'"):
        strategy.reduce("max", 1.0)
    with pytest.raises(ValueError, match=r"root=99; expected a rank in \[0,"):
        strategy.broadcast(np.zeros(1), root=99)


def test_get_strategy_follows_scope(strategy):
    default = get_strategy()
    assert default.num_replicas_in_sync == 1 and default is not strategy
    with strategy.scope() as active:
        assert active is strategy and get_strategy() is strategy
    assert get_strategy() is default


def test_sharded_batches_agree_on_steps_and_cover_the_global_batch(strategy):
    size, rank = strategy.num_replicas_in_sync, strategy.rank
    x = np.arange(50)
    batches = ShardedBatches([x], global_batch_size=2 * size + 1, strategy=strategy, seed=1)
    assert batches.steps_per_epoch == 50 // (2 * size + 1)
    mine = np.concatenate([b[0] for _, b in batches.epoch(0)])
    everyone = np.concatenate(strategy.communicator.allgather_object(mine))
    assert len(set(everyone.tolist())) == len(everyone) == batches.steps_per_epoch * (2 * size + 1)
    # ranks holding different amounts of data still agree on the smaller step count
    assert strategy.agree_steps(10 + rank) == 10


def test_replica_share_splits_evenly():
    shares = [replica_share(10, r, 3) for r in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 4), (4, 7), (7, 10)]


def test_abort_ends_the_whole_job_after_the_reason_is_forwarded(monkeypatch):
    """MPI_Abort goes to COMM_WORLD (MPICH then has the launcher end every process; on a
    cloned communicator it only messages peers, which a rank busy outside MPI never reads),
    under a kernel alarm; the e2e failure tests show the reason is forwarded first."""
    from distsgd.distribute import comm as comm_lib

    communicator = comm_lib.MPICommunicator()  # collective: every rank makes one
    calls = []

    class World:
        @staticmethod
        def Abort(code):
            calls.append(("abort", code))

    monkeypatch.setattr(comm_lib, "OUTPUT_FORWARD_SECONDS", 0.0)
    monkeypatch.setattr(comm_lib.signal, "alarm", lambda seconds: calls.append(("alarm", seconds)))
    monkeypatch.setattr(communicator, "_MPI", type("MPI", (), {"COMM_WORLD": World}))
    communicator.abort(3)
    communicator.free()
    assert calls == [("alarm", comm_lib.ABORT_GRACE_SECONDS), ("abort", 3)]


def test_free_ends_every_heartbeat_stream_so_none_is_left_unreceived():
    """Each rank's last heartbeat is STOPPED, and a rank frees its communicator only after
    every peer's STOPPED arrived: nothing is left for MPI_Finalize (UCX warned about such
    messages on stdout, after the training program's final line)."""
    import time

    from distsgd.distribute import comm as comm_lib
    from distsgd.distribute import watchdog as watchdog_lib

    communicator = comm_lib.MPICommunicator()
    watchdog = communicator._watchdog
    if watchdog is None or communicator.size == 1:
        communicator.free()
        pytest.skip("heartbeats need MPI_THREAD_MULTIPLE and two ranks")
    time.sleep(2.5 * watchdog_lib.HEARTBEAT_SECONDS)  # some heartbeats in flight
    heartbeats = communicator._heartbeats
    started = time.monotonic()
    watchdog.stop()
    assert time.monotonic() - started < watchdog_lib.STOP_SECONDS
    assert not watchdog._receives and not watchdog._sends
    assert {peer: status[1] for peer, status in watchdog._status.items()} == {
        peer: watchdog_lib.STOPPED for peer in range(communicator.size)
        if peer != communicator.rank}
    mpi = communicator._MPI
    assert not heartbeats.Iprobe(source=mpi.ANY_SOURCE, tag=mpi.ANY_TAG)
    communicator._watchdog = None
    communicator.free()
