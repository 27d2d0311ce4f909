"""Every bad input raises a clear error before any variable, slot or counter changes."""

import numpy as np
import pytest

import distsgd
from distsgd.optimizers import SGD
from tests.helpers import assert_same_state, snapshot, variables


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(momentum=2.0), ValueError, "between"),
    (dict(momentum=-0.1), ValueError, "between"),
    (dict(momentum=np.float32(2.0)), ValueError, "between"),
    (dict(momentum=float("nan")), ValueError, "momentum=nan"),
    (dict(momentum="0.9"), TypeError, "momentum='0.9'"),
    (dict(learning_rate=-1.0), ValueError, "learning_rate=-1.0"),
    (dict(learning_rate=float("inf")), ValueError, "learning_rate=inf"),
    (dict(learning_rate=None), TypeError, "learning_rate=None"),
    (dict(lr=-1.0), ValueError, "learning_rate=-1.0"),
    (dict(clipnorm=-1.0), ValueError, "clipnorm >= 0"),
    (dict(clipvalue=-0.5), ValueError, "clipvalue >= 0"),
    (dict(global_clipnorm=float("nan")), ValueError, "global_clipnorm"),
    (dict(decay=-0.1), ValueError, "decay >= 0"),
    (dict(clipnorm=1.0, global_clipnorm=1.0), ValueError, "both `clipnorm` and"),
    (dict(invalidkwargs=1.0), TypeError, "Unexpected keyword argument passed to optimizer: "
                                         "invalidkwargs"),
    (dict(nesterov="yes"), TypeError, "nesterov='yes'"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SGD(**kwargs)


def test_setting_bad_hyper_later_changes_nothing():
    opt = SGD(0.1, momentum=0.5)
    opt.lr  # noqa: B018
    with pytest.raises(ValueError, match="learning_rate=-2"):
        opt.learning_rate = -2
    with pytest.raises(ValueError, match="momentum=1.5"):
        opt.momentum = 1.5
    assert float(opt.lr.numpy()) == pytest.approx(0.1)


def _prepared():
    """An optimizer that has taken one step, so slots and iterations exist."""
    var0, var1, emb = variables([1.0, 2.0], [3.0], [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    opt = SGD(0.1, momentum=0.9)
    opt.apply_gradients([(np.float32([1, 1]), var0), (np.float32([1]), var1),
                         (np.ones((3, 2), np.float32), emb)])
    return opt, var0, var1, emb


GOOD0, GOOD1 = np.float32([1, 1]), np.float32([1])

BAD_CALLS = [
    ("not iterable", lambda v0, v1, e: 5, TypeError, "expected an iterable"),
    ("not a pair", lambda v0, v1, e: [(GOOD0,)], TypeError, r"grads_and_vars\[0\]"),
    ("triple", lambda v0, v1, e: [(GOOD0, v0, 1)], TypeError, "pair"),
    ("not a variable", lambda v0, v1, e: [(GOOD0, np.ones(2))], TypeError, "distsgd.Variable"),
    ("shape", lambda v0, v1, e: [(GOOD0, v0), (np.float32([1, 2]), v1)], ValueError,
     r"has shape \(2,\); expected the variable's shape \(1,\)"),
    ("dtype", lambda v0, v1, e: [(GOOD0, v0), (np.float64([1]), v1)], TypeError,
     "dtype float64; variable 'var1' has dtype float32"),
    ("object grad", lambda v0, v1, e: [(GOOD0, v0), ("x", v1)], TypeError, "not a numeric"),
    ("all none", lambda v0, v1, e: [(None, v0), (None, v1)], ValueError,
     r"No gradients provided for any variable: \['var0', 'var1'\]"),
    ("non-float var", lambda v0, v1, e: [(GOOD0, v0), (np.int32([1]), distsgd.Variable([1]))],
     ValueError, "Invalid type int32"),
    ("sparse out of range", lambda v0, v1, e: [
        (GOOD0, v0), (distsgd.IndexedSlices(np.ones((2, 2), np.float32), [0, 3], None), e)],
     ValueError, r"indices\[1\] = 3 is not in \[0, 3\)"),
    ("sparse negative", lambda v0, v1, e: [
        (distsgd.IndexedSlices(np.ones((1, 2), np.float32), [-1], None), e)],
     ValueError, r"indices\[0\] = -1"),
    ("sparse rows", lambda v0, v1, e: [
        (distsgd.IndexedSlices(np.ones((2, 2), np.float32), [0], None), e)],
     ValueError, "one row per index"),
    ("sparse float indices", lambda v0, v1, e: [
        (distsgd.IndexedSlices(np.ones((1, 2), np.float32), [0.5], None), e)],
     TypeError, "expected integers"),
    ("sparse 2-d indices", lambda v0, v1, e: [
        (distsgd.IndexedSlices(np.ones((1, 2), np.float32), [[0]], None), e)],
     ValueError, "one dimension"),
    ("sparse scalar var", lambda v0, v1, e: [
        (distsgd.IndexedSlices(np.ones(1, np.float32), [0], None), distsgd.Variable(1.0))],
     ValueError, "rank >= 1"),
]


@pytest.mark.parametrize(("case", "make", "error", "match"), BAD_CALLS,
                         ids=[c[0] for c in BAD_CALLS])
def test_apply_gradients_errors_leave_state_unchanged(case, make, error, match):
    opt, var0, var1, emb = _prepared()
    before = snapshot(opt, [var0, var1, emb])
    with pytest.raises(error, match=match):
        opt.apply_gradients(make(var0, var1, emb))
    assert_same_state(before, snapshot(opt, [var0, var1, emb]))


def test_sparse_gradient_on_constrained_variable_is_refused_first():
    var = distsgd.Variable([[1.0]], constraint=lambda v: v)
    opt = SGD(1.0)
    with pytest.raises(RuntimeError, match="constraint function on a sparse variable"):
        opt.apply_gradients([(distsgd.IndexedSlices(np.float32([[1.0]]), [0], None), var)])
    assert var.numpy().tolist() == [[1.0]] and opt.weights == []


def test_new_variable_error_creates_no_slot():
    opt, var0, var1, emb = _prepared()
    fresh = distsgd.Variable([5.0, 6.0])
    with pytest.raises(ValueError):
        opt.apply_gradients([(np.float32([1, 1]), fresh), (np.float32([1, 1]), var1)])
    with pytest.raises(KeyError):
        opt.get_slot(fresh, "momentum")
    assert len(opt.weights) == 4


def test_minimize_rejects_non_variables_and_non_callables():
    var = distsgd.Variable([1.0])
    with pytest.raises(ValueError, match="not a distsgd.Variable"):
        SGD().minimize(lambda: var * 2, [np.ones(1)])
    with pytest.raises(TypeError, match="zero-argument callable"):
        SGD().minimize(var * 2, [var])
    with pytest.raises(ValueError, match="grad_loss has shape"):
        SGD().minimize(lambda: var * 2, [var], grad_loss=[1.0, 2.0])
    assert var.numpy().tolist() == [1.0]


SAME_LIST_BAD_GRADS = [
    ("shape", np.float32([1, 2]), ValueError, r"has shape \(2,\); expected the variable's"),
    ("transposed", None, ValueError, r"has shape \(2, 3\); expected the variable's shape"),
    ("dtype", np.float64([1]), TypeError, "dtype float64; variable 'var1' has dtype float32"),
    ("object", "x", TypeError, "not a numeric"),
    ("0-d", np.float32(1), ValueError, r"has shape \(\)"),
]


@pytest.mark.parametrize("pairs", [zip, lambda *a, strict: list(zip(*a, strict=strict))],
                         ids=["zip", "list"])
@pytest.mark.parametrize(("case", "bad", "error", "match"), SAME_LIST_BAD_GRADS,
                         ids=[c[0] for c in SAME_LIST_BAD_GRADS])
def test_errors_after_steps_with_the_same_variables(case, bad, error, match, pairs):
    """The fast path taken for a variable list seen before still checks every gradient."""
    opt, var0, var1, emb = _prepared()
    grads = [GOOD0, GOOD1, np.ones((3, 2), np.float32)]
    opt.apply_gradients(pairs(grads, [var0, var1, emb], strict=True))  # the list is now known
    if case == "transposed":
        grads[2] = np.ones((2, 3), np.float32)
    else:
        grads[1] = bad
    before = snapshot(opt, [var0, var1, emb])
    with pytest.raises(error, match=match):
        opt.apply_gradients(pairs(grads, [var0, var1, emb], strict=True))
    assert_same_state(before, snapshot(opt, [var0, var1, emb]))


def test_gradient_buffer_of_wrong_variables_is_refused():
    var0, var1 = variables([1.0, 2.0], [3.0])
    buffer = distsgd.GradientBuffer([var0, var1])
    with pytest.raises(ValueError, match="GradientBuffer of these 1 variables"):
        distsgd.gradients(lambda: var0 * 2, [var0], out=buffer)
    with pytest.raises(ValueError, match="dtype int32; expected float16"):
        distsgd.GradientBuffer([distsgd.Variable([1])])
    with pytest.raises(TypeError, match="expected a distsgd.Variable"):
        distsgd.GradientBuffer([np.ones(2)])
