"""TF 2.0's own SGD test cases (tf_sgd_semantics.md section 9) and its bit-exact recipe."""

import numpy as np
import pytest

import distsgd
from distsgd.optimizers import SGD
from distsgd.optimizers.schedules import InverseTimeDecay
from tests.helpers import FLOAT_DTYPES, tolerance, variables

G0, G1 = [0.1, 0.1], [0.01, 0.01]

GD_CASES = [
    ("basic", dict(learning_rate=3.0), {1: ([0.7, 1.7], [2.97, 3.97])}),
    ("decay", dict(learning_rate=3.0, decay=0.5),
     {1: ([0.7, 1.7], [2.97, 3.97]), 2: ([0.5, 1.5], [2.95, 3.95]),
      3: ([0.35, 1.35], [2.935, 3.935])}),
    ("callable", dict(learning_rate=lambda: 3.0), {1: ([0.7, 1.7], [2.97, 3.97])}),
    ("numpy scalar", dict(learning_rate=np.float32(3.0)), {1: ([0.7, 1.7], [2.97, 3.97])}),
    ("inverse time schedule",
     dict(learning_rate=InverseTimeDecay(3.0, decay_steps=1.0, decay_rate=0.5)),
     {1: ([0.7, 1.7], [2.97, 3.97]), 2: ([0.5, 1.5], [2.95, 3.95])}),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("case", "kwargs", "expect"), GD_CASES, ids=[c[0] for c in GD_CASES])
def test_gradient_descent_cases(dtype, case, kwargs, expect):
    var0, var1 = variables([1.0, 2.0], [3.0, 4.0], dtype=dtype)
    opt = SGD(**kwargs)
    for step in range(1, max(expect) + 1):
        opt.apply_gradients([(np.array(G0, dtype), var0), (np.array(G1, dtype), var1)])
        if step in expect:
            np.testing.assert_allclose(var0.numpy(), expect[step][0], **tolerance(dtype))
            np.testing.assert_allclose(var1.numpy(), expect[step][1], **tolerance(dtype))
    assert opt.get_slot_names() == []
    assert int(opt.iterations.numpy()) == max(expect)


