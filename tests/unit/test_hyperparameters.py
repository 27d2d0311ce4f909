import numpy as np
import pytest

import distsgd
from distsgd.optimizers import SGD
from distsgd.optimizers.schedules import InverseTimeDecay
from tests.helpers import variables


@pytest.mark.parametrize(("kwargs", "want"), [
    (dict(lr=1.0), 1.0), (dict(learning_rate=0.1, lr=1.0), 1.0), (dict(learning_rate=0.1), 0.1),
])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lr_alias_wins_and_is_a_float32_variable(kwargs, want, momentum):
    opt = SGD(momentum=momentum, **kwargs)
    assert isinstance(opt.lr, distsgd.Variable)
    assert opt.lr is opt.learning_rate
    assert opt.lr.dtype == np.float32
    assert float(opt.lr.numpy()) == pytest.approx(want)


def test_setting_hypers_after_creation():
    opt = SGD(lr=3.0)
    lr_variable = opt.lr
    opt.lr = 2.0
    assert opt.lr is lr_variable and float(opt.lr.numpy()) == 2.0
    opt.lr.assign(4.0)
    assert float(opt.learning_rate.numpy()) == 4.0
    with pytest.raises(TypeError, match="callable"):
        opt.learning_rate = lambda: 1.0
    opt.learning_rate = InverseTimeDecay(1.0, 1.0, 1.0)
    assert isinstance(opt.learning_rate, InverseTimeDecay)


def test_unknown_attribute_is_attribute_error():
    opt = SGD()
    with pytest.raises(AttributeError):
        opt.not_an_attr += 3


def test_momentum_flag_is_frozen_at_construction():
    var = distsgd.Variable([1.0])
    opt = SGD(1.0)
    opt.momentum = 0.9
    opt.apply_gradients([(np.float32([1.0]), var)])
    assert opt.get_slot_names() == []
    np.testing.assert_allclose(var.numpy(), [0.0])


def test_callable_momentum_always_creates_slots():
    var = distsgd.Variable([1.0])
    opt = SGD(1.0, momentum=lambda: 0.0)
    opt.apply_gradients([(np.float32([1.0]), var)])
    assert opt.get_slot_names() == ["momentum"]


def test_nesterov_without_momentum_is_plain_gd():
    var = distsgd.Variable([1.0])
    opt = SGD(1.0, nesterov=True)
    opt.apply_gradients([(np.float32([0.5]), var)])
    assert opt.weights == [opt.iterations]
    np.testing.assert_allclose(var.numpy(), [0.5])


def test_callable_is_called_once_per_dtype_per_step():
    calls = []

    def lr():
        calls.append(1)
        return 1.0

    a = distsgd.Variable([1.0], dtype=np.float32)
    b = distsgd.Variable([1.0], dtype=np.float64)
    c = distsgd.Variable([1.0], dtype=np.float32)
    SGD(lr).apply_gradients([(np.float32([1]), a), (np.float64([1]), b), (np.float32([1]), c)])
    assert len(calls) == 2


def test_decay_with_schedule_combines():
    var = distsgd.Variable([0.0], dtype=np.float64)
    opt = SGD(InverseTimeDecay(3.0, 1.0, 0.5), decay=0.5)
    moves = []
    for _ in range(3):
        before = var.numpy()[0]
        opt.apply_gradients([(np.float64([1.0]), var)])
        moves.append(before - var.numpy()[0])
    np.testing.assert_allclose(moves, [3.0, 4.0 / 3.0, 0.75], rtol=1e-6)


def test_decay_set_after_construction_without_initial_decay_has_no_effect():
    var = distsgd.Variable([0.0])
    opt = SGD(1.0)
    opt.decay = 0.5
    for _ in range(2):
        opt.apply_gradients([(np.float32([1.0]), var)])
    np.testing.assert_allclose(var.numpy(), [-2.0])


def test_hyper_variables_are_not_weights():
    var0, = variables([1.0])
    opt = SGD(0.1, momentum=0.9)
    opt.apply_gradients([(np.float32([1.0]), var0)])
    assert [w.name for w in opt.weights] == ["SGD/iter", "SGD/var0/momentum"]


def test_falsy_name_becomes_unique():
    names = {SGD(name=None)._name, SGD(name="")._name}
    assert len(names) == 2 and all(n.startswith("sgd") for n in names)


def test_callable_returning_bad_learning_rate_raises_before_any_change():
    var = distsgd.Variable([1.0])
    opt = SGD(lambda: float("nan"))
    with pytest.raises(ValueError, match="learning rate evaluated to nan"):
        opt.apply_gradients([(np.float32([1.0]), var)])
    np.testing.assert_array_equal(var.numpy(), [1.0])
    assert opt.weights == []  # not even `iterations` was created
    assert int(opt.iterations.numpy()) == 0


@pytest.mark.parametrize("kwargs", [dict(decay=0.5), dict(momentum=lambda: 2.0)])
def test_failing_first_step_with_decay_or_bad_momentum_creates_nothing(kwargs):
    var = distsgd.Variable([1.0])
    opt = SGD(lambda: float("nan"), **kwargs) if "decay" in kwargs else SGD(1.0, **kwargs)
    with pytest.raises(ValueError, match="evaluated to"):
        opt.apply_gradients([(np.float32([1.0]), var)])
    assert opt.weights == [] and opt.get_slot_names() == []
