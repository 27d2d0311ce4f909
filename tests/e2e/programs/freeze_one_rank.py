"""The last rank freezes (SIGSTOP) after one step; the others go on to the next."""
import os
import signal

import numpy as np

import distsgd
from distsgd.distribute import MPIStrategy
from distsgd.optimizers import SGD

strategy = MPIStrategy()
with strategy.scope():
    var = distsgd.Variable(np.zeros(3), name="w")
    opt = SGD(0.1)
    opt.apply_gradients([(np.ones(3), var)])
    if strategy.rank == strategy.num_replicas_in_sync - 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    opt.apply_gradients([(np.ones(3), var)])
    print(f"rank {strategy.rank} finished step 2", flush=True)
