"""Chunks cover every element once; packing equals concatenation; the walk hands out
exactly the gradients, read in place only when nothing will write to them."""

import itertools

import numpy as np
import pytest

from distsgd.distribute.fusion import (
    Entry,
    plan_buckets,
    plan_chunks,
    stream_chunks,
)
from distsgd.kernels import ScratchBuffers

F32 = np.dtype(np.float32)
SHAPES = [(3, 4), (0,), (7,), (2, 2, 5), (1,), (50,), (6,)]


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0, 5), (2, 2, 5)])
def test_entry_size_is_the_element_count_and_a_plain_int(shape):
    entry = Entry(0, F32, "sum", shape)
    assert entry.size == np.zeros(shape).size and type(entry.size) is int
    assert entry == Entry(0, F32, "sum", shape)


def _plan(chunk_bytes, isolate=None, shapes=SHAPES):
    entries = [Entry(i, F32, "sum", s) for i, s in enumerate(shapes)]
    buckets = plan_buckets(entries, 1 << 20)
    return buckets, plan_chunks(buckets, chunk_bytes, isolate)


def _grads(shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize(("chunk_bytes", "isolate"), [(4, None), (40, None), (1 << 20, None),
                                                      (40, 80), (16, 4)])
def test_chunks_cover_each_element_once_and_pack_to_the_concatenation(chunk_bytes, isolate):
    buckets, chunks = _plan(chunk_bytes, isolate)
    grads = _grads()
    whole = np.concatenate([g.ravel() for g in grads])
    assert chunks[0].start == 0
    assert all(a.stop == b.start for a, b in itertools.pairwise(chunks))
    assert chunks[-1].stop == buckets[0].size == whole.size
    for chunk in chunks:
        if isolate is None:
            assert chunk.size * 4 <= chunk_bytes or chunk.size == 1
        out = np.full(chunk.size, np.nan, np.float32)
        chunk.pack_(grads, out)
        np.testing.assert_array_equal(out, whole[chunk.start:chunk.stop])


@pytest.mark.parametrize("layout", ["contiguous", "strided", "fortran"])
def test_many_small_gradients_pack_to_the_concatenation_whatever_their_layout(layout):
    """Runs of small whole gradients are copied by ``bytes.join``; a gradient that is not
    C-contiguous has no flat buffer, and the run falls back to ``np.concatenate``."""
    shapes = [(4, 3)] * 30 + [(1,), (0,), (2, 5)]
    _, chunks = _plan(1 << 20, shapes=shapes)
    grads = _grads(shapes)
    if layout == "strided":
        grads[7] = np.ones((4, 6), np.float32)[:, ::2]
    elif layout == "fortran":
        grads[7] = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    (chunk,) = chunks
    assert [join for *_, join in chunk._copies] == [True]  # one run, joined
    out = np.full(chunk.size, np.nan, np.float32)
    chunk.pack_(grads, out, any_none=False)
    np.testing.assert_array_equal(out, np.concatenate([g.ravel() for g in grads]))


def test_isolating_groups_small_gradients_whole_and_gives_large_ones_their_own_chunks():
    _, chunks = _plan(40, 80)  # 10 elements a chunk; 20-element chunks of large gradients
    for chunk in chunks:
        small = [p for p in chunk.pieces if p.stop - p.start <= 10 and p.whole]
        assert small == list(chunk.pieces) or len(chunk.pieces) == 1
    big = [c for c in chunks if c.pieces[0].position == 5]
    assert [c.size for c in big] == [20, 20, 10]


def test_none_gradients_pack_as_zeros_and_positions_may_skip():
    shapes = [(4,), (4,), (4,), (4,)]
    entries = [Entry(0, F32, "sum", (4,)), Entry(2, F32, "sum", (4,)), Entry(3, F32, "sum", (4,))]
    chunks = plan_chunks(plan_buckets(entries, 1 << 20), 1 << 20)
    grads = _grads(shapes)
    out = np.empty(12, np.float32)
    chunks[0].pack_(grads, out, any_none=False)
    np.testing.assert_array_equal(out, np.concatenate([grads[0], grads[2], grads[3]]))
    grads[2] = None
    chunks[0].pack_(grads, out)
    np.testing.assert_array_equal(out, np.concatenate([grads[0], np.zeros(4), grads[3]]))


class Seen(np.ndarray):
    """A copy of what on_chunk got, remembering the array it was (for shares_memory)."""

    def __new__(cls, copy, original):
        seen = copy.view(cls)
        seen.original = original
        return seen


def _collect(chunks, grads, **kwargs):
    seen = {}

    def on_chunk(chunk, grad, offset, worker):
        seen[(chunk.index, offset)] = Seen(grad.copy(), grad)  # buffers are reused

    stream_chunks(chunks, grads, on_chunk, buffers=[ScratchBuffers() for _ in range(3)],
                  **kwargs)
    return seen


def test_walk_reads_few_large_pieces_in_place_and_packs_many_small_ones():
    shapes = [(100,), (30,)] + [(2,)] * 10
    grads = _grads(shapes)
    entries = [Entry(i, F32, "local", s) for i, s in enumerate(shapes)]
    chunks = plan_chunks(plan_buckets(entries, 1 << 20), 1 << 20)
    assert len(chunks) == 1 and len(chunks[0].pieces) == 12
    seen = _collect(chunks, grads)
    (grad,) = seen.values()
    np.testing.assert_array_equal(grad, np.concatenate([g.ravel() for g in grads]))
    assert not any(np.shares_memory(grad.original, g) for g in grads)  # packed: 12 pieces

    chunks = plan_chunks(plan_buckets(entries[:2], 1 << 20), 1 << 20)
    seen = _collect(chunks, grads[:2])
    assert sorted(seen) == [(0, 0), (0, 100)]
    assert np.shares_memory(seen[(0, 0)].original, grads[0])  # two pieces: read in place


def test_walk_never_lets_a_writer_or_a_reduction_touch_the_callers_arrays():
    grads = _grads([(64,)])
    chunks = plan_chunks(plan_buckets([Entry(0, F32, "sum", (64,))], 1 << 20), 1 << 20)
    def double(chunk, buffer, send=None):  # a stand-in collective
        np.multiply(buffer if send is None else send, 2, out=buffer)

    for kwargs in ({"writable": True}, {"reduce": double}):
        seen = _collect(chunks, grads, **kwargs)
        (grad,) = seen.values()
        assert not np.shares_memory(grad.original, grads[0])
    np.testing.assert_array_equal(seen[(0, 0)], 2 * grads[0])


@pytest.mark.parametrize("reduce", [False, True])
def test_threaded_walks_hand_out_every_chunk_once(reduce):
    from concurrent.futures import ThreadPoolExecutor

    shapes = [(37,)] * 20
    grads = _grads(shapes)
    entries = [Entry(i, F32, "sum", s) for i, s in enumerate(shapes)]
    chunks = plan_chunks(plan_buckets(entries, 1 << 20), 64)
    reduced = []
    with ThreadPoolExecutor(2) as pool:
        seen = _collect(chunks, grads, pool=pool, workers=3,
                        reduce=(lambda c, b, send=None: reduced.append(c.index) or
                                (send is not None and np.copyto(b, send))) if reduce else None)
    whole = np.concatenate(grads)
    got = np.empty_like(whole)
    for (index, offset), grad in seen.items():
        start = chunks[index].start + offset
        got[start:start + grad.size] = grad
    np.testing.assert_array_equal(got, whole)
    if reduce:
        assert reduced == list(range(len(chunks)))  # reductions stay in order


def test_one_piece_chunks_go_to_the_reduction_where_they_lie():
    grads = _grads([(64,), (3,), (3,)])
    entries = [Entry(i, F32, "sum", g.shape) for i, g in enumerate(grads)]
    chunks = plan_chunks(plan_buckets(entries, 1 << 20), 64 * 4)  # [64], [3, 3]
    sent = []

    def reduce(chunk, buffer, send=None):
        sent.append(send)
        if send is not None:
            np.copyto(buffer, send)

    seen = _collect(chunks, grads, reduce=reduce)
    assert np.shares_memory(sent[0], grads[0]) and sent[1] is None  # the second was packed
    np.testing.assert_array_equal(seen[(1, 0)], np.concatenate(grads[1:]))
