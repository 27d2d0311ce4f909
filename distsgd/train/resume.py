"""``--resume``: which checkpoint, which settings win, and the restore.

Settings a checkpoint holds (learning rate, momentum, Nesterov, seed, global batch size)
come from it, unless given on the command line: then a hyperparameter given there wins,
with a note, and a different seed or batch size is refused (the data order would
change, so the run could not continue where it stopped).
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distsgd.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    inspect_checkpoint,
    load_checkpoint,
)
from distsgd.distribute import comm as comm_lib
from distsgd.train.reporting import Reporter

__all__ = ["Found", "find", "load"]

_HYPERPARAMETERS = {"learning_rate": "--learning-rate", "momentum": "--momentum",
                    "nesterov": "--nesterov"}
_DATA = {"seed": "--seed", "batch_size": "--batch-size"}


@dataclass
class Found:
    """The checkpoint to resume from: where to load, and what its manifest says."""

    directory: Path
    path: Path | None  # a checkpoint named on the command line (else the newest usable)
    world_size: int


def find(args: argparse.Namespace, strategy: Any, report: Reporter) -> Found | None:
    """The checkpoint ``--resume`` means (rank 0 reads, every rank gets the answer), and
    ``args`` updated with its settings; None to start from scratch (``--resume-if-exists``
    and nothing there).

    Raises:
        CheckpointError: nothing to resume from, or settings that cannot continue it.
    """
    location = args.resume if isinstance(args.resume, Path) else args.checkpoint_dir
    named = isinstance(args.resume, Path) and (location / "manifest.json").exists()
    mine = None
    if strategy.rank == 0:
        found = inspect_checkpoint(location)
        mine = None if found is None else (str(found[0]), found[1]["optimizer"]["config"],
                                           found[1]["state"], found[1]["world_size"])
    comm_lib.agree(strategy.communicator, "finding the checkpoint to resume")
    answer = strategy.communicator.allgather_object(mine)[0]
    if answer is None:
        if args.resume_if_exists:
            report.note(f"no checkpoint in {location}: starting from scratch")
            return None
        raise CheckpointError(f"--resume: no usable checkpoint in {location} (is the path "
                              "right? --resume-if-exists starts from scratch instead)")
    path, config, state, world_size = answer
    saved = {"learning_rate": config.get("learning_rate"), "momentum": config.get("momentum"),
             "nesterov": config.get("nesterov"), "seed": state.get("seed"),
             "batch_size": state.get("batch_size")}
    for name, option in _HYPERPARAMETERS.items():
        value = saved[name]
        if name not in args.explicit and value is not None:
            setattr(args, name, value)
        elif value is not None and _differs(getattr(args, name), value):
            report.note(f"{option} {getattr(args, name)} given: it replaces the checkpoint's "
                        f"{value:g}" if not isinstance(value, bool) else
                        f"{option if getattr(args, name) else '--no-nesterov'} given: it "
                        f"replaces the checkpoint's {value}")
    for name, option in (("micro_batches", "--micro-batches"),
                         ("world_size_invariant", "--world-size-invariant")):
        if name in state and state[name] != getattr(args, name):
            raise CheckpointError(f"{path} was made with {option} {state[name]}; this run "
                                  f"has {getattr(args, name)}: give the same setting to "
                                  "continue its trajectory")
    for name, option in _DATA.items():
        value = saved[name]
        if name not in args.explicit and value is not None:
            setattr(args, name, value)
        elif value is not None and getattr(args, name) != value:
            raise CheckpointError(f"{path} was made with {option} {value}; this run has "
                                  f"{option} {getattr(args, name)}, which would change the "
                                  "data order: give the same value, or leave it out")
    replicas = strategy.num_replicas_in_sync
    if world_size != replicas:
        report.note(f"resuming a checkpoint written by {world_size} rank"
                    f"{'s' if world_size > 1 else ''} at {replicas}: the global batch "
                    f"stays {args.batch_size}, split {replicas} ways")
    directory = Path(path).parent if named else location
    return Found(directory, Path(path) if named else None, world_size)


def load(found: Found, args: argparse.Namespace, variables: list[Any], optimizer: Any,
         strategy: Any, report: Reporter) -> int:
    """Restore the checkpoint; returns the global step to continue from."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        state = load_checkpoint(found.directory, variables=variables, optimizer=optimizer,
                                path=found.path)
    for warning in caught:
        if issubclass(warning.category, CheckpointWarning):
            report.note(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    for name in _HYPERPARAMETERS:  # the command line's wins (noted when it differed)
        if name in args.explicit and name != "nesterov":
            setattr(optimizer, name, getattr(args, name))
    step = state.get("global_step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{found.directory}: the checkpoint's state has no global step")
    report.say(f"resumed from step {step}")
    return step


def _differs(given: Any, saved: Any) -> bool:
    """Numbers compare as the float32 hyperparameters they become."""
    if isinstance(saved, bool) or isinstance(given, bool):
        return bool(given) != bool(saved)
    return bool(np.float32(given) != np.float32(saved))
