"""bfloat16 transport at any world size: the closed form, every route, chunking,
missing gradients, a GradientBuffer, replicas bitwise equal, and a mismatch named."""

import contextlib

import numpy as np
import pytest

import distsgd
from distsgd import VariableAggregation as Agg
from distsgd import VariableSynchronization as Sync
from distsgd.distribute import MismatchError, MPIStrategy
from distsgd.distribute.transport import bfloat16
from distsgd.optimizers import SGD
from tests.mpi.conftest import assert_replicas_identical

BFLOAT16 = bfloat16()

pytestmark = pytest.mark.mpi

SHAPES = [(7,), (3, 5), (1,), (64, 33), (2,)]


def bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` rounded to bfloat16 and widened back."""
    flat = np.ascontiguousarray(values, np.float32).reshape(-1)
    return flat.astype(BFLOAT16).astype(np.float32).reshape(np.shape(values))


def local_gradient(rank: int, shape, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng([rank, int(np.prod(shape))])
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 3, shape)).astype(dtype)


def compressed_sum(size: int, shape) -> np.ndarray:
    """bf16(sum over ranks, in rank order and float32, of bf16(gradient of rank r))."""
    total = bfloat16(local_gradient(0, shape))
    for r in range(1, size):
        total = total + bfloat16(local_gradient(r, shape))
    return bfloat16(total) if size > 1 else local_gradient(0, shape)


def applied(strategy, grads, policy=(Sync.AUTO, Agg.NONE), dtype=np.float32, buffer=False):
    """What one SGD(1.0) step from zeros applies: minus the aggregated gradient."""
    with strategy.scope():
        variables = [distsgd.Variable(np.zeros(g.shape, dtype), synchronization=policy[0],
                                      aggregation=policy[1], name=f"v{i}")
                     for i, g in enumerate(grads)]
        opt = SGD(1.0)
        if buffer:
            gradients = distsgd.GradientBuffer(variables)
            for view, g in zip(gradients.grads, grads, strict=True):
                view[...] = g
            opt.apply_gradients(gradients)
        else:
            opt.apply_gradients(zip(grads, variables, strict=True))
    return [-v.numpy() for v in variables]


@pytest.fixture(scope="module", params=[4 << 20, 100, 8], ids=["4MiB", "100B", "8B"])
def compressed(request):
    """Strategies whose chunks are one message, several, and shorter than the ranks."""
    return MPIStrategy(compression="bfloat16", allreduce_chunk_bytes=request.param,
                       fusion_threshold_bytes=request.param)


@pytest.mark.parametrize("buffer", [False, True], ids=["arrays", "GradientBuffer"])
def test_sum_is_the_closed_form_on_every_rank(compressed, buffer):
    rank, size = compressed.rank, compressed.num_replicas_in_sync
    results = applied(compressed, [local_gradient(rank, s) for s in SHAPES], buffer=buffer)
    for result, shape in zip(results, SHAPES, strict=True):
        np.testing.assert_array_equal(result, compressed_sum(size, shape))
    assert_replicas_identical(compressed, *results)


def test_mean_divides_the_compressed_sum(compressed):
    rank, size = compressed.rank, compressed.num_replicas_in_sync
    results = applied(compressed, [local_gradient(rank, s) for s in SHAPES],
                      policy=(Sync.ON_WRITE, Agg.MEAN))
    for result, shape in zip(results, SHAPES, strict=True):
        np.testing.assert_array_equal(result, compressed_sum(size, shape) / np.float32(size))


@pytest.mark.parametrize(("policy", "dtype"), [
    ((Sync.AUTO, Agg.ONLY_FIRST_REPLICA), np.float32),
    ((Sync.NONE, Agg.NONE), np.float32),
    ((Sync.AUTO, Agg.SUM), np.float64),
], ids=["first", "local", "float64"])
def test_other_routes_and_dtypes_travel_exactly(compressed, strategy, policy, dtype):
    rank = compressed.rank
    grads = [local_gradient(rank, s, dtype) for s in SHAPES]
    for result, exact in zip(applied(compressed, grads, policy, dtype),
                             applied(strategy, grads, policy, dtype), strict=True):
        np.testing.assert_array_equal(result, exact)


def test_a_missing_gradient_is_sent_as_zeros(compressed):
    rank, size = compressed.rank, compressed.num_replicas_in_sync
    grad = local_gradient(rank, (40,)) if rank != size - 1 else None
    keras_warning = pytest.warns(UserWarning, match="Gradients do not exist") \
        if size == 1 else contextlib.nullcontext()  # only when no rank has a gradient
    with compressed.scope(), keras_warning:
        var = distsgd.Variable(np.zeros(40, np.float32), name="v")
        other = distsgd.Variable(np.zeros(2, np.float32), name="other")
        SGD(1.0).apply_gradients([(grad, var), (np.ones(2, np.float32), other)])
    expected = np.zeros(40, np.float32)
    for r in range(size - 1):
        expected = expected + bfloat16(local_gradient(r, (40,)))
    np.testing.assert_array_equal(-var.numpy(), bfloat16(expected) if size > 1 else 0)
    np.testing.assert_array_equal(-other.numpy(), size)


def test_ranks_that_disagree_on_compression_get_the_same_error(strategy):
    if strategy.num_replicas_in_sync < 2:
        pytest.skip("needs two ranks")
    mixed = MPIStrategy(compression="bfloat16" if strategy.rank == 0 else None)
    with mixed.scope(), pytest.raises(MismatchError, match="bfloat16"):
        var = distsgd.Variable(np.zeros(3, np.float32), name="v")
        SGD(1.0).apply_gradients([(np.ones(3, np.float32), var)])
    np.testing.assert_array_equal(var.numpy(), 0.0)
