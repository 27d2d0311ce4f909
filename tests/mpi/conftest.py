import hashlib

import numpy as np
import pytest

from distsgd.distribute import MPIStrategy


@pytest.fixture(scope="session")
def strategy():
    """One MPIStrategy over all ranks (a single process without mpirun)."""
    return MPIStrategy()


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def assert_replicas_identical(strategy, *arrays) -> None:
    """Every rank holds bitwise the same arrays."""
    digests = strategy.communicator.allgather_object(digest(*arrays))
    assert len(set(digests)) == 1, f"replicas differ: {digests}"


def aggregated(aggregator, grads, variables, step=0):
    """Per variable, the aggregated gradient one kept-results ``reduce`` gives (None: no
    rank has one)."""
    reduction = aggregator.reduce(grads, variables, step=step)
    return [reduction.sparse.get(i, dense) for i, dense in enumerate(reduction.dense)]
