"""Failures end the whole job with a message naming the cause instead of hanging."""

import re

import pytest

from tests.e2e.conftest import PROGRAMS

pytestmark = pytest.mark.slow


def test_unhandled_exception_on_one_rank_aborts_the_job(mpirun):
    result = mpirun(2, PROGRAMS / "raise_on_one_rank.py", env={"DISTSGD_TIMEOUT": "120"})
    assert result.returncode != 0
    assert "[distsgd rank 1/2] unhandled exception; aborting the whole job" in result.stderr
    assert "RuntimeError: boom on rank 1" in result.stderr
    assert "unreachable" not in result.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_rank_that_stops_calling_collectives_ends_the_job_with_its_name(mpirun, ranks):
    result = mpirun(ranks, PROGRAMS / "stall_one_rank.py", "sleep", env={"DISTSGD_TIMEOUT": "2"})
    assert result.returncode != 0
    last = ranks - 1
    assert f"[distsgd rank 0/{ranks}] CollectiveTimeoutError: rank 0/{ranks}: gradient " \
           "aggregation at step 1: operation check did not complete within 2 s " \
           f"(DISTSGD_TIMEOUT); rank {last} did not arrive (dead, hung, or busy outside " \
           "distsgd)" in result.stderr
    if ranks == 3:
        assert "ranks 1 wait here too" in result.stderr
    assert "woke up" not in result.stdout and "finished step 2" not in result.stdout


def test_a_frozen_rank_is_named_and_the_job_ends(mpirun):
    """SIGSTOP: the process exists but never arrives (MPI cannot tell it from slow)."""
    result = mpirun(3, PROGRAMS / "stall_one_rank.py", "freeze", env={"DISTSGD_TIMEOUT": "2"})
    assert result.returncode != 0
    # whichever surviving rank's report reaches the launcher first
    assert re.search(r"CollectiveTimeoutError: rank [01]/3: gradient aggregation at step 1: "
                     r"operation check did not complete within 2 s \(DISTSGD_TIMEOUT\); "
                     r"rank 2 did not arrive", result.stderr), result.stdout + result.stderr
    assert "finished step 2" not in result.stdout
