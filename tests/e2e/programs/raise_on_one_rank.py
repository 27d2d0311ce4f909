"""Rank 1 raises while rank 0 waits in a collective: the job must end, not hang."""
import numpy as np

import distsgd
from distsgd.distribute import MPIStrategy
from distsgd.optimizers import SGD

strategy = MPIStrategy()
with strategy.scope():
    var = distsgd.Variable(np.zeros(3), name="w")
    if strategy.rank == 1:
        raise RuntimeError("boom on rank 1")
    SGD(0.1).apply_gradients([(np.ones(3), var)])
print("unreachable on a multi-rank run", flush=True)
