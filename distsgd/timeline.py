"""A process-wide span recorder: per-phase time totals always, trace events on demand.

Spans are named parts of a step (``compute``, ``aggregate``, ``bucket 2``, ``update``,
...), each counted in a phase (by default its name): the training program reports
the share of the ``compute``, ``aggregate`` and ``update`` phases. Spans nest; a
phase is credited with a span's own time, without the spans inside it (a chunk's
reduction inside the update counts as aggregation). Totals per phase are always kept
(two ``perf_counter`` calls a span); with
:meth:`Timeline.start_recording` each span is also kept as a Chrome trace-event
(``ph: "X"``, one track per thread), viewable in Perfetto or chrome://tracing.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

__all__ = ["Timeline", "timeline"]


class _Span:
    __slots__ = ("_args", "_inner", "_name", "_outer", "_owner", "_phase", "_start")

    def __init__(self, owner: Timeline, name: str, phase: str, args: dict[str, Any]) -> None:
        self._owner, self._name, self._phase, self._args = owner, name, phase, args

    def __enter__(self) -> None:
        local = self._owner._local
        self._outer = getattr(local, "span", None)
        local.span = self
        self._inner = 0.0
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        end = time.perf_counter()
        self._owner._local.span = self._outer
        if self._outer is not None:
            self._outer._inner += end - self._start
        self._owner._add(self._name, self._phase, self._start, end, self._inner, self._args)


class Timeline:
    """Accumulates span durations per phase and, while recording, trace events."""

    def __init__(self) -> None:
        self.totals_seconds: defaultdict[str, float] = defaultdict(float)
        self.events: list[dict[str, Any]] = []
        self.recording = False
        self._origin = time.perf_counter()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._threads: dict[int, int] = {}

    def start_recording(self) -> None:
        """Keep a trace event for every span from now on."""
        self.recording = True

    def reset_totals(self) -> dict[str, float]:
        """Return the totals so far and start again from zero."""
        with self._lock:
            totals = dict(self.totals_seconds)
            self.totals_seconds.clear()
        return totals

    def span(self, name: str, phase: str | None = None, **args: Any) -> _Span:
        """A context manager timing the enclosed block as ``name``, counted in ``phase``
        (default: ``name``); ``args`` go into the trace event."""
        return _Span(self, name, phase or name, args)

    def credit(self, phase: str, seconds: float) -> None:
        """Count ``seconds`` measured by the caller in ``phase`` (and not in the span
        around it): for hot loops that time their parts with bare ``perf_counter``."""
        outer = getattr(self._local, "span", None)
        if outer is not None:
            outer._inner += seconds
        with self._lock:
            self.totals_seconds[phase] += seconds

    def event(self, name: str, phase: str, start: float, end: float, **args: Any) -> None:
        """Keep a trace event timed by the caller (while recording; no totals)."""
        with self._lock:
            thread = self._threads.setdefault(threading.get_ident(), len(self._threads))
            self.events.append({"name": name, "cat": phase, "ph": "X", "tid": thread,
                                "ts": (start - self._origin) * 1e6,
                                "dur": (end - start) * 1e6, "args": args})

    def _add(self, name: str, phase: str, start: float, end: float, inner: float,
             args: dict[str, Any]) -> None:
        with self._lock:
            self.totals_seconds[phase] += end - start - inner
        if self.recording:
            self.event(name, phase, start, end, **args)

    def trace_events(self, pid: int) -> list[dict[str, Any]]:
        """The recorded events, attributed to process ``pid`` (the rank)."""
        return [{**event, "pid": pid} for event in self.events]


#: The recorder distsgd's optimizer and aggregation layer report to.
timeline = Timeline()
