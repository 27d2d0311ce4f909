import numpy as np
import pytest

import distsgd
from distsgd.optimizers import SGD
from tests.helpers import variables


def test_iterations_starts_at_zero_as_int64():
    opt = SGD()
    assert opt.weights == []
    assert opt.iterations.dtype == np.int64 and int(opt.iterations.numpy()) == 0
    assert opt.iterations.aggregation is distsgd.VariableAggregation.ONLY_FIRST_REPLICA
    assert opt.weights == [opt.iterations]


def test_weights_order_and_same_list_object():
    a, b, c = variables([1.0], [2.0], [3.0])
    opt = SGD(0.1, momentum=0.9)
    with pytest.warns(UserWarning, match=r"Gradients do not exist for variables \['var1'\]"):
        opt.apply_gradients([(np.float32([1]), a), (None, b)])
    opt.apply_gradients([(np.float32([1]), c), (np.float32([1]), b)])
    assert [w.name for w in opt.weights] == ["SGD/iter", "SGD/var0/momentum", "SGD/var2/momentum",
                                             "SGD/var1/momentum"]
    assert opt.variables() is opt.weights
    assert int(opt.iterations.numpy()) == 2


def test_empty_apply_still_increments_as_in_tf_2_0():
    opt = SGD()
    opt.apply_gradients([])
    assert int(opt.iterations.numpy()) == 1
    opt.minimize(lambda: 1.0, [])
    assert int(opt.iterations.numpy()) == 2


def test_iterations_setter_only_before_creation():
    step = distsgd.Variable(0, dtype=np.int64)
    opt = SGD(1.0)
    opt.iterations = step
    var = distsgd.Variable([1.0])
    opt.minimize(lambda: var * 2, [var])
    assert int(step.numpy()) == 1
    with pytest.raises(RuntimeError, match="Cannot set `iterations`"):
        opt.iterations = distsgd.Variable(0, dtype=np.int64)
    with pytest.raises(TypeError, match="scalar integer Variable"):
        SGD().iterations = distsgd.Variable(0.0)


def test_get_set_weights_transfer_gives_identical_next_steps():
    a1, b1 = variables([1.0, 2.0], [3.0])
    a2, b2 = variables([1.0, 2.0], [3.0])
    opt1, opt2 = SGD(0.1, momentum=0.9), SGD(0.1, momentum=0.9)
    grads = [np.float32([0.5, -1.0]), np.float32([2.0])]
    opt1.apply_gradients(zip(grads, [a1, b1], strict=True))
    opt2.apply_gradients(zip([np.zeros(2, np.float32), np.zeros(1, np.float32)], [a2, b2],
                             strict=True))
    opt2.set_weights(opt1.get_weights())
    a2.assign(a1), b2.assign(b1)
    for opt, (a, b) in ((opt1, (a1, b1)), (opt2, (a2, b2))):
        opt.apply_gradients(zip(grads, [a, b], strict=True))
    np.testing.assert_array_equal(a1.numpy(), a2.numpy())
    assert int(opt1.iterations.numpy()) == int(opt2.iterations.numpy()) == 2


def test_set_weights_length_then_shape_errors_name_the_weight():
    a, = variables([1.0, 2.0])
    opt = SGD(0.1, momentum=0.9)
    opt.apply_gradients([(np.float32([1, 1]), a)])
    before = opt.get_weights()
    with pytest.raises(ValueError, match="weight list of length 1, but the optimizer was "
                                         "expecting 2 weights"):
        opt.set_weights([np.array(0)])
    with pytest.raises(ValueError, match=r"shape \(2,\) not compatible with provided weight "
                                         r"shape \(3,\) \(weights\[1\], 'SGD/var0/momentum'\)"):
        opt.set_weights([np.array(5), np.zeros(3)])
    for w, b in zip(opt.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)
    opt.set_weights([7, [1.5, 2.5]])
    assert opt.iterations.numpy() == 7 and opt.iterations.dtype == np.int64


def test_slots_api():
    var, other = variables([1.0, 2.0], [3.0])
    opt = SGD(0.1, momentum=0.9)
    slot = opt.add_slot(var, "momentum")
    assert opt.add_slot(var, "momentum") is slot
    assert opt.get_slot(var, "momentum") is slot
    assert opt.get_slot_names() == ["momentum"]
    custom = opt.add_slot(var, "extra", initializer=lambda shape, dtype: np.full(shape, 2, dtype))
    np.testing.assert_array_equal(custom.numpy(), [2, 2])
    assert opt.add_slot(other, "ones", initializer="ones").numpy().tolist() == [1.0]
    with pytest.raises(KeyError):
        opt.get_slot(other, "momentum")
    with pytest.raises(KeyError):
        SGD().get_slot(var, "momentum")
    with pytest.raises(ValueError, match="initializer='glorot'"):
        opt.add_slot(other, "bad", initializer="glorot")


def test_add_weight():
    opt = SGD()
    w = opt.add_weight("w", shape=(2,), initializer="ones")
    assert w.dtype == np.float32 and w.name == "SGD/w" and w not in opt.weights
    with pytest.raises(ValueError, match="ON_READ"):
        opt.add_weight("m", (), trainable=True,
                       synchronization=distsgd.VariableSynchronization.ON_READ)
