"""Distribution strategies: the default (one process) and, later, MPI."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["get_strategy"]

_local = threading.local()


class _DefaultStrategy:
    """One replica, no communication: gradients pass through unchanged."""

    num_replicas_in_sync = 1
    rank = 0

    def _aggregate_gradients(self, pairs: list[tuple[Any, Any]]) -> list[Any]:
        return [grad for grad, _ in pairs]


_DEFAULT = _DefaultStrategy()


def get_strategy() -> Any:
    """The strategy whose ``scope()`` is active in this thread, else the default one."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _DEFAULT
