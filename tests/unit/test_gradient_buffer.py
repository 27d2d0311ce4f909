"""GradientBuffer: gradients back to back per dtype, applied exactly like separate arrays."""

import numpy as np
import pytest

import distsgd
from distsgd.optimizers import SGD

SHAPES = [((3, 4), np.float32), ((5,), np.float64), ((2, 2, 2), np.float32), ((1,), np.float32)]


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    return [distsgd.Variable(rng.standard_normal(s).astype(d), name=f"v{i}")
            for i, (s, d) in enumerate(SHAPES)]


def _steps(count=4, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(d) for s, d in SHAPES] for _ in range(count)]


def test_layout_is_one_flat_array_per_dtype_in_variable_order():
    buffer = distsgd.GradientBuffer(_variables())
    assert {d.name: f.size for d, f in buffer.flat.items()} == {"float32": 21, "float64": 5}
    assert [g.shape for g in buffer.grads] == [s for s, _ in SHAPES]
    assert all(not g.any() for g in buffer.grads)
    buffer.grads[2][...] = 7
    assert buffer.flat[np.dtype(np.float32)][12:20].tolist() == [7] * 8
    assert [v for _, v in buffer] == list(buffer.variables) and len(buffer) == 4
    buffer.zero_()
    assert not buffer.flat[np.dtype(np.float32)].any()
    assert "4 gradients" in repr(buffer)


@pytest.mark.parametrize(("momentum", "nesterov", "clipvalue"),
                         [(0.0, False, None), (0.9, False, None), (0.9, True, 0.5)])
@pytest.mark.parametrize("form", ["buffer", "zip"])
def test_applying_a_buffer_equals_applying_separate_arrays(momentum, nesterov, clipvalue,
                                                           form):
    kwargs = {"clipvalue": clipvalue} if clipvalue else {}
    want_vars, got_vars = _variables(), _variables()
    want_opt = SGD(0.1, momentum=momentum, nesterov=nesterov, **kwargs)
    got_opt = SGD(0.1, momentum=momentum, nesterov=nesterov, **kwargs)
    buffer = distsgd.GradientBuffer(got_vars)
    for grads in _steps():
        want_opt.apply_gradients(zip(grads, want_vars, strict=True))
        for target, grad in zip(buffer.grads, grads, strict=True):
            target[...] = grad
        got_opt.apply_gradients(buffer if form == "buffer" else
                                zip(buffer.grads, got_vars, strict=True))
    for want, got in zip(want_vars + want_opt.weights, got_vars + got_opt.weights,
                         strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_autograd_fills_the_buffer_and_marks_unused_variables_missing():
    used, unused = distsgd.Variable([1.0, 2.0]), distsgd.Variable([3.0])
    buffer = distsgd.GradientBuffer([used, unused])
    value, out = distsgd.value_and_gradients(lambda: distsgd.Variable.__mul__(used, used),
                                             [used, unused], out=buffer)
    assert out is buffer and buffer.missing == {1}
    assert buffer.grads[0].tolist() == [2.0, 4.0] and np.asarray(value).tolist() == [1, 4]
    assert [g is None for g, _ in buffer] == [False, True]
    opt = SGD(0.5)
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.apply_gradients(buffer)
    assert used.numpy().tolist() == [0.0, 0.0] and unused.numpy().tolist() == [3.0]
    distsgd.gradients(lambda: anp_sum(used) + anp_sum(unused), [used, unused], out=buffer)
    assert buffer.missing == frozenset() and buffer.grads[1].tolist() == [1.0]


def anp_sum(x):
    import autograd.numpy as anp

    return anp.sum(x)
