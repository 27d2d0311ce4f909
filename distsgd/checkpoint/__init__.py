"""Collective, atomic checkpoints of variables, optimizer state and training position.

Layout of ``DIR``::

    DIR/.lock                   held (flock) by rank 0 of the job that writes here
    DIR/latest                  name of the newest complete checkpoint (atomic replace)
    DIR/ckpt-0000000120/        one complete checkpoint
        arrays.npz              replicated variables, iterations, slots (written by rank 0)
        rank-00001.npz          rank-local (synchronization=NONE) state, one file per rank
        manifest.json           format, step, world size, every array's name, shape,
                                dtype and policy, the optimizer's class and config, the
                                caller's state, the sha256 of every file above, and the
                                sha256 of the manifest itself

A checkpoint is written into a hidden temporary directory, flushed to disk, then renamed
into place, and only then does ``latest`` move: a process killed at any moment leaves
the previous checkpoint loadable, and the next save removes the debris. While a job
writes to a directory it holds its lock: a second job gets a clear error at once.

Loading reads only regular files inside the directory (no symlinks, FIFOs or devices;
``latest`` must name a ``ckpt-*`` directory there), verifies the manifest's checksum and
types, every file's checksum, and that every array has the name, shape and dtype the
manifest and the model expect, all before allocating more than the model's own sizes and
before anything is assigned. Rank 0 reads the replicated state and broadcasts it, so
hosts need not share a filesystem for it; an error is raised on every rank alike.
"""

from distsgd.checkpoint.directory import prepare_checkpoint_directory
from distsgd.checkpoint.files import (
    FORMAT,
    CheckpointError,
    CheckpointWarning,
    inspect_checkpoint,
    latest_checkpoint,
)
from distsgd.checkpoint.load import load_checkpoint
from distsgd.checkpoint.save import save_checkpoint
from distsgd.distribute.replicas import state_digest

__all__ = ["FORMAT", "CheckpointError", "CheckpointWarning", "inspect_checkpoint",
           "latest_checkpoint", "load_checkpoint", "prepare_checkpoint_directory",
           "save_checkpoint", "state_digest"]
