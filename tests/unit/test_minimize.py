import contextlib

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


def _twin_models(seed=0):
    """Two identical variable sets: float32 and float64, a vector and matrices."""
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal((3, 4)).astype(np.float32),
              rng.standard_normal(5).astype(np.float64),
              rng.standard_normal((2, 2)).astype(np.float32)]
    return ([distsgd.Variable(v.copy(), name=f"a{i}") for i, v in enumerate(values)],
            [distsgd.Variable(v.copy(), name=f"b{i}") for i, v in enumerate(values)])


def _loss(vs, step):
    return lambda: (anp.sum(anp.tanh(vs[0]) * (step + 1)) + anp.sum(vs[1] ** 2)
                    + anp.sum(vs[2] * vs[2] * vs[0][:2, :2]))


@pytest.mark.parametrize("kwargs", [{"momentum": 0.9}, {"momentum": 0.5, "nesterov": True},
                                    {"clipnorm": 0.5}, {"global_clipnorm": 0.7},
                                    {"clipvalue": 0.1, "momentum": 0.9}],
                         ids=lambda kw: ",".join(kw))
@pytest.mark.filterwarnings("error")
def test_minimize_equals_apply_gradients_of_its_gradients(kwargs):
    """minimize (gradients written into a kept GradientBuffer) == apply_gradients of
    new gradient arrays, bitwise, over steps that change the variable list (a subset, a
    repeated variable, a variable the loss does not use)."""
    ours, ref = _twin_models()
    opt, ref_opt = SGD(0.1, **kwargs), SGD(0.1, **kwargs)
    lists = [lambda vs: vs, lambda vs: vs, lambda vs: vs[:2], lambda vs: vs,
             lambda vs: [vs[1], vs[0], vs[1]], lambda vs: vs]
    for step, pick in enumerate(lists):
        repeats = step == 4  # the repeat gets no gradient: a warning, as in Keras
        with pytest.warns(UserWarning) if repeats else contextlib.nullcontext():
            opt.minimize(_loss(ours, step), pick(ours))
        grads = distsgd.gradients(_loss(ref, step), pick(ref))
        with pytest.warns(UserWarning) if repeats else contextlib.nullcontext():
            ref_opt.apply_gradients(zip(grads, pick(ref), strict=True))
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert opt.iterations.numpy() == ref_opt.iterations.numpy() == len(lists)


def test_minimize_with_grad_loss_and_a_callable_var_list():
    ours, ref = _twin_models(1)
    weights = np.float32([[1.0, -2.0, 0.5, 3.0]])
    loss = lambda vs: (lambda: anp.sum(vs[0], axis=0, keepdims=True) * 2.0)  # noqa: E731
    opt, ref_opt = SGD(0.1, momentum=0.9), SGD(0.1, momentum=0.9)
    for _ in range(3):
        opt.minimize(loss(ours), lambda: ours[:1], grad_loss=weights)
        grads = distsgd.gradients(loss(ref), ref[:1], grad_loss=weights)
        ref_opt.apply_gradients(zip(grads, ref[:1], strict=True))
        np.testing.assert_array_equal(ours[0].numpy(), ref[0].numpy())


def test_minimize_with_an_integer_variable_raises_the_keras_error_and_changes_nothing():
    floats, _ = _twin_models()
    counter = distsgd.Variable(np.int64(3), name="counter")
    opt = SGD(0.1)
    opt.minimize(_loss(floats, 0), floats)  # a buffer is kept for this list
    before = [v.numpy() for v in floats]
    with pytest.raises(ValueError, match="Invalid type int64 for variable 'counter'"):
        opt.minimize(lambda: anp.sum(floats[0]), [floats[0], counter])
    for a, b in zip(before, floats, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    assert opt.iterations.numpy() == 1
