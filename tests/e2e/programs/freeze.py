"""A rank freezes (SIGSTOP) at argv[1]: "checkpoint" (rank 0, while it writes the
checkpoint's arrays), "exit" (the last rank, after its last step); nobody may hang."""
import os
import signal
import sys

import numpy as np

import distsgd
from distsgd import checkpoint
from distsgd.checkpoint import save as checkpoint_save
from distsgd.distribute import MPIStrategy
from distsgd.optimizers import SGD

where, directory = sys.argv[1], sys.argv[2]
strategy = MPIStrategy()
with strategy.scope():
    w = distsgd.Variable(np.zeros(1000), name="w")
    opt = SGD(0.1, momentum=0.9)
for _ in range(3):
    opt.apply_gradients([(np.ones(1000), w)])
if where == "checkpoint" and strategy.rank == 0:
    real = checkpoint_save._write_synced

    def frozen_write(path, arrays):
        os.kill(os.getpid(), signal.SIGSTOP)
        real(path, arrays)

    checkpoint_save._write_synced = frozen_write
if where == "exit" and strategy.rank == strategy.num_replicas_in_sync - 1:
    print(f"rank {strategy.rank} freezes at exit", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
checkpoint.save_checkpoint(directory, step=3, variables=[w], optimizer=opt)
print(f"rank {strategy.rank} done", flush=True)