def test_serialized_schedule_gives_the_same_steps():
    opt = SGD(learning_rate=InverseTimeDecay(3.0, decay_steps=1.0, decay_rate=0.5))
    opt = SGD.from_config(opt.get_config())
    var0, var1 = variables([1.0, 2.0], [3.0, 4.0])
    for _ in range(2):
        opt.apply_gradients([(np.float32(G0), var0), (np.float32(G1), var1)])
    np.testing.assert_allclose(var0.numpy(), [0.5, 1.5], rtol=1e-6)
    np.testing.assert_allclose(var1.numpy(), [2.95, 3.95], rtol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_sparse_gradient_descent(dtype, decay):
    var0, var1 = variables([[1.0], [2.0]], [[3.0], [4.0]], dtype=dtype)
    opt = SGD(3.0, decay=decay)
    expect = {1: ([[0.7], [2.0]], [[3.0], [3.97]]), 2: ([[0.5], [2.0]], [[3.0], [3.95]])}
    for step in (1, 2) if decay else (1,):
        opt.apply_gradients([
            (distsgd.IndexedSlices(np.array([[0.1]], dtype), [0], [2, 1]), var0),
            (distsgd.IndexedSlices(np.array([[0.01]], dtype), [1], [2, 1]), var1)])
        np.testing.assert_allclose(var0.numpy(), expect[step][0], **tolerance(dtype))
        np.testing.assert_allclose(var1.numpy(), expect[step][1], **tolerance(dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("hypers", ["numbers", "callables", "numpy"])
def test_momentum_basic(dtype, hypers):
    lr, m = {"numbers": (2.0, 0.9), "callables": (lambda: 2.0, lambda: 0.9),
             "numpy": (np.float32(2.0), np.float32(0.9))}[hypers]
    var0, var1 = variables([1.0, 2.0], [3.0, 4.0], dtype=dtype)
    opt = SGD(learning_rate=lr, momentum=m)
    expect = {1: ([-0.2, -0.2], [-0.02, -0.02], [0.8, 1.8], [2.98, 3.98]),
              2: ([-0.38, -0.38], [-0.038, -0.038], [0.42, 1.42], [2.942, 3.942])}
    for step in (1, 2):
        opt.apply_gradients([(np.array(G0, dtype), var0), (np.array(G1, dtype), var1)])
        slot0, slot1 = opt.get_slot(var0, "momentum"), opt.get_slot(var1, "momentum")
        assert slot0.shape == var0.shape and slot0.dtype == var0.dtype
        for got, want in zip((slot0, slot1, var0, var1), expect[step], strict=True):
            np.testing.assert_allclose(got.numpy(), want, **tolerance(dtype))


NESTEROV_STEPS = [
    ([-37.0, -74.0], [-20.0, -40.0], [-8.4, -7.4], [-6.0, -6.0]),
    ([1352.8, 2705.6], [722.0, 1444.0], [-24.66, -23.66], [-11.4, -11.4]),
    ([-49468.78, -98937.56], [-26406.2, -52812.4], [-45.294, -44.294], [-16.26, -16.26]),
    ([1808955.838, 3617911.676], [965610.02, 1931220.04], [-69.8646, -68.8646],
     [-20.634, -20.634]),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sparse", [False, True])
def test_nesterov_momentum(dtype, sparse):
    """testNesterovMomentum / testSparseNesterovMomentum: loss 5*var0^2 + 3*var1."""
    var0, var1 = variables([1.0, 2.0], [3.0, 4.0], dtype=dtype)
    opt = SGD(learning_rate=2.0, momentum=0.9, nesterov=True)
    for want_var0, want_accum0, want_var1, want_accum1 in NESTEROV_STEPS:
        if sparse:
            grad0 = distsgd.IndexedSlices(10 * var0.numpy(), [0, 1], [2])
            opt.apply_gradients([(grad0, var0), (np.array([3.0, 3.0], dtype), var1)])
        else:
            opt.minimize(lambda: 5 * var0 * var0 + 3 * var1, [var0, var1])
        np.testing.assert_allclose(var0.numpy(), want_var0, rtol=1e-6)
        np.testing.assert_allclose(opt.get_slot(var0, "momentum").numpy(), want_accum0,
                                   rtol=1e-6)
        np.testing.assert_allclose(var1.numpy(), want_var1, rtol=1e-6)
        np.testing.assert_allclose(opt.get_slot(var1, "momentum").numpy(), want_accum1,
                                   rtol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sparse_momentum_touches_listed_rows_only(dtype):
    var0 = distsgd.Variable(np.zeros([4, 2], dtype))
    var1 = distsgd.Variable(np.ones([4, 2], dtype))
    opt = SGD(learning_rate=2.0, momentum=0.9)
    expect = {
        1: ([[0, 0], [-0.2, -0.2], [0, 0], [0, 0]], [[0, 0], [-0.2, -0.2], [0, 0], [0, 0]],
            [[1, 1], [1, 1], [0.98, 0.98], [0.98, 0.98]],
            [[0, 0], [0, 0], [-0.02, -0.02], [-0.02, -0.02]]),
        2: ([[0, 0], [-0.58, -0.58], [0, 0], [0, 0]], [[0, 0], [-0.38, -0.38], [0, 0], [0, 0]],
            [[1, 1], [1, 1], [0.942, 0.942], [0.942, 0.942]],
            [[0, 0], [0, 0], [-0.038, -0.038], [-0.038, -0.038]]),
    }
    for step in (1, 2):
        opt.apply_gradients([
            (distsgd.IndexedSlices(np.array([[0.1, 0.1]], dtype), [1], [4, 2]), var0),
            (distsgd.IndexedSlices(np.array([[0.01, 0.01]] * 2, dtype), [2, 3], [4, 2]), var1)])
        got = (var0, opt.get_slot(var0, "momentum"), var1, opt.get_slot(var1, "momentum"))
        for g, want in zip(got, expect[step], strict=True):
            np.testing.assert_allclose(g.numpy(), want, **tolerance(dtype))


@pytest.mark.parametrize(("nesterov", "want_var", "want_slot"), [
    (False, [[0.7, 0.7], [1.5, 1.5], [3, 3]], [[-0.3, -0.3], [-0.5, -0.5], [0, 0]]),
    (True, [[0.43, 0.43], [1.05, 1.05], [3, 3]], None),
])
def test_sparse_duplicates_are_summed_before_one_momentum_step(nesterov, want_var, want_slot):
    var = distsgd.Variable(np.array([[1, 1], [2, 2], [3, 3]], np.float64))
    opt = SGD(learning_rate=1.0, momentum=0.9, nesterov=nesterov)
    opt.apply_gradients([(distsgd.IndexedSlices(np.array([[0.1, 0.1], [0.2, 0.2]]), [0, 0],
                                                [3, 2]), var)])
    opt.apply_gradients([(distsgd.IndexedSlices(np.array([[0.5, 0.5]]), [1], [3, 2]), var)])
    np.testing.assert_allclose(var.numpy(), want_var, rtol=1e-6)
    if want_slot is not None:
        np.testing.assert_allclose(opt.get_slot(var, "momentum").numpy(), want_slot, rtol=1e-6)


def test_sparse_differs_from_zero_filled_dense():
    """Rows without a gradient keep their slot: no decay, no carry-over step."""
    dense_var = distsgd.Variable(np.array([[1, 1], [2, 2], [3, 3]], np.float64))
    opt = SGD(learning_rate=1.0, momentum=0.9)
    opt.apply_gradients([(np.array([[0.3, 0.3], [0, 0], [0, 0]]), dense_var)])
    opt.apply_gradients([(np.array([[0, 0], [0.5, 0.5], [0, 0]]), dense_var)])
    np.testing.assert_allclose(dense_var.numpy(), [[0.43, 0.43], [1.5, 1.5], [3, 3]], rtol=1e-6)


def test_minimize_resource_variable():
    var0, var1 = variables([[1.0, 2.0]], [3.0])
    x = np.array([[4.0], [5.0]], np.float32)
    SGD(1.0).minimize(lambda: var0 @ x + var1, [var0, var1])
    np.testing.assert_allclose(var0.numpy(), [[-3, -3]])
    np.testing.assert_allclose(var1.numpy(), [2])


def test_minimize_with_embedding_style_gather():
    var0 = distsgd.Variable(np.ones([2, 2], np.float32))
    SGD(1.0).minimize(lambda: var0[np.array([1])].sum(), [var0])
    np.testing.assert_allclose(var0.numpy(), [[1, 1], [0, 0]])


def test_optimizer_v2_basic_and_adaptive_learning_rate():
    var0, var1 = variables([1.0, 2.0], [3.0, 4.0])
    opt = SGD(1.0)
    loss = lambda: 5 * var0 + 3 * var1  # noqa: E731
    opt.minimize(loss, [var0, var1])
    np.testing.assert_allclose(var0.numpy(), [-4, -3])
    np.testing.assert_allclose(var1.numpy(), [0, 1])
    opt.learning_rate = 0.5
    opt.minimize(loss, [var0, var1])
    np.testing.assert_allclose(var0.numpy(), [-6.5, -5.5])
    np.testing.assert_allclose(var1.numpy(), [-1.5, -0.5])
    opt.learning_rate = InverseTimeDecay(0.5, decay_steps=1.0, decay_rate=0.5)
    opt.minimize(loss, [var0, var1])
    np.testing.assert_allclose(var0.numpy(), [-7.75, -6.75])
    np.testing.assert_allclose(var1.numpy(), [-2.25, -1.25])


def test_precomputed_gradient_loss():
    var0, var1 = variables([1.0, 2.0], [3.0, 4.0])
    SGD(3.0).minimize(lambda: 5 * var0 + 3 * var1, [var0, var1], grad_loss=[42.0, -42.0])
    np.testing.assert_allclose(var0.numpy(), [-629, 632])
    np.testing.assert_allclose(var1.numpy(), [-375, 382])


def test_constraint_applied_after_dense_update():
    var0 = distsgd.Variable([1.0, 2.0], constraint=lambda v: np.clip(v, -0.1, 0.0))
    var1 = distsgd.Variable([3.0, 4.0], constraint=lambda v: np.clip(v, 0.0, 1.0))
    SGD(3.0).minimize(lambda: 5 * var0 + 3 * var1, [var0, var1])
    np.testing.assert_allclose(var0.numpy(), [-0.1, -0.1])
    np.testing.assert_allclose(var1.numpy(), [0, 0])


def test_docstring_example_and_returned_step_count():
    var = distsgd.Variable(1.0)
    opt = SGD(0.1, momentum=0.9)
    assert int(opt.minimize(lambda: var ** 2 / 2.0, [var]).numpy()) == 1
    assert var.numpy() == pytest.approx(0.9)
    opt.minimize(lambda: var ** 2 / 2.0, [var])
    assert 0.9 - var.numpy() == pytest.approx(0.18)


def test_duplicate_variable_gets_two_sequential_updates():
    var = distsgd.Variable(1.0, dtype=np.float64)
    opt = SGD(1.0, momentum=0.5)
    opt.apply_gradients([(np.float64(0.1), var), (np.float64(0.2), var)])
    assert var.numpy() == pytest.approx(0.65)
    assert opt.get_slot(var, "momentum").numpy() == pytest.approx(-0.25)
    assert int(opt.iterations.numpy()) == 1


def _reference_model(dtype, lr, momentum, nesterov, decay, grads, var, accum):
    """The recipe that matched TF bit for bit: float32 hypers, var-dtype arithmetic."""
    dtype = np.dtype(dtype).type
    lr32, m, d = dtype(np.float32(lr)), dtype(np.float32(momentum)), dtype(np.float32(decay))
    for t, g in enumerate(grads):
        lr_t = lr32 / (dtype(1) + d * dtype(t)) if decay > 0 else lr32
        if momentum == 0:
            var = var - g * lr_t
        else:
            accum = accum * m - g * lr_t
            var = var + (accum * m - g * lr_t) if nesterov else var + accum
    return var, accum


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.37])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.013])
def test_bitwise_equal_to_the_tf_recipe(dtype, momentum, nesterov, decay):
    rng = np.random.default_rng(7)
    start = rng.standard_normal(300).astype(dtype)
    grads = [rng.standard_normal(300).astype(dtype) for _ in range(6)]
    var = distsgd.Variable(start)
    opt = SGD(0.1, momentum=momentum, nesterov=nesterov, decay=decay)
    for g in grads:
        opt.apply_gradients([(g, var)])
    want_var, want_accum = _reference_model(dtype, 0.1, momentum, nesterov, decay, grads,
                                            start, np.zeros_like(start))
    np.testing.assert_array_equal(var.numpy(), want_var)
    if momentum:
        np.testing.assert_array_equal(opt.get_slot(var, "momentum").numpy(), want_accum)


def test_float64_uses_float32_rounded_learning_rate():
    var = distsgd.Variable(1.0, dtype=np.float64)
    SGD(0.1).apply_gradients([(np.float64(1.0), var)])
    assert var.numpy() == 0.8999999985098839


def test_float16_schedule_step_is_rounded_to_float16():
    var = distsgd.Variable(0.0, dtype=np.float16)
    opt = SGD(1.0, decay=1.0)
    opt.iterations.assign(2049)
    opt.apply_gradients([(np.float16(1000.0), var)])
    assert float(var.numpy()) == pytest.approx(-1000 / 2048, rel=1e-3)
