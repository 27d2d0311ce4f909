"""bfloat16 transport: ml_dtypes' rounding against an independent reference, the shards,
which buckets it carries, the argument's validation, and no effect in one process."""

import numpy as np
import pytest

import distsgd
from distsgd.distribute import MPIStrategy, Strategy, replica_share
from distsgd.distribute.layout import Route
from distsgd.distribute.transport import (
    BFloat16Transport,
    ExactTransport,
    bfloat16,
    make_transport,
    shard_counts,
)
from distsgd.optimizers import SGD

BFLOAT16 = bfloat16()

NEXT_BINADE = 2.0 ** 128  # where the value after bfloat16's largest finite one would be


def nearest_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even, by comparing distances in float64 (NaN-free)."""
    bits = values.view(np.uint32)
    low = bits & np.uint32(0xFFFF0000)  # toward zero
    high = low + np.uint32(0x10000)  # away from zero (may be the infinity)
    as_float = lambda b: np.abs(b.view(np.float32).astype(np.float64))  # noqa: E731
    x, below = np.abs(values.astype(np.float64)), as_float(low)
    above = np.where((high & np.uint32(0x7FFFFFFF)) == 0x7F800000, NEXT_BINADE, as_float(high))
    infinite = np.isinf(values)
    take_high = ~infinite & ((x - below > above - x) |
                             ((x - below == above - x) & ((low >> 16) & 1 == 1)))
    return (np.where(take_high, high, low) >> 16).astype(np.uint16)


def rounded(values: np.ndarray) -> np.ndarray:
    """The bits the transport sends for ``values`` (its conversion: ml_dtypes)."""
    out = np.zeros(values.size, BFLOAT16)
    with np.errstate(invalid="ignore", over="ignore"):
        np.copyto(out, values, casting="unsafe")
    return out.view(np.uint16)


def widen_bfloat16_(bits: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, bits.view(BFLOAT16))


def test_rounding_is_to_nearest_even_over_random_bit_patterns():
    bits = np.random.default_rng(0).integers(0, 2 ** 32, 200_000, dtype=np.uint64)
    values = bits.astype(np.uint32).view(np.float32)
    values = values[~np.isnan(values)]
    np.testing.assert_array_equal(rounded(values), nearest_bfloat16_bits(values))


@pytest.mark.parametrize(("value", "bits"), [
    (1.0, 0x3F80), (-0.0, 0x8000), (0.0, 0x0000),
    (1.00390625, 0x3F80),  # halfway between 1 and 1 + 2**-7: to the even one, 1
    (1.01171875, 0x3F82),  # halfway between 1 + 2**-7 and 1 + 2**-6: to the even one
    (1.0078125, 0x3F81),  # exact
    (np.inf, 0x7F80), (-np.inf, 0xFF80),
    (3.4028235e38, 0x7F80),  # float32's largest rounds up to the infinity
    (-3.4028235e38, 0xFF80),
    (1e-45, 0x0000),  # the smallest subnormal rounds to zero
    (1.1754942e-38, 0x0080),  # the largest subnormal rounds up to the smallest normal
])
def test_special_values(value, bits):
    assert rounded(np.array([value], np.float32))[0] == bits


def test_nan_stays_nan_even_when_its_payload_would_carry():
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC00000, 0xFF80FFFF],
                    np.uint32).view(np.float32)
    widened = np.zeros(nans.size, np.float32)
    widen_bfloat16_(rounded(nans), widened)
    assert np.isnan(widened).all()
    np.testing.assert_array_equal(np.signbit(widened), np.signbit(nans))


def test_widening_is_exact_and_undoes_rounding_of_bfloat16_values():
    bits = np.random.default_rng(1).integers(0, 2 ** 16, 50_000).astype(np.uint16)
    widened = np.zeros(bits.size, np.float32)
    widen_bfloat16_(bits, widened)
    np.testing.assert_array_equal(widened.view(np.uint32), bits.astype(np.uint32) << 16)
    finite = ~np.isnan(widened)
    np.testing.assert_array_equal(rounded(widened[finite]), bits[finite])


def test_bfloat16_carries_only_summed_float32_buckets():
    transport = make_transport("bfloat16")
    assert isinstance(transport, BFloat16Transport)
    assert isinstance(make_transport(None), ExactTransport)
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    assert transport.carries(f32, Route.SUM) and transport.carries(f32, Route.MEAN)
    assert not transport.carries(f64, Route.SUM)
    assert not transport.carries(f32, Route.FIRST) and not transport.carries(f32, Route.LOCAL)


@pytest.mark.parametrize("elements", [1, 2, 3, 7, 8, 1000, 1001])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_shards_cover_the_chunk_in_order(elements, size):
    counts = shard_counts(elements, size)
    assert len(counts) == size and sum(counts) == elements
    assert max(counts) - min(counts) <= 1
    starts = [replica_share(elements, r, size).start for r in range(size)]
    assert starts == [sum(counts[:r]) for r in range(size)]


@pytest.mark.parametrize("bad", ["float16", "bf16", "", 16, True, np.float16])
@pytest.mark.parametrize("make", [Strategy, MPIStrategy])
def test_compression_is_validated(make, bad):
    with pytest.raises(ValueError, match=r"compression=.*expected one of \(None, 'bfloat16'\)"):
        make(compression=bad)


def test_one_process_sends_nothing_so_nothing_is_rounded():
    strategy = Strategy(compression="bfloat16")
    grad = np.array([1.00390625, 0.1, -3.3], np.float32)  # none is a bfloat16 value
    with strategy.scope():
        var = distsgd.Variable(np.zeros(3, np.float32))
        SGD(1.0).apply_gradients([(grad, var)])
    np.testing.assert_array_equal(var.numpy(), -grad)


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_the_transports_conversions_give_ml_dtypes_bits_nans_included(kernels, monkeypatch):
    """With numba a compiled loop rounds (8x faster); it must give ml_dtypes' bits for
    every pattern, NaNs included; widening is a shift, exact."""
    from distsgd.distribute import transport

    if kernels == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("DISTSGD_KERNELS", kernels)
    bits = np.random.default_rng(3).integers(0, 2 ** 32, 300_000, dtype=np.uint64)
    values = np.concatenate([bits.astype(np.uint32), np.array(
        [0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7FC00000, 0x7F810000], np.uint32)]
    ).view(np.float32)
    got = np.zeros(values.size, BFLOAT16)
    transport._round_(values, got)
    np.testing.assert_array_equal(got.view(np.uint16), rounded(values))
    widened = np.zeros(values.size, np.float32)
    transport._widen_(got, widened)
    np.testing.assert_array_equal(widened.view(np.uint32),
                                  got.view(np.uint16).astype(np.uint32) << 16)
