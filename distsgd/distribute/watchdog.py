"""Bounded waits: heartbeats between ranks, deadlines on collectives, and the job's abort.

Every rank of an :class:`~distsgd.distribute.comm.MPICommunicator` runs one daemon
thread, the watchdog. Once a second (``HEARTBEAT_SECONDS``) it sends every peer a small
status on a communicator of its own: where this rank is (the sequence number and name
of its operation), whether it waits in a collective, computes, or finished its program.
Because the thread runs whatever the main thread does (MPI calls release the GIL), the
heartbeats say "alive" through a long forward pass or a big checkpoint write, and
their absence means the process is frozen (SIGSTOP), dead, or cut off. Then:

- a peer silent for ``DISTSGD_HEARTBEAT_TIMEOUT`` seconds (default 10) is named as
  frozen or dead, and the job is aborted, whatever this rank is doing;
- while this rank waits in a collective: when every rank waits in a collective or has
  finished its program, but not all in the same operation, no rank can move again: they
  are named as out of step within a few seconds. A peer that computes outside distsgd is
  waited for up to ``DISTSGD_TIMEOUT`` seconds (default 600), then named as alive but
  absent; a peer inside a distsgd operation (writing a checkpoint, say) is waited for as
  long as it is alive.

A report is one line on stderr (``[distsgd rank r/P] CollectiveTimeoutError: ...``),
then ``MPI_Abort`` ends every process: a blocked collective cannot be cancelled.
Without ``MPI_THREAD_MULTIPLE`` there are no heartbeats, only the deadline.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from distsgd.distribute import interrupts

__all__ = ["DEFAULT_HEARTBEAT_TIMEOUT_SECONDS", "HEARTBEAT_SECONDS", "Watchdog",
           "heartbeat_timeout_from_environment", "install_abort_on_exception", "report"]

#: Seconds between a rank's heartbeats.
HEARTBEAT_SECONDS = 1.0
#: A peer silent for this long is frozen or dead (``DISTSGD_HEARTBEAT_TIMEOUT``).
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 10.0
#: A peer waiting in another operation for this long is out of step (heartbeats agree).
OUT_OF_STEP_SECONDS = 2.5
#: A status older than this is not evidence of where a peer is: a peer frozen just after
#: a heartbeat keeps reporting an operation it has left (shorter than OUT_OF_STEP_SECONDS,
#: so a frozen peer is never called out of step; it is named silent instead).
FRESH_STATUS_SECONDS = 2.0
_TICK = 0.1
_TAG = 7312
_STATUS_BYTES = 256
_INTS = 4  # sequence, state, pid, signal
# states a heartbeat reports
COMPUTING, WAITING, WORKING, FINISHED, FAILED, STOPPED = 0, 1, 2, 3, 4, 5
_STATE_NAMES = {COMPUTING: "computing outside distsgd", WAITING: "waiting in",
                WORKING: "working in", FINISHED: "finished its program",
                FAILED: "failing with", STOPPED: "stopped its heartbeats"}
#: At the end, how long to wait for the peers' last heartbeats.
STOP_SECONDS = 2.0


def heartbeat_timeout_from_environment() -> float:
    """``DISTSGD_HEARTBEAT_TIMEOUT`` in seconds (a number >= 2), else the default."""
    raw = os.environ.get("DISTSGD_HEARTBEAT_TIMEOUT", "")
    if raw == "":
        return DEFAULT_HEARTBEAT_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 2:
        raise ValueError(f"DISTSGD_HEARTBEAT_TIMEOUT={raw!r}; expected seconds (a number "
                         ">= 2)")
    return value


def report(rank: int, size: int, kind: str, message: str) -> None:
    """One line on stderr, flushed."""
    sys.stderr.write(f"[distsgd rank {rank}/{size}] {kind}: {message}\n")
    sys.stderr.flush()


class Watchdog:
    """The heartbeat and deadline thread of one communicator (see the module).

    Args:
        comm: an mpi4py communicator of its own (a clone), for heartbeats only;
            None: no heartbeats (no ``MPI_THREAD_MULTIPLE``), deadlines only.
        rank, size: this rank and the world size.
        timeout_seconds: how long to wait for a peer computing outside distsgd.
        silence_seconds: how long a peer may send no heartbeat.
        place: ``place()`` gives this rank's (sequence number, operation name).
        abort: ``abort(exit_code)`` ends the job.
    """

    def __init__(self, comm: Any, rank: int, size: int, *, timeout_seconds: float,
                 silence_seconds: float, place: Callable[[], tuple[int, str]],
                 abort: Callable[[int], None]) -> None:
        self._comm, self.rank, self.size = comm, rank, size
        self.timeout_seconds, self.silence_seconds = timeout_seconds, silence_seconds
        self._place, self._abort = place, abort
        self._armed: tuple[float, Any] | None = None
        self.state = COMPUTING  # or WORKING inside an operation, FINISHED at the end
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._beat_now = threading.Event()
        self._failure: str | None = None
        self._peers = [r for r in range(size) if r != rank]
        started = time.monotonic()
        self._last_seen = dict.fromkeys(self._peers, started)
        self._status: dict[int, tuple[int, int, int, int, str]] = {}
        self._stuck_since: float | None = None
        self._receives: dict[int, tuple[np.ndarray, Any]] = {}
        self._sends: list[tuple[Any, np.ndarray]] = []
        if comm is not None:
            for peer in self._peers:
                self._post_receive(peer)
        self._thread = threading.Thread(target=self._run, name="distsgd-watchdog",
                                        daemon=True)
        self._thread.start()

    # --- the main thread's side ---------------------------------------------------------
    def arm(self, what: Any) -> None:
        """A collective on ``what`` begins (two attribute writes: the hot path)."""
        self._armed = (time.monotonic(), what)

    def disarm(self) -> None:
        self._armed = None

    def fail(self, summary: str, wait_seconds: float = 0.6) -> int:
        """This rank fails with ``summary`` (an unhandled exception): tell the peers at
        once, listen a moment, and return the lowest rank that failed meanwhile (it
        prints the traceback; the others one line)."""
        self._failure = summary
        self.state = FAILED
        self._beat_now.set()
        time.sleep(wait_seconds if self._comm is not None else 0)
        failed = [p for p, s in list(self._status.items()) if s[1] == FAILED]
        return min([self.rank, *failed])

    def stop(self) -> None:
        """End the thread, then end the heartbeat streams (all ranks finished).

        Each rank sends every peer a last status, STOPPED, and takes the peers' statuses
        until each one's STOPPED arrives (messages from one sender do not overtake each
        other), so no heartbeat is left unreceived at ``MPI_Finalize`` (UCX warns about
        those on stdout). A peer that sends no STOPPED within STOP_SECONDS is given up on.
        """
        self._stop.set()
        self._stopped.wait(2.0)
        if self._comm is not None:
            self.state = STOPPED
            self._beat(always=True)
            # a peer's STOPPED may have come in before this thread stopped
            open_streams = {p for p in self._peers
                            if self._status.get(p, (0, COMPUTING))[1] != STOPPED}
            deadline = time.monotonic() + STOP_SECONDS
            while open_streams and time.monotonic() < deadline:
                self._listen(time.monotonic(), until_stopped=open_streams)
                time.sleep(0.002)
            for request, _ in self._sends:
                while not _done(request) and time.monotonic() < deadline:
                    time.sleep(0.002)
        for _, request in self._receives.values():
            try:
                request.Cancel()
                request.Wait()
            except Exception:  # nothing to do about a peer now
                pass
        for request, _ in self._sends:
            try:
                request.Test()
            except Exception:
                pass
        self._receives.clear()
        self._sends.clear()

    # --- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                wakeup = interrupts.wakeup_fd()
                if wakeup is not None:
                    select.select([wakeup], [], [], _TICK)
                    interrupts.drain()
                else:
                    time.sleep(_TICK)
                now = time.monotonic()
                if self._comm is not None:
                    if now >= next_beat or self._beat_now.is_set():
                        self._beat_now.clear()
                        self._beat()
                        next_beat = now + HEARTBEAT_SECONDS
                    self._listen(now)
                problem = self._check(now)
                if problem is not None:
                    kind, message, code = problem
                    report(self.rank, self.size, kind, message + "; aborting the whole job "
                           "(MPI_Abort)")
                    self._abort(code)
                    return
        finally:
            self._stopped.set()

    def _status_bytes(self) -> np.ndarray:
        sequence, operation = self._place()
        state = self.state if self.state in (FAILED, STOPPED) else \
            WAITING if self._armed is not None else self.state
        if self._failure is not None:
            operation = self._failure
        buffer = np.zeros(_STATUS_BYTES, dtype=np.uint8)
        buffer[:8 * _INTS].view(np.int64)[:] = [sequence, state, os.getpid(),
                                                interrupts.pending() or 0]
        text = str(operation).encode(errors="replace")[:_STATUS_BYTES - 8 * _INTS]
        buffer[8 * _INTS:8 * _INTS + len(text)] = np.frombuffer(text, dtype=np.uint8)
        return buffer

    def _beat(self, always: bool = False) -> None:
        status = self._status_bytes()
        self._sends = [(r, b) for r, b in self._sends if not _done(r)]
        if len(self._sends) > 8 * len(self._peers) and not always:
            return  # peers not reading: do not pile up
        for peer in self._peers:
            copy = status.copy()
            self._sends.append((self._comm.Isend(copy, dest=peer, tag=_TAG), copy))

    def _post_receive(self, peer: int) -> None:
        buffer = np.zeros(_STATUS_BYTES, dtype=np.uint8)
        self._receives[peer] = (buffer, self._comm.Irecv(buffer, source=peer, tag=_TAG))

    def _listen(self, now: float, until_stopped: set[int] | None = None) -> None:
        """Take every status that arrived (the last one counts). ``until_stopped``: the
        peers whose stream is still open; one whose STOPPED arrives leaves the set, and no
        receive is posted for it again."""
        for peer in self._peers if until_stopped is None else list(until_stopped):
            buffer, request = self._receives[peer]
            while _done(request):
                ints = buffer[:8 * _INTS].view(np.int64).tolist()
                label = bytes(buffer[8 * _INTS:]).rstrip(b"\0").decode(errors="replace")
                self._status[peer] = (*ints, label)
                self._last_seen[peer] = now
                if until_stopped is not None and ints[1] == STOPPED:
                    until_stopped.discard(peer)
                    del self._receives[peer]
                    break
                self._post_receive(peer)
                buffer, request = self._receives[peer]

    def _where(self, peer: int) -> str:
        status = self._status.get(peer)
        if status is None:
            return f"rank {peer} has sent no status yet"
        sequence, state, pid, _, label = status
        name = _STATE_NAMES.get(state, "?")
        if state in (WAITING, WORKING, FAILED):
            return f"rank {peer} (pid {pid}) is {name} {label} (operation #{sequence})"
        return f"rank {peer} (pid {pid}) is {name}, after operation #{sequence}"

    def _check(self, now: float) -> tuple[str, str, int] | None:
        """What to report, if anything: (kind, message, exit code)."""
        from distsgd.distribute.comm import TIMEOUT_EXIT_CODE

        if self._comm is not None:
            silent = [p for p in self._peers if now - self._last_seen[p] > self.silence_seconds]
            if silent and self.state != FAILED:
                others = "; ".join(self._where(p) for p in self._peers if p not in silent)
                names = ", ".join(map(str, silent))
                waiting = self._armed
                here = f"this rank waits in {waiting[1]}" if waiting is not None else \
                    "this rank is computing"
                return ("CollectiveTimeoutError",
                        f"rank{'s' if len(silent) > 1 else ''} {names} sent no heartbeat for "
                        f"{self.silence_seconds:g} s (DISTSGD_HEARTBEAT_TIMEOUT): frozen "
                        f"(SIGSTOP), dead, or cut off; {here}"
                        + (f"; {others}" if others else ""), TIMEOUT_EXIT_CODE)
        armed = self._armed
        if armed is None or self.state == FAILED:
            self._stuck_since = None
            return None
        waited = now - armed[0]
        sequence, _ = self._place()
        statuses = {p: self._status.get(p) for p in self._peers}
        here = f"rank {self.rank}/{self.size} waits in {armed[1]} (operation #{sequence})"
        # everyone waits in a collective or has finished, but not in the same operation,
        # as fresh heartbeats have said for OUT_OF_STEP_SECONDS: no rank can move again
        # (if one still computes, it may be what the others wait for)
        stuck = self._comm is not None and all(
            s is not None and s[1] in (WAITING, FINISHED)
            and now - self._last_seen[p] <= FRESH_STATUS_SECONDS
            for p, s in statuses.items()) and \
            any(s[1] == FINISHED or s[0] != sequence for s in statuses.values())
        if not stuck:
            self._stuck_since = None
        elif self._stuck_since is None:
            self._stuck_since = now
        # ... within this one collective: a rank that re-arms every millisecond, with
        # statuses of peers that are a few steps behind it, is moving, not stuck
        if stuck and now - max(self._stuck_since, armed[0]) > OUT_OF_STEP_SECONDS:
            details = "; ".join(self._where(p) for p, s in statuses.items()
                                if s[1] == FINISHED or s[0] != sequence)
            return ("CollectiveTimeoutError",
                    f"ranks are out of step: {here}; {details}. Every rank must run the same "
                    "distsgd operations in the same order (the same number of steps)",
                    TIMEOUT_EXIT_CODE)
        absent = [p for p, s in statuses.items() if s is None or s[1] == COMPUTING]
        if waited > self.timeout_seconds and (absent or self._comm is None):
            if self._comm is None:
                detail = "some rank did not arrive (heartbeats unavailable)"
            else:
                detail = "; ".join(
                    f"{self._where(p)}: alive, but not arriving" if now - self._last_seen[p]
                    < 3 * HEARTBEAT_SECONDS else f"{self._where(p)}: no heartbeat for "
                    f"{now - self._last_seen[p]:.0f} s" for p in absent)
            return ("CollectiveTimeoutError",
                    f"{here}, which did not complete within {self.timeout_seconds:g} s "
                    f"(DISTSGD_TIMEOUT); {detail}", TIMEOUT_EXIT_CODE)
        return None


def _done(request: Any) -> bool:
    try:
        return bool(request.Test())
    except Exception:  # a failed peer: its heartbeats stop, which is reported
        return False


def install_abort_on_exception(communicator: Any) -> None:
    """Make an unhandled exception on this rank print its traceback and abort the job.

    Without this, the other ranks would wait forever in their next collective. When
    several ranks fail at once (the same error everywhere), the lowest of them prints
    the traceback and the others one line. Installed once per process (idempotent), as
    ``python -m mpi4py`` does.
    """
    if getattr(sys.excepthook, "_distsgd_abort", False):
        return
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt | SystemExit):
            previous(kind, value, tb)
            return
        summary = f"{kind.__name__}: {value}"
        watchdog = getattr(communicator, "_watchdog", None)
        first = watchdog.fail(summary) if watchdog is not None else communicator.rank
        if first == communicator.rank:
            text = "".join(traceback.format_exception(kind, value, tb))
            report(communicator.rank, communicator.size, "unhandled exception",
                   f"aborting the whole job (MPI_Abort)\n{text}".rstrip())
        else:
            report(communicator.rank, communicator.size, "unhandled exception",
                   f"{summary} (rank {first} failed too and prints the traceback)")
        communicator.abort(1)

    excepthook._distsgd_abort = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
