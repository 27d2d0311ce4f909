"""Argument checks shared by the public constructors; each names the argument and the value."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_number"]


def check_number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                 what: str | None = None) -> float:
    """Return ``value`` if it is a real, finite number in ``[low, high]``.

    Raises:
        TypeError: not a real number (bools are refused too).
        ValueError: NaN, infinite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}; expected {what or 'a real number'}")
    if not math.isfinite(value) or not low <= value <= high:
        expected = what or (f"a finite number in [{low}, {high}]" if math.isfinite(high)
                            else f"a finite number >= {low}")
        raise ValueError(f"{name}={value!r}; expected {expected}")
    return value
