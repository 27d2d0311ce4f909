"""Gradients as the backward pass completes them: autograd's pass walked by distsgd and
the training program's explicit MLP backward both mark each variable ready once, in about
the reverse order of the forward pass, and give autograd's gradients."""

import autograd.numpy as anp
import numpy as np
import pytest

import distsgd
from distsgd.train.model import MLP


def test_autograd_into_a_buffer_marks_variables_ready_last_layer_first():
    model = MLP([6, 5, 4, 3], seed=2)
    buffer = distsgd.GradientBuffer(model.variables)
    order = []
    buffer.on_ready = order.append
    x = np.random.default_rng(0).standard_normal((7, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    value, _ = distsgd.value_and_gradients(lambda: model.summed_loss(x, y), model.variables,
                                           out=buffer)
    assert sorted(order) == list(range(6)) and order[:2] in ([4, 5], [5, 4])
    plain = distsgd.gradients(lambda: model.summed_loss(x, y), model.variables)
    for got, want in zip(buffer.grads, plain, strict=True):
        np.testing.assert_array_equal(got, want)
    assert buffer.missing == frozenset()


def test_unused_and_repeated_variables_are_missing_and_zero():
    a, b = distsgd.Variable(np.ones(3), name="a"), distsgd.Variable(np.ones(2), name="b")
    buffer = distsgd.GradientBuffer([a, b, a])
    buffer.grads[1][...] = 7
    order = []
    buffer.on_ready = order.append
    distsgd.gradients(lambda: anp.sum(a * a), [a, b, a], out=buffer)
    assert buffer.missing == frozenset({1, 2}) and sorted(order) == [0, 1, 2]
    np.testing.assert_array_equal(buffer.grads[0], [2, 2, 2])
    assert not buffer.grads[1].any() and not buffer.grads[2].any()


@pytest.mark.parametrize("sizes", [[8, 16, 3], [10, 12, 9, 4]])
def test_the_explicit_mlp_backward_gives_autograds_gradients(sizes):
    model = MLP(sizes, seed=4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((13, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], 13)
    want_loss, want = distsgd.value_and_gradients(lambda: model.summed_loss(x, y) / 32,
                                                  model.variables)
    buffer = distsgd.GradientBuffer(model.variables)
    order = []
    loss = model.loss_and_gradients(x, y, 1 / 32, buffer, ready=order.append)
    assert loss == pytest.approx(float(want_loss), rel=1e-6)
    for got, expected in zip(buffer.grads, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    layers = len(sizes) - 1
    assert order == [i for layer in reversed(range(layers)) for i in (2 * layer, 2 * layer + 1)]
