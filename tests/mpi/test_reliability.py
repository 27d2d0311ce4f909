"""Divergence detection and repair, and skipping non-finite steps on every rank alike."""

import numpy as np
import pytest

import distsgd
from distsgd.distribute import MPIStrategy, ReplicaDivergenceError
from distsgd.optimizers import SGD
from tests.mpi.conftest import assert_replicas_identical

pytestmark = pytest.mark.mpi


def _trained(strategy):
    with strategy.scope():
        w = distsgd.Variable(np.zeros((3, 2)), name="w")
        b = distsgd.Variable(np.zeros(2), name="b")
        local = distsgd.Variable(np.full(2, float(strategy.rank)), name="local",
                                 synchronization=distsgd.VariableSynchronization.NONE)
        opt = SGD(0.1, momentum=0.9)
        opt.apply_gradients([(np.ones((3, 2)), w), (np.ones(2), b), (np.ones(2), local)])
    return [w, b, local], opt


def test_identical_replicas_pass_the_check(strategy):
    variables, opt = _trained(strategy)
    assert strategy.check_replicas(variables, optimizer=opt) == []


@pytest.mark.mpi(min_size=2)
def test_divergence_is_named_then_repaired(strategy):
    variables, opt = _trained(strategy)
    last = strategy.num_replicas_in_sync - 1
    if strategy.rank == last:
        variables[1].assign_add([1e-9, 0.0])
        opt.get_slot(variables[0], "momentum").assign_add(np.ones((3, 2)))
    with pytest.raises(ReplicaDivergenceError) as error:
        strategy.check_replicas(variables, optimizer=opt)
    message = str(error.value)
    assert f"'b': ranks [{last}] differ from rank 0" in message
    assert f"'SGD/w/momentum': ranks [{last}] differ from rank 0" in message
    assert "'w'" not in message.replace("SGD/w/", "")
    with pytest.warns(UserWarning, match="repaired from rank 0"):
        repaired = strategy.check_replicas(variables, optimizer=opt, repair=True)
    assert repaired == ["b", "SGD/w/momentum"]
    assert_replicas_identical(strategy, variables[1].numpy(), *opt.get_weights())
    assert strategy.check_replicas(variables, optimizer=opt) == []


@pytest.mark.mpi(min_size=2)
def test_periodic_check_catches_divergence_at_the_next_step():
    checked = MPIStrategy(check_replicas_every_steps=2)
    with checked.scope():
        w = distsgd.Variable(np.zeros(4), name="w")
        opt = SGD(0.1)
        opt.apply_gradients([(np.ones(4), w)])
        if checked.rank == 1:
            w.assign_add(np.full(4, 0.5))
        with pytest.raises(ReplicaDivergenceError, match=r"'w': ranks \[1\] differ"):
            opt.apply_gradients([(np.ones(4), w)])


def test_nan_propagates_by_default_as_in_keras(strategy):
    with strategy.scope():
        w = distsgd.Variable(np.zeros(2), name="w")
        opt = SGD(0.1)
        grad = np.array([np.nan, 1.0]) if strategy.rank == 0 else np.ones(2)
        opt.apply_gradients([(grad, w)])
    assert np.isnan(w.numpy()[0]) and int(opt.iterations.numpy()) == 1


@pytest.mark.parametrize("where", ["mirrored", "rank-local"])
def test_opt_in_skips_non_finite_steps_on_every_rank(strategy, where):
    last = strategy.num_replicas_in_sync - 1
    with strategy.scope():
        w = distsgd.Variable(np.zeros(2), name="w")
        local = distsgd.Variable(np.zeros(2), name="local",
                                 synchronization=distsgd.VariableSynchronization.NONE)
        opt = SGD(0.1, momentum=0.9)
        opt.skip_nonfinite_steps = True
        opt.apply_gradients([(np.ones(2), w), (np.ones(2), local)])
        before = [w.numpy(), local.numpy(), *opt.get_weights()]
        bad = np.array([np.inf, 0.0])
        grads = [np.ones(2), np.ones(2)]
        if strategy.rank == last:
            grads[0 if where == "mirrored" else 1] = bad
        with pytest.warns(UserWarning, match="step skipped on every replica"):
            opt.apply_gradients([(grads[0], w), (grads[1], local)])
        after = [w.numpy(), local.numpy(), *opt.get_weights()]
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
        assert opt.nonfinite_steps_skipped == 1
        opt.apply_gradients([(np.ones(2), w), (np.ones(2), local)])
    assert int(opt.iterations.numpy()) == 2
    assert_replicas_identical(strategy, w.numpy(), *opt.get_weights()[:2])
