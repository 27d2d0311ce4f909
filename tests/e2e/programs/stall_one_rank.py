"""After one step the last rank stalls (argv[1]: "sleep" keeps it busy elsewhere for 30 s,
"freeze" stops it with SIGSTOP); the others go on to the next step and must not finish."""
import os
import signal
import sys
import time

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
        if sys.argv[1] == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(30)
        print(f"rank {strategy.rank} woke up", flush=True)
    else:
        opt.apply_gradients([(np.ones(3), var)])
        print(f"rank {strategy.rank} finished step 2", flush=True)
