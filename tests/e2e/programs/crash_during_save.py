"""Save checkpoint 1, then die (os._exit) halfway through writing checkpoint 2."""
import os
import sys

import numpy as np

import distsgd
from distsgd import checkpoint
from distsgd.checkpoint import save as checkpoint_save
from distsgd.optimizers import SGD

directory, stage = sys.argv[1], sys.argv[2]
w = distsgd.Variable(np.arange(6.0).reshape(2, 3), name="w")
opt = SGD(0.1, momentum=0.9)
opt.apply_gradients([(np.ones((2, 3)), w)])
checkpoint.save_checkpoint(directory, step=1, variables=[w], optimizer=opt)
opt.apply_gradients([(np.ones((2, 3)), w)])
real_write = checkpoint_save._write_synced
real_commit = checkpoint_save._commit


def dying_write(path, arrays):
    with open(path, "wb") as handle:
        handle.write(b"PK\x03\x04 half a file")
    os._exit(9)


def dying_commit(root, temporary, name, keep):
    (root / name).mkdir()  # the rename has not happened yet; a stray directory appears
    os._exit(9)


if stage == "arrays":
    checkpoint_save._write_synced = dying_write
elif stage == "commit":
    checkpoint_save._commit = dying_commit
checkpoint.save_checkpoint(directory, step=2, variables=[w], optimizer=opt)
