"""Steps with a long computation (argv[1] seconds) between them, on every rank: a slow
step is not a dead rank; a second Ctrl-C during it still ends the job at once."""
import sys
import time

import numpy as np

import distsgd
from distsgd.distribute import MPIStrategy
from distsgd.optimizers import SGD

seconds = float(sys.argv[1])
strategy = MPIStrategy()
with strategy.scope():
    w = distsgd.Variable(np.zeros(3), name="w")
    opt = SGD(0.1)
for step in range(int(sys.argv[2])):
    opt.apply_gradients([(np.ones(3), w)])
    print(f"rank {strategy.rank} step {step}", flush=True)
    if strategy.rank == 0:
        time.sleep(seconds)  # rank 0 computes; the others wait for it in the next step
print(f"rank {strategy.rank} done", flush=True)
