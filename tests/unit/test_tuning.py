"""The chunk size tuner: its schedule, its choice, and its one collective."""

from __future__ import annotations

import numpy as np
import pytest

from distsgd.distribute import MPIStrategy
from distsgd.distribute.tuning import ChunkSizeTuner


class _Peers:
    """A communicator whose ``allreduce_`` MAX also sees the peers' ``vectors``."""

    def __init__(self, *vectors: list[float]) -> None:
        self.vectors = vectors
        self.calls: list[tuple[str, str]] = []

    def allreduce_(self, buffer: np.ndarray, op: str = "sum", what: str = "") -> None:
        self.calls.append((op, what))
        for vector in self.vectors:
            np.maximum(buffer, vector, out=buffer)


def _run(tuner: ChunkSizeTuner, communicator, seconds: dict[int, float]) -> list[int]:
    """Drive ``tuner`` until it chooses; each call 'takes' ``seconds[size]``."""
    sizes = []
    while tuner.chosen is None:
        size = tuner.chunk_bytes(communicator)
        sizes.append(size)
        if tuner.chosen is None:
            tuner.record(seconds[size])
    return sizes


def test_each_candidate_warms_up_then_rounds_alternate_their_order() -> None:
    tuner = ChunkSizeTuner((4, 16), timed_rounds=3)
    sizes = _run(tuner, _Peers(), {4: 1.0, 16: 2.0})
    # warm-up A B, then B A, A B, B A, then the deciding call (which runs the choice)
    assert sizes == [4, 16, 16, 4, 4, 16, 16, 4, 4]
    assert tuner.samples == {4: [1.0] * 3, 16: [2.0] * 3}


def test_the_fastest_median_wins_and_warm_up_calls_do_not_count() -> None:
    tuner = ChunkSizeTuner((4, 8, 16), timed_rounds=3)
    communicator = _Peers()
    for call in range(3 + 9):
        size = tuner.chunk_bytes(communicator)
        # 8 is slow on its first use only; 16 has one slow spell the median ignores
        seconds = {4: 2.0, 8: 100.0 if call < 3 else 1.0, 16: 0.5}[size]
        if size == 16 and call == 8:
            seconds = 50.0
        tuner.record(seconds)
    assert communicator.calls == []  # no collective while trying
    assert tuner.chunk_bytes(communicator) == 16
    assert communicator.calls == [("max", "allreduce chunk size choice")]
    for _ in range(3):  # the choice stands, without further collectives or samples
        assert tuner.chunk_bytes(communicator) == 16
        tuner.record(9.0)
    assert len(communicator.calls) == 1
    assert tuner.samples[16] == [0.5, 50.0, 0.5]


def test_every_rank_takes_the_slowest_ranks_times() -> None:
    # here 16 is faster, but a peer found it slower than 4: the collective is as slow as
    # its slowest rank, so both choose 4
    tuner = ChunkSizeTuner((4, 16), timed_rounds=1)
    _run(tuner, _Peers([2.0, 3.0]), {4: 2.0, 16: 1.0})
    assert tuner.chosen == 4


def test_a_tie_keeps_the_first_candidate() -> None:
    tuner = ChunkSizeTuner((16, 4), timed_rounds=2)
    assert _run(tuner, _Peers(), {4: 1.0, 16: 1.0})[-1] == 16


def test_failed_calls_advance_the_schedule_without_a_sample() -> None:
    tuner = ChunkSizeTuner((4, 16), timed_rounds=1)
    for _ in range(4):
        size = tuner.chunk_bytes(_Peers())
        tuner.record(None if size == 16 else 1.0)
    # 16 has no sample on this rank: it counts as infinitely slow, so 4 is chosen
    assert tuner.chunk_bytes(_Peers()) == 4


def test_one_candidate_is_chosen_at_once() -> None:
    communicator = _Peers()
    tuner = ChunkSizeTuner((8,))
    assert tuner.chunk_bytes(communicator) == 8 and tuner.chosen == 8
    assert communicator.calls == []


def test_no_candidates_is_refused() -> None:
    with pytest.raises(ValueError, match="candidates"):
        ChunkSizeTuner(())


@pytest.mark.parametrize(("value", "error"), [("fast", ValueError), (0, ValueError),
                                              (-4, ValueError), (True, TypeError),
                                              (None, TypeError), (float("nan"), ValueError)])
def test_allreduce_chunk_bytes_is_auto_or_a_positive_size(value, error) -> None:
    with pytest.raises(error, match=r"allreduce_chunk_bytes=.*expected 'auto' or"):
        MPIStrategy(allreduce_chunk_bytes=value)


def test_allreduce_chunk_bytes_defaults_to_auto() -> None:
    assert MPIStrategy().allreduce_chunk_bytes == "auto"
    assert MPIStrategy(allreduce_chunk_bytes=1 << 20).allreduce_chunk_bytes == 1 << 20
