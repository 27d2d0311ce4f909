"""Ranks at different operations, steps or batches raise the same named MismatchError on
every rank (never MPI's fatal abort, never an internal error), change nothing, and can
carry on afterwards: each failed operation took one operation check on every rank."""

import numpy as np
import pytest

import distsgd
from distsgd.distribute import MismatchError, ShardedBatches
from distsgd.optimizers import SGD

pytestmark = [pytest.mark.mpi, pytest.mark.mpi(min_size=2)]


def _model(strategy):
    with strategy.scope():
        w = distsgd.Variable(np.zeros(4), name="w")
        opt = SGD(0.1, momentum=0.9)
    return w, opt


def _same_everywhere(strategy, error):
    message = str(error.value)
    assert len(set(strategy.communicator.allgather_object(message))) == 1
    return message


@pytest.mark.parametrize("other", ["check_replicas", "reduce", "barrier", "save"])
def test_a_rank_that_skipped_a_step_and_went_on_is_named(strategy, tmp_path_factory, other):
    """Rank 1 skipped the step (it caught an exception, say) and is at its next call."""
    w, opt = _model(strategy)
    opt.apply_gradients([(np.ones(4), w)])
    before = w.numpy()
    directory = strategy.communicator.allgather_object(
        str(tmp_path_factory.mktemp("skip")) if strategy.rank == 0 else None)[0]
    with pytest.raises(MismatchError) as error:
        if strategy.rank == 1:
            if other == "check_replicas":
                strategy.check_replicas([w], opt)
            elif other == "reduce":
                strategy.reduce("SUM", np.ones(3))
            elif other == "barrier":
                strategy.barrier()
            else:
                from distsgd.checkpoint import save_checkpoint

                save_checkpoint(directory, step=1, variables=[w], optimizer=opt)
        else:
            opt.apply_gradients([(np.ones(4), w)])
    message = _same_everywhere(strategy, error)
    assert "ranks are out of step" in message
    assert "at gradient aggregation at step 1" in message
    np.testing.assert_array_equal(w.numpy(), before)
    assert int(opt.iterations.numpy()) == 1
    strategy.barrier()  # in step again: the failed operation was one check everywhere


def test_ranks_at_different_steps_are_named(strategy):
    w, opt = _model(strategy)
    opt.apply_gradients([(np.ones(4), w)])
    opt.iterations.assign(1 + (strategy.rank == 1))  # rank 1 is one step ahead
    with pytest.raises(MismatchError) as error:
        opt.apply_gradients([(np.ones(4), w)])
    message = _same_everywhere(strategy, error)
    assert "gradient aggregation at step 2" in message and \
        "gradient aggregation at step 1" in message


def test_ranks_on_different_batches_are_named(strategy):
    """A retry loop: each rank skipped one batch, at different steps, and so calls
    apply_gradients as often as the others, but with another batch's gradients."""
    w, opt = _model(strategy)
    batches = ShardedBatches([np.arange(100.0)], 2 * strategy.num_replicas_in_sync,
                             strategy, seed=0)
    skip = 1 + (strategy.rank == 1)
    with pytest.raises(MismatchError) as error:
        for step, (x,) in batches.epoch(0):
            if step == skip:
                continue  # pretend the batch failed
            opt.apply_gradients([(np.full(4, x.sum()), w)])
    message = _same_everywhere(strategy, error)
    assert "epoch 0, batch 2" in message and "epoch 0, batch 1" in message
    assert int(opt.iterations.numpy()) == 1  # steps 0 ran; nothing after the mismatch


def test_a_mismatch_inside_reduce_and_broadcast_is_named(strategy):
    shape = (3,) if strategy.rank != 1 else (4,)
    with pytest.raises(MismatchError, match=r"strategy.reduce\(SUM\) at value #0"):
        strategy.reduce("SUM", np.ones(shape))
    with pytest.raises(MismatchError, match="strategy.broadcast at value #0"):
        strategy.broadcast(np.ones(shape))
    assert strategy.reduce("SUM", np.ones(2)).tolist() == [strategy.num_replicas_in_sync] * 2
