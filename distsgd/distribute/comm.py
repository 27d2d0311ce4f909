"""The one communicator layer: every collective distsgd issues goes through here.

Two implementations of one interface: :class:`SerialCommunicator` (one process, no
mpi4py needed) and :class:`MPICommunicator` (a private ``Clone()`` of an mpi4py
communicator). Hot-path collectives take C-contiguous numpy buffers and work in
place (``Allreduce``/``Bcast``/``Allgatherv``); pickled calls are for metadata on
error paths only. Every wait is bounded by a deadline (``DISTSGD_TIMEOUT``
seconds): a watchdog thread turns a dead or stuck peer into a report naming the
operation and the ranks that did not arrive, then aborts the job, never a hang.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from distsgd._validation import check_number

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "CollectiveTimeoutError",
    "Communicator",
    "MPICommunicator",
    "MismatchError",
    "SerialCommunicator",
    "agree",
    "launched_by_mpi",
    "timeout_from_environment",
]

#: How long any collective may wait for its peers unless DISTSGD_TIMEOUT says otherwise.
DEFAULT_TIMEOUT_SECONDS = 600.0

#: Exit status of a job ended by the collective deadline.
TIMEOUT_EXIT_CODE = 3
#: After asking MPI to abort, a rank exits by itself at the latest this much later.
ABORT_GRACE_SECONDS = 3
#: Before asking MPI to abort, a rank waits this long for the launcher to forward its
#: last output (the launcher drops output in flight when it ends the job).
OUTPUT_FORWARD_SECONDS = 1.0
_REPORT_BYTES = 512
_REPORT_TAG = 7311
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                       "MV2_COMM_WORLD_SIZE", "HYDI_CONTROL_FD")


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within the deadline (a peer died, hung or diverged).

    Reported by the watchdog, which then aborts the job (see :class:`_Watchdog`).
    """


def launched_by_mpi() -> bool:
    """True when this process was started by an MPI launcher (mpirun, mpiexec, srun)."""
    return os.environ.get("DISTSGD_FORCE_MPI") == "1" or any(
        name in os.environ for name in _LAUNCHER_VARIABLES)


def timeout_from_environment() -> float:
    """``DISTSGD_TIMEOUT`` in seconds (a positive number), else the default."""
    raw = os.environ.get("DISTSGD_TIMEOUT")
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"DISTSGD_TIMEOUT={raw!r}; expected seconds (a number > 0)") from None
    if not value > 0:
        raise ValueError(f"DISTSGD_TIMEOUT={raw!r}; expected seconds (a number > 0)")
    return value


