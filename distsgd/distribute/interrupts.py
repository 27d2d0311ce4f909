"""Ctrl-C and SIGTERM: stop every rank at the next step boundary, by agreement.

The first SIGINT or SIGTERM that reaches a process only records a *stop request*; the
operation check that starts every distsgd operation carries it to every rank (one bit
of its flag byte), and the next ``apply_gradients`` raises :class:`StopRequested` on
every rank at once, before it changes anything. So the signal may reach one rank only
(``kill -INT``) or all of them (``mpirun`` forwards Ctrl-C and SIGTERM to every rank, as
Slurm's ``scancel`` and ``docker stop`` do): every rank stops at the same step, with the
state of the same step, and can checkpoint it. A second signal ends the job at once.

While a rank's main thread is blocked in MPI, Python cannot run a signal handler; the
handler's C half still writes the signal number to a wakeup pipe, which the watchdog
thread reads (:func:`drain`), so a request is recorded, and a second signal aborts, even
then.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["STOP_FLAGS", "StopRequested", "clear", "drain", "install", "pending",
           "stop_flag", "wakeup_fd"]

#: The operation check's flag bits that carry a stop request, by signal.
STOP_FLAGS = {signal.SIGINT: 1 << 6, signal.SIGTERM: 1 << 7}
_SIGNALS = tuple(STOP_FLAGS)

_lock = threading.Lock()
_received: list[int] = []
_state: dict[str, Any] = {"installed": False, "wakeup": None, "abort": None}


class StopRequested(KeyboardInterrupt):
    """A stop was requested on some rank (SIGINT or SIGTERM); every rank raises this at
    the same step boundary, before the step changes anything.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        step: the step count (``iterations``) of the step that did not run.
    """

    agreed = True  # raised alike on every rank

    def __init__(self, message: str, signal_name: str, step: int | None) -> None:
        super().__init__(message)
        self.signal_name, self.step = signal_name, step


def install(abort: Callable[[int], None] | None = None) -> bool:
    """Turn SIGINT and SIGTERM into stop requests (idempotent; main thread only).

    ``abort(signum)`` ends the job on a second signal; without it (one process) the
    second SIGINT is a plain ``KeyboardInterrupt``. Handlers the program installed itself
    are kept: then nothing is installed and False is returned.
    """
    if abort is not None:
        _state["abort"] = abort
    if _state["installed"]:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    current = [signal.getsignal(s) for s in _SIGNALS]
    if any(h not in (signal.default_int_handler, signal.SIG_DFL, None) for h in current):
        return False
    for signum in _SIGNALS:
        signal.signal(signum, _handler)
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:
        previous = -1
    if previous != -1:  # someone else's (asyncio): keep theirs, count in the handler
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
    else:
        _state["wakeup"] = read
    _state["installed"] = True
    return True


def wakeup_fd() -> int | None:
    """The pipe the watchdog thread waits on for signals (None: the handler counts)."""
    return _state["wakeup"]


def _handler(signum: int, frame: Any) -> None:
    if _state["wakeup"] is None:  # no pipe: count here
        _note(signum)
    else:  # the pipe has the signal (the watchdog thread may have read it already)
        drain()


def drain() -> None:
    """Record the signals written to the wakeup pipe (the watchdog thread calls this)."""
    fd = _state["wakeup"]
    if fd is None:
        return
    try:
        data = os.read(fd, 64)
    except (BlockingIOError, InterruptedError):
        return
    for signum in data:
        if signum in _SIGNALS:
            _note(signum)


def _note(signum: int) -> None:
    with _lock:
        first = not _received
        _received.append(signum)
    if first:
        return
    abort = _state["abort"]
    if abort is not None:
        abort(signum)
    elif threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")


def pending() -> int | None:
    """The signal of the stop request not carried out yet, if any."""
    with _lock:
        return _received[0] if _received else None


def stop_flag() -> int:
    """The operation check's flag bit for this process's pending stop request (0: none)."""
    signum = pending()
    return 0 if signum is None else STOP_FLAGS[signum]


def clear() -> None:
    """Forget the stop request (once it was carried out, e.g. after a checkpoint)."""
    with _lock:
        _received.clear()
