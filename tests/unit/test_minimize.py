import autograd.numpy as anp
import numpy as np
import pytest

import distsgd
from distsgd.optimizers import SGD
from tests.helpers import variables


def test_var_list_callable_sees_variables_created_by_the_loss():
    created = []

    def loss():
        if not created:
            created.append(distsgd.Variable([2.0], name="lazy"))
        return created[0] * created[0]

    SGD(0.25).minimize(loss, lambda: created)
    np.testing.assert_allclose(created[0].numpy(), [1.0])


def test_unused_variable_gets_none_and_a_warning():
    a, b = variables([1.0], [2.0])
    opt = SGD(1.0)
    with pytest.warns(UserWarning, match=r"\['var1'\]"):
        opt.minimize(lambda: 2 * a, [a, b])
    np.testing.assert_allclose(a.numpy(), [-1.0])
    np.testing.assert_allclose(b.numpy(), [2.0])


@pytest.mark.parametrize("loss", [lambda a: (lambda: 5.0), lambda a: (lambda: np.float32(5.0))])
def test_no_gradients_for_any_variable(loss):
    a, = variables([1.0])
    with pytest.raises(ValueError, match="No gradients provided for any variable"):
        SGD().minimize(loss(a), [a])


def test_gradients_of_a_small_mlp_match_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3))
    y = rng.standard_normal((5, 1))
    w1 = distsgd.Variable(rng.standard_normal((3, 4)), dtype=np.float64)
    w2 = distsgd.Variable(rng.standard_normal((4, 1)), dtype=np.float64)

    def loss():
        hidden = anp.tanh(anp.dot(x, w1))
        return anp.mean((anp.dot(hidden, w2) - y) ** 2)

    grads = SGD().get_gradients(loss, [w1, w2])
    eps = 1e-6
    for var, grad in ((w1, grads[0]), (w2, grads[1])):
        base = var.numpy()
        for index in [(0, 0), (2, 0)]:
            bumped = base.copy()
            bumped[index] += eps
            var.assign(bumped)
            up = loss()
            bumped[index] -= 2 * eps
            var.assign(bumped)
            down = loss()
            var.assign(base)
            assert grad[index] == pytest.approx((up - down) / (2 * eps), rel=1e-5)


def test_gradient_dtype_is_the_variable_dtype():
    a = distsgd.Variable([1.0], dtype=np.float16)
    grads = SGD().get_gradients(lambda: a * np.float64(3.0), [a])
    assert grads[0].dtype == np.float16


def test_assign_inside_traced_loss_is_refused():
    a, = variables([1.0])

    def loss():
        a.assign([2.0])
        return a * 1

    with pytest.raises(RuntimeError, match="inside a traced loss"):
        SGD().minimize(loss, [a])
