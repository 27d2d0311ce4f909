"""Two behaviours found by differential testing against TF 2.21's OptimizerV2 SGD."""

import numpy as np
import pytest

import distsgd
from distsgd.optimizers import SGD
from distsgd.optimizers import schedules as sch


def test_a_variable_listed_twice_is_updated_in_list_order():
    """TF applies (sparse, dense) for the same variable in list order: rows 0 and 2 end
    at 0.76 (dense-first order would give 0.805)."""
    var = distsgd.Variable(np.ones((3, 2), np.float32))
    opt = SGD(0.1, momentum=0.9)
    sparse = distsgd.IndexedSlices(np.ones((2, 2), np.float32), np.array([0, 2]), (3, 2))
    opt.apply_gradients([(sparse, var), (np.full((3, 2), 0.5, np.float32), var)])
    np.testing.assert_allclose(var.numpy(), [[0.76, 0.76], [0.95, 0.95], [0.76, 0.76]],
                               rtol=1e-6)
    reversed_var = distsgd.Variable(np.ones((3, 2), np.float32))
    SGD(0.1, momentum=0.9).apply_gradients(
        [(np.full((3, 2), 0.5, np.float32), reversed_var), (sparse, reversed_var)])
    np.testing.assert_allclose(reversed_var.numpy()[0], [0.805, 0.805], rtol=1e-6)


@pytest.mark.parametrize(("step", "want"), [
    (np.float32(3), 0.5), (np.float64(3), 0.5), (3, 0.5),
    (np.float64(3.0000001), 0.1), (np.float32(4), 0.1)])
def test_piecewise_boundaries_are_cast_as_tf_casts_them(step, want):
    """A Python float boundary becomes float32 (2.99999999 is 3.0), then the step's dtype."""
    schedule = sch.PiecewiseConstantDecay([2.99999999], [0.5, 0.1])
    assert schedule(step) == np.float32(want)


def test_piecewise_schedule_in_an_optimizer_uses_the_float32_boundary():
    var = distsgd.Variable(np.zeros(1, np.float32))
    opt = SGD(sch.PiecewiseConstantDecay([2.99999999], [0.5, 0.1]))
    for _ in range(4):
        opt.apply_gradients([(np.ones(1, np.float32), var)])
    np.testing.assert_allclose(var.numpy(), [-(0.5 * 4)])  # steps 0..3 all <= 3.0: 0.5