class Communicator(Protocol):
    """What the strategy and aggregation layers need from a communicator.

    ``what`` names the operation in a timeout report: a string, or any object whose
    ``str()`` does (formatted only if a report is made, so hot paths pay nothing).
    """

    rank: int
    size: int

    def allreduce_(self, buffer: np.ndarray, op: str = "sum", what: str = "",
                   send: np.ndarray | None = None) -> None:
        """Reduce ``buffer`` (1-D, contiguous) in place over all ranks: sum, max, min, bor;
        with ``send``, reduce ``send`` (the same size) into ``buffer`` instead."""

    def bcast_(self, buffer: np.ndarray, root: int = 0, what: str = "") -> None:
        """Overwrite ``buffer`` with ``root``'s contents."""

    def allgatherv(self, send: np.ndarray, counts: np.ndarray, what: str = "") -> np.ndarray:
        """Concatenate every rank's 1-D ``send`` in rank order (``counts[r]`` items each)."""

    def allgatherv_(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int],
                    what: str = "") -> None:
        """:meth:`allgatherv` into ``recv`` (``sum(counts)`` items)."""

    def alltoallv_(self, send: np.ndarray, send_counts: Sequence[int], recv: np.ndarray,
                   recv_counts: Sequence[int], what: str = "") -> None:
        """Personalized exchange: the ``send_counts[r]`` items of ``send`` after the first
        ``send_counts[:r]`` go to rank ``r``; ``recv`` receives ``recv_counts[q]`` items
        from each rank ``q``, in rank order."""

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj`` (metadata only, never gradients)."""

    def barrier(self, what: str = "") -> None:
        """Wait until every rank arrives."""

    def abort(self, code: int = 1) -> None:
        """End the whole job."""


class MismatchError(ValueError):
    """Ranks are at different operations, or passed different data to the same one."""


def agree(communicator: Any, operation: str, digest: bytes = b"", flags: int = 0,
          details: Sequence[Any] | None = None, describe: Any = repr,
          noun: str = "variable") -> int:
    """Begin a collective operation: prove every rank is at the same one, or raise on all.

    Every operation distsgd runs across ranks starts here, with one ``Allreduce(BOR)``
    of 8 hash bytes of (sequence number, ``operation``, ``digest``), their complement and
    one byte of ``flags``: hash and complement come back unchanged on every rank exactly
    when all ranks hashed the same. ``operation`` names the operation and its step
    (``"gradient aggregation at step 12"``); ``digest`` identifies its data (variable
    names, shapes, dtypes, policies), whose items ``details`` are only gathered when
    the ranks disagree, to name the first one that differs (a ``noun``).

    Returns:
        The OR of every rank's ``flags``.

    Raises:
        MismatchError: on every rank alike, saying which rank is at which operation and
            sequence number, or which ranks hold which item.
    """
    sequence = communicator.operations
    communicator.operations = sequence + 1
    if communicator.size == 1:
        return flags
    mine = np.frombuffer(hashlib.blake2b(f"{sequence}|{operation}|".encode() + digest,
                                         digest_size=8).digest(), dtype=np.uint8)
    header = np.concatenate([mine, ~mine, np.array([flags], dtype=np.uint8)])
    communicator.allreduce_(header, "bor", what=f"{operation}: operation check")
    if np.array_equal(header[:8], mine) and np.array_equal(header[8:16], ~mine):
        return int(header[16])
    everyone = communicator.allgather_object(
        (sequence, operation, list(details) if details is not None else None))
    raise MismatchError(_mismatch_message(everyone, describe, noun))


def _mismatch_message(everyone: list[tuple[int, str, list[Any] | None]],
                      describe: Any, noun: str) -> str:
    places = [(sequence, operation) for sequence, operation, _ in everyone]
    if len(set(places)) > 1:
        groups: dict[tuple[int, str], list[int]] = {}
        for rank, place in enumerate(places):
            groups.setdefault(place, []).append(rank)
        where = "; ".join(f"{_ranks(ranks)} at {operation} (operation #{sequence})"
                          for (sequence, operation), ranks in groups.items())
        return (f"ranks are out of step: {where}. Every rank must run the same distsgd "
                "operations in the same order (the same number of steps, and the same "
                "reduce/barrier/checkpoint calls).")
    signatures = [details or [] for _, _, details in everyone]
    operation = everyone[0][1]
    length = max(len(s) for s in signatures)
    i = next(i for i in range(length)
             if len({repr(s[i]) if i < len(s) else None for s in signatures}) > 1)
    groups_held: dict[str, list[int]] = {}
    for rank, signature in enumerate(signatures):
        held = describe(signature[i]) if i < len(signature) else "(nothing)"
        groups_held.setdefault(held, []).append(rank)
    held_text = "; ".join(f"{_ranks(ranks)}: {held}" for held, ranks in groups_held.items())
    counts = sorted({len(s) for s in signatures})
    extra = "" if len(counts) == 1 else \
        f" (ranks pass {' vs '.join(map(str, counts))} {noun}s)"
    return (f"ranks disagree in {operation} at {noun} #{i}{extra}: {held_text}. Every rank "
            "must pass the same variables, in the same order, with the same shapes, dtypes "
            "and policies.")


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


class SerialCommunicator:
    """One process: collectives are identities and cost nothing."""

    rank = 0
    size = 1
    operations = 0

    def allreduce_(self, buffer: np.ndarray, op: str = "sum", what: str = "",
                   send: np.ndarray | None = None) -> None:
        _check_op(op)
        if send is not None:
            np.copyto(buffer, send)

    def bcast_(self, buffer: np.ndarray, root: int = 0, what: str = "") -> None:
        _check_root(root, 1)

    def allgatherv(self, send: np.ndarray, counts: np.ndarray, what: str = "") -> np.ndarray:
        return send.copy()

    def allgatherv_(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int],
                    what: str = "") -> None:
        np.copyto(recv, send)

    def alltoallv_(self, send: np.ndarray, send_counts: Sequence[int], recv: np.ndarray,
                   recv_counts: Sequence[int], what: str = "") -> None:
        np.copyto(recv, send)

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self, what: str = "") -> None:
        pass

    def abort(self, code: int = 1) -> None:
        sys.exit(code)


_OPS = ("sum", "max", "min", "bor")


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"op={op!r}; expected one of {_OPS}")


def _check_root(root: int, size: int) -> None:
    if isinstance(root, bool) or not isinstance(root, int | np.integer) or not 0 <= root < size:
        raise ValueError(f"root={root!r}; expected a rank in [0, {size})")


class MPICommunicator:
    """Collectives over a private duplicate of an mpi4py communicator.

    Args:
        comm: an ``mpi4py.MPI.Comm``; ``None`` means ``MPI.COMM_WORLD``. It is
            ``Clone()``-d so distsgd's messages never mix with the caller's.
        timeout_seconds: deadline of every collective (default: ``DISTSGD_TIMEOUT``).
    """

    def __init__(self, comm: Any = None, *, timeout_seconds: float | None = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.timeout_seconds = (timeout_from_environment() if timeout_seconds is None else
                                check_number("timeout_seconds", timeout_seconds, low=1e-3))
        self._comm = (MPI.COMM_WORLD if comm is None else comm).Clone()
        self._diagnostics = self._comm.Clone()  # only used after a deadline passed
        self._watchdog: _Watchdog | None = None
        self._lowest_live_rank = 0
        self.collectives = 0
        #: operations begun (see :func:`agree`): the sequence number of the next one
        self.operations = 0
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "bor": MPI.BOR}
        self._in_place = MPI.IN_PLACE

    def _guarded(self, call: Any, what: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the blocking MPI ``call`` with the watchdog armed (blocking calls are the
        fastest: MPICH's nonblocking collectives use slower schedules)."""
        self.collectives += 1
        watchdog = self._watchdog or self._start_watchdog()
        watchdog.arm(what or "collective")
        try:
            return call(*args, **kwargs)
        finally:
            watchdog.disarm()

    def _start_watchdog(self) -> _Watchdog:
        self._watchdog = _Watchdog(self)
        return self._watchdog

    def _diagnose(self, what: Any) -> str:
        """Ask every peer, on a separate communicator, where it is; name the silent ones.

        Ranks stuck in the same deadline answer within the grace period; a rank that
        died, hangs, or computes outside distsgd does not.
        """
        what = str(what)
        grace = min(5.0, self.timeout_seconds)
        mine = np.zeros(_REPORT_BYTES, dtype=np.uint8)
        text = f"collective #{self.collectives}: {what}".encode()[:_REPORT_BYTES - 1]
        mine[:len(text)] = np.frombuffer(text, dtype=np.uint8)
        peers = [r for r in range(self.size) if r != self.rank]
        inbox = {r: np.zeros(_REPORT_BYTES, dtype=np.uint8) for r in peers}
        receives = {r: self._diagnostics.Irecv(inbox[r], source=r, tag=_REPORT_TAG)
                    for r in peers}
        for r in peers:
            self._diagnostics.Isend(mine, dest=r, tag=_REPORT_TAG)
        stop = time.monotonic() + grace
        while time.monotonic() < stop and not all(q.Test() for q in receives.values()):
            time.sleep(0.01)
        silent = [r for r in peers if not receives[r].Test()]
        same, elsewhere = [], []
        for r in peers:
            if r in silent:
                continue
            report = bytes(inbox[r]).rstrip(b"\0").decode(errors="replace")
            (same if report == text.decode(errors="replace") else elsewhere).append(
                f"rank {r} is at {report}")
        parts = [f"rank {self.rank}/{self.size}: {what} did not complete within "
                 f"{self.timeout_seconds:g} s (DISTSGD_TIMEOUT)"]
        if silent:
            parts.append(f"rank{'s' if len(silent) > 1 else ''} "
                         f"{', '.join(map(str, silent))} did not arrive (dead, hung, or busy "
                         "outside distsgd)")
        if elsewhere:
            parts.append("; ".join(elsewhere) + " (a different program path)")
        if same:
            parts.append(f"ranks {', '.join(s.split()[1] for s in same)} wait here too")
        self._lowest_live_rank = min([self.rank] + [r for r in peers if r not in silent])
        return "; ".join(parts)

    def allreduce_(self, buffer: np.ndarray, op: str = "sum", what: Any = "",
                   send: np.ndarray | None = None) -> None:
        mpi_op = self._ops.get(op)
        if mpi_op is None:
            _check_op(op)
        self._guarded(self._comm.Allreduce,
                      what, self._in_place if send is None else send.reshape(-1),
                      buffer.reshape(-1), op=mpi_op)

    def bcast_(self, buffer: np.ndarray, root: int = 0, what: str = "") -> None:
        _check_root(root, self.size)
        self._guarded(self._comm.Bcast, what, buffer.reshape(-1), root=root)

    def allgatherv(self, send: np.ndarray, counts: np.ndarray, what: str = "") -> np.ndarray:
        counts = np.asarray(counts, dtype=np.int64)
        received = np.empty(int(counts.sum()), dtype=send.dtype)
        self.allgatherv_(send, received, counts.tolist(), what)
        return received

    def allgatherv_(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int],
                    what: str = "") -> None:
        # lists: mpi4py reads a 2-tuple as (counts, displacements)
        self._guarded(self._comm.Allgatherv, what, send.reshape(-1), [recv, list(counts)])

    def alltoallv_(self, send: np.ndarray, send_counts: Sequence[int], recv: np.ndarray,
                   recv_counts: Sequence[int], what: str = "") -> None:
        self._guarded(self._comm.Alltoallv, what, [send, list(send_counts)],
                      [recv, list(recv_counts)])

    def allgather_object(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def barrier(self, what: str = "") -> None:
        self._guarded(self._comm.Barrier, what or "barrier")

    def abort(self, code: int = 1) -> None:
        # On COMM_WORLD, MPICH asks the launcher to end every process. On any other
        # communicator (our clones) it only sends the peers a message that they act on
        # when they next enter MPI: a rank busy outside MPI would outlive the job, and
        # later hang in MPI_Finalize. MPI_Abort must reach the launcher, which may be
        # unreachable (a cut link), and it blocks holding the GIL: a kernel alarm
        # (SIGALRM's default action ends the process) makes sure this rank is gone a
        # few seconds later regardless.
        # The launcher kills at once and drops output still in flight: what this rank
        # just printed (the reason) gets a moment to be forwarded first.
        time.sleep(OUTPUT_FORWARD_SECONDS)
        signal.alarm(int(ABORT_GRACE_SECONDS))
        self._MPI.COMM_WORLD.Abort(code)

    def free(self) -> None:
        """Release the cloned communicators."""
        self._diagnostics.Free()
        self._comm.Free()


class _Watchdog:
    """A daemon thread that ends the job when a collective outlives the deadline.

    ``arm``/``disarm`` are two attribute writes per collective. When a collective has
    been waiting longer than the deadline, the watchdog asks the peers where they are
    (on the separate diagnostics communicator), prints a
    ``CollectiveTimeoutError`` naming the operation and the ranks that did not
    arrive, and aborts the whole job: a collective cannot be cancelled, so no rank
    could continue anyway.
    """

    def __init__(self, communicator: MPICommunicator) -> None:
        self.communicator = communicator
        self._armed: tuple[float, str] | None = None
        self._thread = threading.Thread(target=self._run, name="distsgd-watchdog",
                                        daemon=True)
        self._thread.start()

    def arm(self, what: Any) -> None:
        self._armed = (time.monotonic(), what)

    def disarm(self) -> None:
        self._armed = None

    def _run(self) -> None:
        timeout = self.communicator.timeout_seconds
        period = min(0.5, timeout / 4)
        while True:
            time.sleep(period)
            armed = self._armed
            if armed is None or time.monotonic() - armed[0] <= timeout:
                continue
            message = self.communicator._diagnose(armed[1])
            if self._armed is not armed:  # it completed while we asked around
                continue
            sys.stderr.write(f"[distsgd rank {self.communicator.rank}/"
                             f"{self.communicator.size}] {CollectiveTimeoutError.__name__}: "
                             f"{message}; aborting the whole job (MPI_Abort)\n")
            sys.stderr.flush()
            if self.communicator._lowest_live_rank != self.communicator.rank:
                time.sleep(2.0)  # let the lowest live rank report too, then end the job
            self.communicator.abort(TIMEOUT_EXIT_CODE)


def install_abort_on_exception(communicator: Any) -> None:
    """Make an unhandled exception on this rank print its traceback and abort the job.

    Without this, the other ranks would wait forever in their next collective.
    Installed once per process (idempotent), as ``python -m mpi4py`` does.
    """
    if getattr(sys.excepthook, "_distsgd_abort", False):
        return
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt | SystemExit):
            previous(kind, value, tb)
            return
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(f"[distsgd rank {communicator.rank}/{communicator.size}] unhandled "
                         f"exception; aborting the whole job (MPI_Abort)\n{text}")
        sys.stderr.flush()
        communicator.abort(1)

    excepthook._distsgd_abort = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
