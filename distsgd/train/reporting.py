"""What the training program prints: rank 0's progress bar, epoch lines, notes, metrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["Reporter", "launched_rank", "on_a_terminal", "oversubscription"]


def launched_rank() -> int:
    """This process's rank from the launcher's environment (before MPI starts), else 0."""
    for name in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def on_a_terminal() -> bool:
    """Whether rank 0's output ends on a terminal: its own stderr, or (under ``mpirun``,
    which forwards output through pipes) the stderr of the launcher that started it on
    this host. ``DISTSGD_PROGRESS=1`` or ``0`` decides instead."""
    forced = os.environ.get("DISTSGD_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    if sys.stderr.isatty():
        return True
    pid = os.getppid()
    for _ in range(4):  # rank <- hydra proxy <- mpiexec (<- a wrapper script)
        try:
            if os.readlink(f"/proc/{pid}/fd/2").startswith(("/dev/pts/", "/dev/tty")):
                return True
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def oversubscription() -> str | None:
    """A warning when this host runs more ranks than it has cores, else None."""
    local = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    if local and local.isdigit() and int(local) > cores:
        return (f"warning: {local} ranks share {cores} cores on this host (oversubscribed): "
                "every collective waits for a descheduled rank, so training can be about "
                f"10 times slower. Start at most {cores} ranks per host (NP={cores}).")
    return None


class Reporter:
    """Rank 0's progress bar (when its output ends on a terminal), epoch summaries, notes
    and metrics file; silent elsewhere."""

    def __init__(self, args: argparse.Namespace, rank: int, resuming: bool) -> None:
        self.rank = rank
        self.active = rank == 0 and not args.quiet
        self.bar_wanted = self.active and (args.progress if args.progress is not None
                                           else on_a_terminal())
        self.metrics = None
        if rank == 0 and args.metrics is not None:
            args.metrics.parent.mkdir(parents=True, exist_ok=True)
            self.metrics = open(args.metrics, "a" if resuming else "w")

    def say(self, text: str) -> None:
        """A line for the user (rank 0, unless --quiet)."""
        if self.active:
            print(text, flush=True)

    def note(self, text: str) -> None:
        """A note that matters even with --quiet (rank 0, on stderr)."""
        if self.rank == 0:
            print(f"distsgd: {text}", file=sys.stderr, flush=True)

    def progress(self, total: int, initial: int, epoch: int, epochs: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}",
                    disable=not self.bar_wanted, leave=False, unit="step",
                    file=sys.stderr, mininterval=0.2)

    def record(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
