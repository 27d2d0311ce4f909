"""A process-wide span recorder: per-phase time totals always, trace events on demand.

Spans are named phases of a step (``compute``, ``aggregate``, ``update``, one per
bucket, ...). Totals per name are always kept (two ``perf_counter`` calls a span);
with :meth:`Timeline.start_recording` each span is also kept as a Chrome
trace-event (``ph: "X"``), viewable in Perfetto or chrome://tracing.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

__all__ = ["Timeline", "timeline"]


class Timeline:
    """Accumulates span durations and, while recording, trace events."""

    def __init__(self) -> None:
        self.totals_seconds: defaultdict[str, float] = defaultdict(float)
        self.events: list[dict[str, Any]] = []
        self.recording = False
        self._origin = time.perf_counter()

    def start_recording(self) -> None:
        """Keep a trace event for every span from now on."""
        self.recording = True

    def reset_totals(self) -> dict[str, float]:
        """Return the totals so far and start again from zero."""
        totals = dict(self.totals_seconds)
        self.totals_seconds.clear()
        return totals

    @contextlib.contextmanager
    def span(self, name: str, category: str = "step", **args: Any) -> Iterator[None]:
        """Time the enclosed block under ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.totals_seconds[name] += end - start
            if self.recording:
                self.events.append({"name": name, "cat": category, "ph": "X",
                                    "ts": (start - self._origin) * 1e6,
                                    "dur": (end - start) * 1e6, "args": args})

    def trace_events(self, pid: int) -> list[dict[str, Any]]:
        """The recorded events, attributed to process ``pid`` (the rank)."""
        return [{**event, "pid": pid, "tid": 0} for event in self.events]


#: The recorder distsgd's optimizer and aggregation layer report to.
timeline = Timeline()
