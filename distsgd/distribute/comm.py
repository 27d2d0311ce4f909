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

import atexit
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from distsgd._validation import check_number
from distsgd.distribute import interrupts
from distsgd.distribute.interrupts import StopRequested
from distsgd.distribute.operations import MismatchError, agree, raise_if_stopping
from distsgd.distribute.watchdog import (
    FINISHED,
    WORKING,
    Watchdog,
    heartbeat_timeout_from_environment,
    report,
)

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "CollectiveTimeoutError",
    "Communicator",
    "MPICommunicator",
    "MismatchError",
    "SerialCommunicator",
    "StopRequested",
    "agree",
    "launched_by_mpi",
    "raise_if_stopping",
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
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                       "MV2_COMM_WORLD_SIZE", "HYDI_CONTROL_FD")


class CollectiveTimeoutError(RuntimeError):
    """A peer is frozen, dead, out of step, or absent past the deadline.

    Reported by the watchdog, which then aborts the job (see ``watchdog``).
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

    def begin(self, operation: str) -> None:
        """Count the operation that starts now (its sequence number) and name it."""

    def busy(self, operation: str) -> Any:
        """Context manager around an operation's work after its check: a failure there
        leaves the ranks out of step, so the next operation ends the job instead."""


class SerialCommunicator:
    """One process: collectives are identities and cost nothing."""

    rank = 0
    size = 1
    operations = 0

    def begin(self, operation: str) -> None:
        self.operations += 1

    @contextlib.contextmanager
    def busy(self, operation: str) -> Iterator[None]:
        yield

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

    Every collective is under the watchdog (``watchdog``): heartbeats name a frozen or
    dead peer within ``DISTSGD_HEARTBEAT_TIMEOUT`` seconds, and a wait for a live peer
    computing elsewhere ends after ``timeout_seconds``. With more than one rank, SIGINT and
    SIGTERM become stop requests (``interrupts``), an unhandled exception aborts the job
    (:func:`install_abort_on_exception`), and at the end of the program every rank checks
    that all the others finished too before MPI is finalized.

    Args:
        comm: an ``mpi4py.MPI.Comm``; ``None`` means ``MPI.COMM_WORLD``. It is
            ``Clone()``-d so distsgd's messages never mix with the caller's.
        timeout_seconds: how long a collective waits for a live peer that computes
            outside distsgd (default: ``DISTSGD_TIMEOUT``, else 600).
    """

    def __init__(self, comm: Any = None, *, timeout_seconds: float | None = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.timeout_seconds = (timeout_from_environment() if timeout_seconds is None else
                                check_number("timeout_seconds", timeout_seconds, low=1e-3))
        silence = heartbeat_timeout_from_environment()
        self._comm = (MPI.COMM_WORLD if comm is None else comm).Clone()
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self.collectives = 0
        #: operations begun (see :func:`agree`): the sequence number of the next one
        self.operations = 0
        self.operation = "start-up"  # the name of the current (or last) operation
        #: why this rank left an operation partway (its peers cannot continue), if it did
        self.broken: str | None = None
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "bor": MPI.BOR}
        self._in_place = MPI.IN_PLACE
        self._watchdog: Watchdog | None = None
        self._heartbeats = None
        self._finished = False
        if self.size > 1:
            if MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
                self._heartbeats = self._comm.Clone()
            self._watchdog = Watchdog(
                self._heartbeats, self.rank, self.size, timeout_seconds=self.timeout_seconds,
                silence_seconds=silence, place=lambda: (self.operations, self.operation),
                abort=self.abort)
            interrupts.install(abort=self._abort_on_signal)
            atexit.register(self.finish)  # after mpi4py's own: runs before MPI_Finalize

    # --- operations ---------------------------------------------------------------------
    def begin(self, operation: str) -> None:
        if self.broken is not None:
            report(self.rank, self.size, "error", f"{self.broken}; this rank left that "
                   f"operation partway, so its peers cannot continue with {operation}; "
                   "aborting the whole job (MPI_Abort)")
            self.abort(1)
        self.operations += 1
        self.operation = operation

    @contextlib.contextmanager
    def busy(self, operation: str) -> Iterator[None]:
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.state = WORKING
        try:
            yield
        except BaseException as error:
            if not getattr(error, "agreed", False):
                self.broken = f"{operation} failed on rank {self.rank}: " \
                              f"{type(error).__name__}: {error}"
            raise
        finally:
            if watchdog is not None and watchdog.state == WORKING:
                watchdog.state = 0  # computing

    def finish(self) -> None:
        """The end of the program (run at exit): every rank must have finished too.

        One operation check, "the end of its program", under the watchdog: a peer still
        training is named (out of step), a frozen one too; then the heartbeats stop.
        """
        if self._finished or self.size == 1:
            return
        self._finished = True
        try:
            agree(self, "the end of its program (it finished)")
        except MismatchError as error:
            report(self.rank, self.size, "MismatchError", f"{str(error).rstrip('.')}; "
                   "aborting the whole job (MPI_Abort)")
            self.abort(1)
        if self._watchdog is not None:
            self._watchdog.state = FINISHED
        self.free()

    # --- collectives --------------------------------------------------------------------
    def _guarded(self, call: Any, what: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the blocking MPI ``call`` with the watchdog armed (blocking calls are the
        fastest: MPICH's nonblocking collectives use slower schedules)."""
        self.collectives += 1
        watchdog = self._watchdog
        if watchdog is None:
            return call(*args, **kwargs)
        watchdog.arm(what or self.operation)
        try:
            return call(*args, **kwargs)
        finally:
            watchdog.disarm()

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

    def allgather_object(self, obj: Any, what: str = "") -> list[Any]:
        return self._guarded(self._comm.allgather, what, obj)

    def barrier(self, what: str = "") -> None:
        self._guarded(self._comm.Barrier, what or "barrier")

    # --- the end ------------------------------------------------------------------------
    def _abort_on_signal(self, signum: int) -> None:
        report(self.rank, self.size, "interrupted", f"second {signal.Signals(signum).name}: "
               "aborting the whole job now (MPI_Abort)")
        self.abort(128 + signum)

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
        """Stop the watchdog and release the cloned communicators (no checks at exit)."""
        self._finished = True
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        for comm in (self._heartbeats, self._comm):
            if comm is not None:
                comm.Free()
        self._heartbeats = self._comm = None
