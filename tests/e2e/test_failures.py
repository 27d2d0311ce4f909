"""Failures end the whole job with a message naming the cause instead of hanging."""

import pytest

from tests.e2e.conftest import PROGRAMS

pytestmark = pytest.mark.slow


def test_unhandled_exception_on_one_rank_aborts_the_job(mpirun):
    result = mpirun(2, PROGRAMS / "raise_on_one_rank.py", env={"DISTSGD_TIMEOUT": "120"})
    assert result.returncode != 0
    assert "[distsgd rank 1/2] unhandled exception; aborting the whole job" in result.stderr
    assert "RuntimeError: boom on rank 1" in result.stderr
    assert "unreachable" not in result.stdout


def test_a_rank_that_stops_calling_collectives_is_a_timeout_error(mpirun):
    result = mpirun(2, PROGRAMS / "skip_collective.py", env={"DISTSGD_TIMEOUT": "2"})
    assert result.returncode != 0
    assert "rank 0 caught CollectiveTimeoutError: rank 0/2: gradient aggregation (call 2): " \
           "signature check did not complete within 2 s (DISTSGD_TIMEOUT)" in result.stdout
