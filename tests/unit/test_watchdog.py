"""The watchdog's verdicts from the peers' statuses, at chosen times: out of step only on
fresh heartbeats that say so for OUT_OF_STEP_SECONDS; a peer frozen just after a
heartbeat (its last status names an operation it has left) is named silent, never out
of step (found by CI: a rank frozen in a checkpoint write was called out of step)."""

import os

import pytest

from distsgd.distribute.watchdog import (
    FRESH_STATUS_SECONDS,
    OUT_OF_STEP_SECONDS,
    WAITING,
    Watchdog,
)


@pytest.fixture
def watchdog():
    """Rank 0 of 2, waiting in operation #5; the thread stopped, so only _check runs."""
    dog = Watchdog(None, 0, 2, timeout_seconds=600.0, silence_seconds=10.0,
                   place=lambda: (5, "saving checkpoint step 3"), abort=lambda code: None)
    dog.stop()
    dog._comm = object()  # as if heartbeats ran; nothing is sent from here
    dog._armed = (0.0, "saving checkpoint step 3")
    return dog


def _heard(dog, at, sequence, label="gradient aggregation at step 1"):
    dog._status[1] = (sequence, WAITING, os.getpid(), 0, label)
    dog._last_seen[1] = at


def test_a_live_peer_in_another_operation_is_out_of_step(watchdog):
    verdicts = []
    for tick in range(40):
        now = tick * 0.1
        _heard(watchdog, now - 0.5, 3)  # a heartbeat each second: always fresh
        verdicts.append((now, watchdog._check(now)))
    named = [now for now, verdict in verdicts if verdict is not None]
    assert named and OUT_OF_STEP_SECONDS < named[0] <= OUT_OF_STEP_SECONDS + 0.2
    assert "ranks are out of step" in verdicts[-1][1][1]
    assert "rank 1 (pid" in verdicts[-1][1][1]


def test_a_peer_frozen_after_a_stale_heartbeat_is_named_silent_not_out_of_step(watchdog):
    _heard(watchdog, 0.0, 3)  # its last word, then SIGSTOP
    verdicts = [(tick / 10, watchdog._check(tick / 10)) for tick in range(0, 120)]
    first = next((now, v) for now, v in verdicts if v is not None)
    assert first[0] > 10.0
    assert "rank 1 sent no heartbeat for 10 s" in first[1][1]
    assert FRESH_STATUS_SECONDS < OUT_OF_STEP_SECONDS


def test_a_peer_in_the_same_operation_is_waited_for(watchdog):
    for tick in range(60):
        now = tick * 0.1
        _heard(watchdog, now, 5, "saving checkpoint step 3")
        assert watchdog._check(now) is None


def test_ranks_that_move_are_never_out_of_step(watchdog):
    """Fast steps: this rank re-arms every few milliseconds, and a peer's latest status
    (up to a second old) names an earlier operation (a false report seen in a loop of the
    interrupt tests)."""
    sequence = 5
    watchdog._place = lambda: (sequence, "gradient aggregation")
    for tick in range(100):
        now = tick * 0.1
        sequence += 60  # about 60 operations per tick
        watchdog._armed = (now - 0.001, "gradient aggregation")
        _heard(watchdog, now - 0.5, sequence - 300)
        assert watchdog._check(now) is None
