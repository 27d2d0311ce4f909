"""Failures end the whole job with a message naming the cause instead of hanging, and a
slow step is never taken for a dead rank."""

import re
import time

import pytest

from tests.e2e.conftest import PROGRAMS

pytestmark = pytest.mark.slow


def _timed(mpirun, *args, **kwargs):
    started = time.monotonic()
    result = mpirun(*args, **kwargs)
    return result, time.monotonic() - started


def test_unhandled_exception_on_one_rank_aborts_the_job(mpirun):
    result = mpirun(2, PROGRAMS / "raise_on_one_rank.py")
    assert result.returncode != 0
    assert "[distsgd rank 1/2] unhandled exception: aborting the whole job" in result.stderr
    assert "RuntimeError: boom on rank 1" in result.stderr
    assert "unreachable" not in result.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_the_same_error_on_every_rank_prints_one_traceback(mpirun, ranks):
    result = mpirun(ranks, PROGRAMS / "raise_on_one_rank.py", "everywhere")
    assert result.returncode != 0
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert "RuntimeError: boom on rank" in result.stderr


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_rank_that_stops_calling_collectives_ends_the_job_with_its_name(mpirun, ranks):
    result = mpirun(ranks, PROGRAMS / "stall_one_rank.py", "sleep", env={"DISTSGD_TIMEOUT": "2"})
    assert result.returncode != 0
    last = ranks - 1
    assert re.search(rf"CollectiveTimeoutError: rank 0/{ranks} waits in gradient aggregation "
                     r"at step 1: operation check \(operation #\d+\), which did not complete "
                     rf"within 2 s \(DISTSGD_TIMEOUT\); rank {last} \(pid \d+\) is computing "
                     r"outside distsgd, after operation #\d+: alive, but not arriving",
                     result.stderr), result.stderr
    assert "woke up" not in result.stdout and "finished step 2" not in result.stdout


def test_a_frozen_rank_is_named_within_the_heartbeat_timeout(mpirun):
    """SIGSTOP: the process exists but sends no heartbeat; default settings."""
    result, seconds = _timed(mpirun, 3, PROGRAMS / "stall_one_rank.py", "freeze")
    assert result.returncode != 0
    assert re.search(r"CollectiveTimeoutError: rank 2 sent no heartbeat for 10 s "
                     r"\(DISTSGD_HEARTBEAT_TIMEOUT\): frozen \(SIGSTOP\), dead, or cut off",
                     result.stderr), result.stdout + result.stderr
    assert "finished step 2" not in result.stdout
    assert seconds < 30  # start-up + 10 s + the abort


@pytest.mark.parametrize(("where", "ranks"), [("checkpoint", 2), ("checkpoint", 3),
                                              ("exit", 2), ("exit", 3)])
def test_a_rank_frozen_in_a_checkpoint_write_or_at_exit_is_named(mpirun, tmp_path, where,
                                                                ranks):
    result, seconds = _timed(mpirun, ranks, PROGRAMS / "freeze.py", where, tmp_path / "ckpt")
    assert result.returncode != 0
    frozen = 0 if where == "checkpoint" else ranks - 1
    assert f"rank {frozen} sent no heartbeat for 10 s" in result.stderr, result.stderr
    assert "done" not in result.stdout
    assert seconds < 30


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_running_different_numbers_of_steps_are_named_at_once(mpirun, ranks):
    result, seconds = _timed(mpirun, ranks, PROGRAMS / "uneven_steps.py")
    assert result.returncode != 0
    assert "ranks are out of step: rank 0 at gradient aggregation at step 3" in result.stderr
    assert "at the end of its program (it finished)" in result.stderr
    assert seconds < 20  # not the 600 s deadline


def test_a_slow_step_is_not_a_dead_rank(mpirun):
    """Rank 0 computes for 12 s (longer than the heartbeat timeout) between two steps."""
    result = mpirun(2, PROGRAMS / "slow_steps.py", "12", "2")
    assert result.returncode == 0, result.stderr
    assert "rank 0 done" in result.stdout and "rank 1 done" in result.stdout
    assert "CollectiveTimeoutError" not in result.stderr
