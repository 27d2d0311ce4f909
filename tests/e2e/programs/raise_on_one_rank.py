"""Rank 1 raises while rank 0 waits in a collective (argv[1] "everywhere": every rank
raises the same error): the job must end, not hang, with one traceback."""
import sys

import numpy as np

import distsgd
from distsgd.distribute import MPIStrategy
from distsgd.optimizers import SGD

everywhere = sys.argv[1:] == ["everywhere"]
strategy = MPIStrategy()
with strategy.scope():
    var = distsgd.Variable(np.zeros(3), name="w")
    if strategy.rank == 1 or everywhere:
        raise RuntimeError(f"boom on rank {strategy.rank}")
    SGD(0.1).apply_gradients([(np.ones(3), var)])
print("unreachable on a multi-rank run", flush=True)
