import numpy as np
import pytest

import distsgd
from distsgd import clipping
from distsgd.optimizers import SGD
from tests.helpers import variables


def test_clipvalue_minimize():
    var, = variables([1.0, 2.0])
    SGD(1.0, clipvalue=1.0).minimize(lambda: 3 * var, [var])
    np.testing.assert_allclose(var.numpy(), [0, 1])


def test_clipnorm_minimize():
    var, = variables([1.0])
    SGD(1.0, clipnorm=1.0).minimize(lambda: 3 * var, [var])
    np.testing.assert_allclose(var.numpy(), [0.0])


def test_clipnorm_is_per_tensor_and_applies_in_apply_gradients():
    a, b = variables([0.0, 0.0], [0.0])
    SGD(1.0, clipnorm=1.0).apply_gradients([(np.float32([3, 4]), a), (np.float32([10]), b)])
    np.testing.assert_allclose(a.numpy(), [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), [-1.0])


def test_clipvalue_runs_before_clipnorm():
    var, = variables([0.0, 0.0])
    SGD(1.0, clipnorm=1.0, clipvalue=0.7).apply_gradients([(np.float32([3, 4]), var)])
    np.testing.assert_allclose(var.numpy(), [-0.7, -0.7], rtol=1e-6)  # 2.0 order: [-0.6, -0.7]


def test_global_clipnorm_scales_all_tensors_together():
    a, b = variables([0.0, 0.0], [0.0])
    SGD(1.0, global_clipnorm=6.5).apply_gradients([(np.float32([3, 4]), a),
                                                   (np.float32([12]), b)])
    np.testing.assert_allclose(a.numpy(), [-1.5, -2.0], rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), [-6.0], rtol=1e-6)


def test_sparse_clipping_acts_on_values_without_dedup():
    slices = distsgd.IndexedSlices(np.float32([[3.0], [4.0]]), np.array([0, 0]), (2, 1))
    clipped = clipping.clip_by_norm(slices, 1.0)
    np.testing.assert_allclose(clipped.values, [[0.6], [0.8]], rtol=1e-6)
    assert clipped.indices is slices.indices
    np.testing.assert_allclose(clipping.clip_by_value(slices, 3.5).values, [[3.0], [3.5]])


def test_zero_gradient_and_edge_cases():
    np.testing.assert_array_equal(clipping.clip_by_norm(np.zeros(3), 1.0), np.zeros(3))
    np.testing.assert_array_equal(clipping.clip_by_value(np.float32([5, -5]), 0.0), [0, 0])
    assert clipping.global_norm([np.float32([3, 4]), np.float64([12])]) == 13.0
    unchanged = clipping.clip_by_global_norm([np.float32([0.3, 0.4])], 1.0)
    np.testing.assert_allclose(unchanged[0], [0.3, 0.4])
    zeros = clipping.clip_by_global_norm([np.zeros(2)], 1.0)
    np.testing.assert_array_equal(zeros[0], [0, 0])


def test_get_gradients_clips_and_refuses_none():
    a, b = variables([1.0, 2.0], [3.0])
    opt = SGD(1.0, clipvalue=2.5)
    grads = opt.get_gradients(lambda: 3 * a + b, [a, b])
    np.testing.assert_allclose(grads[0], [2.5, 2.5])
    np.testing.assert_allclose(grads[1], [2.0])  # broadcast over 2 elements
    with pytest.raises(ValueError, match="Variable 'var1' has `None` for gradient"):
        opt.get_gradients(lambda: 3 * a, [a, b])


def test_get_updates_applies_once():
    a, = variables([1.0, 2.0])
    opt = SGD(0.5)
    result = opt.get_updates(lambda: (a * a).sum(), [a])
    assert result == [opt.iterations] and int(opt.iterations.numpy()) == 1
    np.testing.assert_allclose(a.numpy(), [0.0, 0.0])
