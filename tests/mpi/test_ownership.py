"""Variables carry their strategy: every call that acts on variables gives bitwise the same
result inside and outside ``strategy.scope()``, the way users write their loops; mixing
strategies, or unmirrored variables with a multi-rank optimizer, is refused on every rank
before anything changes."""

import autograd.numpy as anp
import numpy as np
import pytest

import distsgd
from distsgd.checkpoint import load_checkpoint, save_checkpoint
from distsgd.distribute import MPIStrategy, state_digest
from distsgd.optimizers import SGD
from tests.mpi.conftest import assert_replicas_identical

pytestmark = pytest.mark.mpi

STEPS = 3


def _model(strategy, seed=0):
    """Made the documented way: variables and the optimizer inside ``scope()``."""
    rng = np.random.default_rng(seed)
    with strategy.scope():
        w = distsgd.Variable(rng.standard_normal((4, 3)).astype(np.float32), name="w")
        b = distsgd.Variable(np.zeros(3, np.float32), name="b")
        opt = SGD(0.1, momentum=0.9, nesterov=True)
    return [w, b], opt


def _grads(strategy, step):
    """Different on every rank: without aggregation the replicas would drift apart."""
    rng = np.random.default_rng([strategy.rank, step])
    return [rng.standard_normal((4, 3)).astype(np.float32),
            rng.standard_normal(3).astype(np.float32)]


def _loss(strategy, variables, step):
    x = np.random.default_rng([strategy.rank, step, 7]).standard_normal((5, 4))
    x = x.astype(np.float32)
    w, b = variables
    return lambda: anp.sum(anp.tanh(anp.dot(x, w) + b) ** 2)


def _train(strategy, inside, how):
    variables, opt = _model(strategy)
    for step in range(STEPS):
        def run(step=step):
            if how == "apply_gradients":
                opt.apply_gradients(zip(_grads(strategy, step), variables, strict=True))
            elif how == "minimize":
                opt.minimize(_loss(strategy, variables, step), variables)
            else:  # get_gradients (this replica's), then apply_gradients aggregates
                grads = opt.get_gradients(_loss(strategy, variables, step), variables)
                opt.apply_gradients(zip(grads, variables, strict=True))
        if inside:
            with strategy.scope():
                run()
        else:
            run()
    return variables, opt


@pytest.mark.parametrize("how", ["apply_gradients", "minimize", "get_gradients"])
def test_steps_outside_the_scope_equal_steps_inside(strategy, how):
    inside = _train(strategy, True, how)
    outside = _train(strategy, False, how)
    digests = [state_digest(v + o.weights) for v, o in (inside, outside)]
    assert digests[0] == digests[1]
    variables, opt = outside
    assert_replicas_identical(strategy, *[v.numpy() for v in variables + opt.weights])
    assert strategy.check_replicas(variables, opt) == []
    assert int(opt.iterations.numpy()) == STEPS


def test_the_optimizers_state_belongs_to_the_variables_strategy(strategy):
    variables, opt = _train(strategy, False, "apply_gradients")
    assert all(w.distribute_strategy is strategy for w in opt.weights)
    assert all(v.distribute_strategy is strategy for v in variables)


def test_an_optimizer_made_outside_any_scope_takes_the_variables_strategy(strategy):
    variables, _ = _model(strategy)
    opt = SGD(0.1, momentum=0.9)  # outside: bound on its first step
    opt.apply_gradients(zip(_grads(strategy, 0), variables, strict=True))
    assert opt.iterations.distribute_strategy is strategy
    assert_replicas_identical(strategy, *[v.numpy() for v in variables + opt.weights])


