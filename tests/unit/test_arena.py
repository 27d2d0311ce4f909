"""The arena: variables made one after another lie back to back; runs are found exactly."""

import gc
import itertools
import mmap
import threading

import numpy as np
import pytest

import distsgd
from distsgd.arena import HUGE_PAGE_BYTES, Arena, huge_page_zeros, locate


def _adjacent(first, second):
    """``second`` starts right where ``first`` ends, in the same allocation."""
    (owner, offset), (other, start) = locate(first), locate(second)
    return owner is other and start == offset + first.size


def test_allocations_follow_each_other_in_a_block():
    arena = Arena(first_block_bytes=400, max_block_bytes=1600)
    arrays = [arena.empty((10,), np.float32) for _ in range(10)]  # 40 bytes each
    assert all(a.flags.c_contiguous and a.shape == (10,) for a in arrays)
    owners = [locate(a) for a in arrays]
    assert [offset for _, offset in owners[:10]] == list(range(0, 100, 10))
    assert all(owner is owners[0][0] for owner, _ in owners)
    nxt = arena.empty((3, 2), np.float32)  # the first block is full: a new, larger one
    assert locate(nxt)[0] is not owners[0][0] and locate(nxt)[0].size == 200


def test_blocks_double_up_to_the_cap_and_large_arrays_get_their_own():
    arena = Arena(first_block_bytes=64, max_block_bytes=256)  # 8, 16, 32, 32, ... float64
    owners = []
    for _ in range(8 + 16 + 32 + 32):
        owner = locate(arena.empty((1,), np.float64))[0]
        if not owners or owner is not owners[-1]:
            owners.append(owner)
    assert [o.size for o in owners] == [8, 16, 32, 32]
    big = arena.empty((1000,), np.float64)
    assert locate(big)[0].size == 1000 and locate(big)[1] == 0


def test_dtypes_have_separate_blocks():
    arena = Arena()
    a = arena.empty((4,), np.float32)
    b = arena.empty((4,), np.float64)
    c = arena.empty((4,), np.float32)
    assert _adjacent(a, c) and not _adjacent(a, b) and not _adjacent(b, c)


def test_threads_never_share_memory():
    arena = Arena(first_block_bytes=1 << 12)
    results = [[] for _ in range(4)]

    def allocate(i):
        for _ in range(200):
            results[i].append(arena.empty((7,), np.float32))

    threads = [threading.Thread(target=allocate, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = sorted((id(locate(a)[0]), locate(a)[1]) for r in results for a in r)
    for (o1, s1), (o2, s2) in itertools.pairwise(spans):
        assert o1 != o2 or s2 >= s1 + 7


def test_locate_finds_neighbours_and_treats_foreign_arrays_as_their_own_owner():
    arena = Arena()
    a, b = (arena.empty((3,), np.float32) for _ in range(2))
    foreign = np.zeros(3, np.float32)
    assert _adjacent(a, b) and not _adjacent(b, a) and not _adjacent(b, foreign)
    owner, offset = locate(foreign)
    assert offset == 0 and np.shares_memory(owner, foreign) and owner.size == 3
    owner, offset = locate(a)
    owner[offset:offset + 6] = np.arange(6)
    assert a.tolist() == [0, 1, 2] and b.tolist() == [3, 4, 5]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_variables_made_in_a_row_form_one_run_and_stay_independent(dtype):
    first = distsgd.Variable(np.zeros((2, 3), dtype))
    second = distsgd.Variable(np.ones(4, dtype))
    assert _adjacent(first._array, second._array)
    second.assign_add(np.ones(4, dtype))
    assert first.numpy().tolist() == [[0] * 3] * 2 and second.numpy().tolist() == [2] * 4
    integer = distsgd.Variable(np.zeros(3, np.int64))
    scalar = distsgd.Variable(dtype(1))
    assert integer._array.base is None and scalar._array.base is None


@pytest.mark.parametrize("elements, dtype", [(0, np.float32), (1000, np.float64),
                                             (HUGE_PAGE_BYTES // 4, np.float32),
                                             ((5 << 20) // 8 + 3, np.float64)])
def test_huge_page_zeros_are_zeroed_writable_and_separate(elements, dtype):
    first, second = huge_page_zeros(elements, dtype), huge_page_zeros(elements, dtype)
    for array in (first, second):
        assert array.shape == (elements,) and array.dtype == dtype
        assert array.flags.c_contiguous and array.flags.writeable
        assert not array.any()
    first[:] = 1
    assert not second.any()  # no shared memory between buffers
    large = elements * np.dtype(dtype).itemsize >= HUGE_PAGE_BYTES
    if large and hasattr(mmap, "MADV_HUGEPAGE"):
        assert first.ctypes.data % HUGE_PAGE_BYTES == 0  # huge pages can back all of it


def test_huge_page_zeros_memory_lives_as_long_as_the_array():
    array = huge_page_zeros(HUGE_PAGE_BYTES // 8, np.float64)
    view = array[10:20]
    del array
    gc.collect()
    view[:] = 7.0  # still mapped: the view keeps the buffer alive
    assert view.sum() == 70.0
