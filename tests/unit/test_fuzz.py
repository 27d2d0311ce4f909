"""Hypothesis drives the optimizer with random shapes, dtypes, hyperparameters, sparse
indices and malformed arguments: the only outcomes are the reference update or a
ValueError/TypeError with nothing modified."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import distsgd
from distsgd.optimizers import SGD
from tests.helpers import assert_same_state, snapshot

DTYPES = [np.float16, np.float32, np.float64]
BAD_NUMBERS = st.sampled_from([float("nan"), float("inf"), -1.0, 1.5, "0.1"])
LEARNING_RATES = st.one_of(*[st.floats(0, 2)] * 6, BAD_NUMBERS)
MOMENTA = st.one_of(*[st.floats(0, 1)] * 4, st.just(0.0), st.just(None), BAD_NUMBERS)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["dense", "dense", "sparse", "sparse", "sparse", "none",
                                 "wrong shape", "wrong dtype", "list", "garbage"]))
    if kind == "sparse" and draw(st.integers(0, 9)):  # mostly shapes that can be sparse
        shape = (draw(st.integers(1, 5)),) + tuple(draw(st.lists(st.integers(0, 3),
                                                                   max_size=2)))
    else:
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    values = draw(st.lists(st.floats(-10, 10, width=16), min_size=int(np.prod(shape)),
                           max_size=int(np.prod(shape))))
    start = np.array(values, dtype=dtype).reshape(shape)
    grad = None
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind in ("dense", "list"):
        grad = rng.standard_normal(shape).astype(dtype)
        grad = grad.tolist() if kind == "list" else grad
    elif kind == "wrong shape":
        grad = np.ones(shape + (2,), dtype)
    elif kind == "wrong dtype":
        grad = np.ones(shape, np.float64 if dtype != np.float64 else np.float32)
    elif kind == "garbage":
        grad = draw(st.sampled_from(["text", object(), {"a": 1}]))
    elif kind == "sparse":
        rows = shape[0] if shape else 1
        in_range = st.integers(0, max(0, rows - 1))
        index = st.one_of(in_range, in_range, in_range, st.integers(-2, rows + 1))
        indices = draw(st.lists(index, min_size=0, max_size=6))
        row_shape = shape[1:] if shape else ()
        extra_row = draw(st.integers(0, 9)) == 0
        grad = distsgd.IndexedSlices(
            rng.standard_normal((len(indices) + extra_row,) + row_shape).astype(dtype),
            np.array(indices, dtype=np.int64), shape)
    lr = draw(LEARNING_RATES)
    momentum = draw(MOMENTA)
    nesterov = draw(st.booleans())
    return dtype, start, grad, lr, momentum, nesterov


def reference(start, grad, lr, momentum, nesterov):
    """One TF step in numpy: float32 hypers, var-dtype arithmetic."""
    dtype = start.dtype.type
    lr_t, m = dtype(np.float32(lr)), dtype(np.float32(momentum))
    var, accum = start.copy(), np.zeros_like(start)
    if isinstance(grad, distsgd.IndexedSlices):
        if momentum == 0:
            np.add.at(var, grad.indices, -(grad.values * lr_t))
            return var, None
        unique, position = np.unique(grad.indices, return_inverse=True)
        summed = np.zeros((len(unique),) + start.shape[1:], start.dtype)
        np.add.at(summed, position.reshape(-1), grad.values)
        a = accum[unique] * m - summed * lr_t
        accum[unique] = a
        var[unique] += (a * m - summed * lr_t) if nesterov else a
        return var, accum
    g = np.asarray(grad, dtype=start.dtype)
    if momentum == 0:
        return var - g * lr_t, None
    accum = accum * m - g * lr_t
    return (var + (accum * m - g * lr_t) if nesterov else var + accum), accum


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_optimizer_update_or_documented_error(case):
    dtype, start, grad, lr, momentum, nesterov = case
    kwargs = {} if momentum is None else {"momentum": momentum}
    try:
        opt = SGD(learning_rate=lr, nesterov=nesterov, **kwargs)
    except (ValueError, TypeError):
        event("constructor refused")
        return
    var = distsgd.Variable(start.copy())
    other = distsgd.Variable(np.ones(3, np.float32))
    opt.apply_gradients([(np.ones(3, np.float32), other)])  # slots and iterations exist
    before = snapshot(opt, [var, other])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.apply_gradients([(grad, var), (np.ones(3, np.float32), other)])
    except (ValueError, TypeError) as error:
        event(f"refused: {type(error).__name__}")
        assert_same_state(before, snapshot(opt, [var, other]))
        return
    event(f"applied: {type(grad).__name__}")
    want_var, want_accum = reference(start, grad, lr, momentum or 0.0, nesterov)
    if grad is None:
        want_var = start
    np.testing.assert_array_equal(var.numpy(), want_var)
    if momentum and grad is not None:
        np.testing.assert_array_equal(opt.get_slot(var, "momentum").numpy(), want_accum)
    assert int(opt.iterations.numpy()) == 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3),
                          st.tuples(st.none()), st.tuples(st.none(), st.none(), st.none()),
                          st.tuples(st.just(np.ones(2, np.float32)), st.integers())),
                max_size=4))
def test_malformed_grads_and_vars_are_type_errors(items):
    var = distsgd.Variable(np.zeros(2, np.float32))
    opt = SGD(0.1, momentum=0.5)
    with pytest.raises((TypeError, ValueError)):
        opt.apply_gradients([*items, (np.ones(2, np.float32), var)] if items else items + [5])
    assert var.numpy().tolist() == [0.0, 0.0] and opt.weights == []