@pytest.mark.parametrize("inside", [True, False])
def test_checkpoints_outside_the_scope_equal_inside(strategy, tmp_path_factory, inside):
    directory = strategy.communicator.allgather_object(
        str(tmp_path_factory.mktemp("own")) if strategy.rank == 0 else None)[0]
    variables, opt = _train(strategy, False, "apply_gradients")
    restored, restored_opt = _model(strategy, seed=1)
    if inside:
        with strategy.scope():
            path = save_checkpoint(directory, step=STEPS, variables=variables, optimizer=opt)
            load_checkpoint(directory, variables=restored, optimizer=restored_opt)
    else:
        path = save_checkpoint(directory, step=STEPS, variables=variables, optimizer=opt)
        load_checkpoint(directory, variables=restored, optimizer=restored_opt)
    # rank 0 wrote the replicated state, once: no rank wrote a directory of its own
    files = sorted(p.name for p in path.iterdir())
    assert files == ["arrays.npz", "manifest.json"]
    assert state_digest(restored + restored_opt.weights) == state_digest(variables + opt.weights)
    assert_replicas_identical(strategy, *[v.numpy() for v in restored + restored_opt.weights])


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("how", ["apply_gradients", "minimize", "get_gradients", "checkpoint"])
def test_unmirrored_variables_are_refused_on_every_rank_and_nothing_changes(
        strategy, tmp_path, how):
    with strategy.scope():
        opt = SGD(0.1, momentum=0.9)
    stray = distsgd.Variable(np.full(3, float(strategy.rank), np.float32), name="stray")
    before = stray.numpy()
    with pytest.raises(ValueError) as error:
        if how == "apply_gradients":
            opt.apply_gradients([(np.ones(3, np.float32), stray)])
        elif how == "minimize":
            opt.minimize(lambda: anp.sum(stray * stray), [stray])
        elif how == "get_gradients":
            opt.get_gradients(lambda: anp.sum(stray * stray), [stray])
        else:
            save_checkpoint(tmp_path, step=0, variables=[stray], optimizer=opt,
                            strategy=strategy)
    message = str(error.value)
    assert "'stray' created outside any strategy.scope()" in message
    assert "strategy.scope()" in message and "synchronization=VariableSynchronization.NONE" \
        in message
    assert len(set(strategy.communicator.allgather_object(message))) == 1
    np.testing.assert_array_equal(stray.numpy(), before)
    assert opt.weights == []
    strategy.barrier()  # every rank is still in step: nothing hung, nothing half-done


@pytest.mark.mpi(min_size=2)
def test_mixing_two_strategies_is_refused(strategy):
    other = MPIStrategy()
    with strategy.scope():
        mine = distsgd.Variable(np.zeros(2, np.float32), name="mine")
    with other.scope():
        theirs = distsgd.Variable(np.zeros(2, np.float32), name="theirs")
    with pytest.raises(ValueError, match=r"'mine' created in the scope of .*'theirs' created"):
        SGD(0.1).apply_gradients([(np.ones(2, np.float32), mine),
                                  (np.ones(2, np.float32), theirs)])
    with other.scope():
        opt = SGD(0.1)
    with pytest.raises(ValueError, match="the optimizer .* belongs to"):
        opt.apply_gradients([(np.ones(2, np.float32), mine)])
    with pytest.raises(ValueError, match="'theirs' created in the scope"):
        strategy.check_replicas([theirs])


def test_rank_local_variables_fit_any_strategy(strategy):
    with strategy.scope():
        opt = SGD(1.0)
    local = distsgd.Variable(np.zeros(2, np.float32), name="local",
                             synchronization=distsgd.VariableSynchronization.NONE)
    opt.apply_gradients([(np.full(2, float(strategy.rank), np.float32), local)])
    np.testing.assert_array_equal(local.numpy(), [-strategy.rank] * 2)


def test_with_no_multi_rank_strategy_each_process_trains_alone(strategy):
    """A plain one-process script run under mpirun: nothing crosses ranks, as before."""
    var = distsgd.Variable(np.zeros(2, np.float32), name="v")
    SGD(1.0).apply_gradients([(np.full(2, float(strategy.rank), np.float32), var)])
    np.testing.assert_array_equal(var.numpy(), [-strategy.rank] * 2)
