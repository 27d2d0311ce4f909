"""Checkpoints written and restored collectively at any world size."""

import numpy as np
import pytest

import distsgd
from distsgd.checkpoint import load_checkpoint, save_checkpoint, state_digest
from distsgd.optimizers import SGD
from tests.mpi.conftest import assert_replicas_identical

pytestmark = pytest.mark.mpi


def _model(strategy, seed):
    with strategy.scope():
        w = distsgd.Variable(np.random.default_rng(seed).standard_normal((3, 2)), name="w")
        local = distsgd.Variable(np.full(2, float(strategy.rank)), name="local",
                                 synchronization=distsgd.VariableSynchronization.NONE)
        return [w, local], SGD(0.1, momentum=0.9)


def test_collective_round_trip_with_rank_local_state(strategy, tmp_path_factory):
    directory = strategy.communicator.allgather_object(
        str(tmp_path_factory.mktemp("ckpt")) if strategy.rank == 0 else None)[0]
    variables, opt = _model(strategy, 0)
    with strategy.scope():
        for step in range(3):
            opt.apply_gradients([(np.ones((3, 2)) * (step + strategy.rank), variables[0]),
                                 (np.ones(2), variables[1])])
    save_checkpoint(directory, step=3, variables=variables, optimizer=opt, strategy=strategy,
                    state={"next": 4})
    restored, restored_opt = _model(strategy, 1)
    state = load_checkpoint(directory, variables=restored, optimizer=restored_opt,
                            strategy=strategy)
    assert state == {"next": 4}
    assert state_digest(restored + restored_opt.weights) == \
        state_digest(variables + opt.weights)
    assert_replicas_identical(strategy, restored[0].numpy(), restored_opt.get_weights()[0])
    np.testing.assert_array_equal(restored[1].numpy(), variables[1].numpy())
