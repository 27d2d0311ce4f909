"""Buckets and chunks: every element once, in order; packing equals concatenation; routes
from policies; a GradientBuffer's buckets found in place, plain arrays never."""

import itertools

import numpy as np
import pytest

import distsgd
from distsgd import VariableAggregation as Agg
from distsgd import VariableSynchronization as Sync
from distsgd.distribute.layout import (
    Entry,
    Route,
    bucket_source,
    plan_buckets,
    plan_chunks,
    route_of,
)

F32 = np.dtype(np.float32)
SHAPES = [(3, 4), (0,), (7,), (2, 2, 5), (1,), (50,), (6,)]


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0, 5), (2, 2, 5)])
def test_entry_size_is_the_element_count_and_a_plain_int(shape):
    entry = Entry(0, F32, Route.SUM, shape)
    assert entry.size == np.zeros(shape).size and type(entry.size) is int
    assert entry == Entry(0, F32, Route.SUM, shape)


@pytest.mark.parametrize(("sync", "agg", "route"), [
    (Sync.AUTO, Agg.NONE, Route.SUM), (Sync.ON_WRITE, Agg.SUM, Route.SUM),
    (Sync.AUTO, Agg.MEAN, Route.MEAN), (Sync.AUTO, Agg.ONLY_FIRST_REPLICA, Route.FIRST),
    (Sync.NONE, Agg.MEAN, Route.LOCAL)])
def test_routes_follow_the_policies(sync, agg, route):
    var = distsgd.Variable(np.zeros(2, np.float32), synchronization=sync, aggregation=agg)
    assert route_of(var) is route


def _plan(chunk_bytes, local=None, shapes=SHAPES):
    entries = [Entry(i, F32, Route.SUM, s) for i, s in enumerate(shapes)]
    buckets = plan_buckets(entries, 1 << 20)
    return buckets, plan_chunks(buckets, chunk_bytes, local)


def _grads(shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize(("chunk_bytes", "local"), [(4, None), (40, None), (1 << 20, None),
                                                    (40, 80), (16, 4)])
def test_chunks_cover_each_element_once_and_pack_to_the_concatenation(chunk_bytes, local):
    buckets, chunks = _plan(chunk_bytes, local)
    grads = _grads()
    whole = np.concatenate([g.ravel() for g in grads])
    assert chunks[0].start == 0
    assert all(a.stop == b.start for a, b in itertools.pairwise(chunks))
    assert chunks[-1].stop == buckets[0].size == whole.size
    for chunk in chunks:
        if local is None:
            assert chunk.size * 4 <= chunk_bytes or chunk.size == 1
        out = np.full(chunk.size, np.nan, np.float32)
        chunk.pack_(grads, out)
        np.testing.assert_array_equal(out, whole[chunk.start:chunk.stop])
        views = chunk.views(grads)
        assert sum(view.size for view, _ in views) == chunk.size
        for view, offset in views:
            np.testing.assert_array_equal(view, out[offset:offset + view.size])


def test_local_chunks_keep_small_gradients_whole_and_give_large_ones_their_own():
    _, chunks = _plan(40, 80)  # 10 elements a chunk; 20-element chunks of large gradients
    for chunk in chunks:
        whole = [p for p in chunk.pieces if p.size <= 10 and p.start == 0]
        assert whole == list(chunk.pieces) or len(chunk.pieces) == 1
    big = [c for c in chunks if c.pieces[0].position == 5]
    assert [c.size for c in big] == [20, 20, 10]


def test_none_gradients_pack_as_zeros_and_have_no_views():
    entries = [Entry(0, F32, Route.SUM, (4,)), Entry(2, F32, Route.SUM, (4,))]
    (chunk,) = plan_chunks(plan_buckets(entries, 1 << 20), 1 << 20)
    grads = _grads([(4,)] * 3)
    grads[2] = None
    out = np.empty(8, np.float32)
    chunk.pack_(grads, out)
    np.testing.assert_array_equal(out, np.concatenate([grads[0], np.zeros(4)]))
    assert chunk.views(grads) is None


def test_buckets_group_by_dtype_and_route_in_order_up_to_the_threshold():
    f64 = np.dtype(np.float64)
    entries = [Entry(0, F32, Route.SUM, (10,)), Entry(1, f64, Route.SUM, (10,)),
               Entry(2, F32, Route.MEAN, (10,)), Entry(3, F32, Route.SUM, (10,)),
               Entry(4, F32, Route.SUM, (10,))]
    buckets = plan_buckets(entries, 80)  # two float32 tensors a bucket
    assert [[e.position for e in b.entries] for b in buckets] == [[0, 3], [1], [2], [4]]
    assert [b.index for b in buckets] == [0, 1, 2, 3]
    assert [b.offsets for b in buckets] == [(0, 10), (0,), (0,), (0,)]
    assert [len(b.entries) for b in plan_buckets(entries, 0)] == [1] * 5


def test_a_gradient_buffers_bucket_is_found_in_place_and_plain_arrays_never():
    variables = [distsgd.Variable(np.zeros(s, np.float32)) for s in [(3,), (2, 2), (5,)]]
    buffer = distsgd.GradientBuffer(variables)
    entries = [Entry(i, F32, Route.SUM, v.shape) for i, v in enumerate(variables)]
    (bucket,) = plan_buckets(entries, 1 << 20)
    source = bucket_source(bucket, buffer.grads)
    assert source is not None and np.shares_memory(source, buffer.flat[F32])
    assert source.size == 12
    plain = [np.zeros(v.shape, np.float32) for v in variables]
    assert bucket_source(bucket, plain) is None
    gap = plan_buckets([entries[0], entries[2]], 1 << 20)[0]  # not back to back
    assert bucket_source(gap, buffer.grads) is None
