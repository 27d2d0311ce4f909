"""Bucket plans: dense gradients packed into a few flat buffers, in a fixed order.

A plan depends only on the ordered list of (dtype, route, shape) entries, which the
signature check proves identical on every rank, so every rank issues the same
collectives on the same buffers. Buffers are allocated once per plan and reused.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DEFAULT_FUSION_THRESHOLD_BYTES", "Bucket", "plan_buckets"]

#: Dense gradients are fused into buffers of up to this many bytes (64 MiB); 0 disables
#: fusion (one buffer per tensor). A tensor larger than the threshold gets its own bucket.
DEFAULT_FUSION_THRESHOLD_BYTES = 64 << 20


@dataclass(frozen=True)
class Entry:
    """One dense gradient: its position in the call, dtype, route and shape."""

    position: int
    dtype: np.dtype
    route: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class Bucket:
    """A flat buffer holding several gradients of one dtype and route back to back."""

    dtype: np.dtype
    route: str
    entries: list[Entry]
    offsets: list[int]
    buffer: np.ndarray = field(repr=False)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def views(self) -> list[np.ndarray]:
        """Each entry's gradient as a view into the buffer, in the entry's shape."""
        return [self.buffer[offset:offset + entry.size].reshape(entry.shape)
                for entry, offset in zip(self.entries, self.offsets, strict=True)]

    def pack_(self, grads: Sequence[np.ndarray | None], start: int = 0,
              stop: int | None = None) -> None:
        """Copy the gradients' elements that fall in ``buffer[start:stop]`` (``None``
        is sent as zeros). Packing chunk by chunk, right before each chunk is reduced,
        keeps the copied data in cache for the reduction."""
        stop = self.buffer.size if stop is None else stop
        first = max(0, bisect.bisect_right(self.offsets, start) - 1)
        for index in range(first, len(self.entries)):
            offset = self.offsets[index]
            if offset >= stop:
                break
            entry = self.entries[index]
            low, high = max(start, offset), min(stop, offset + entry.size)
            if low >= high:
                continue
            part = self.buffer[low:high]
            grad = grads[entry.position]
            if grad is None:
                part.fill(0)
            else:
                np.copyto(part, grad.reshape(-1)[low - offset:high - offset])


def plan_buckets(entries: Sequence[Entry], fusion_threshold_bytes: int) -> list[Bucket]:
    """Group ``entries`` by (dtype, route) in order, each bucket up to the threshold.

    Buckets are returned in the order of their first entry.
    """
    open_buckets: dict[tuple[np.dtype, str], list[Entry]] = {}
    closed: list[list[Entry]] = []
    for entry in entries:
        key = (entry.dtype, entry.route)
        current = open_buckets.get(key)
        if current is not None:
            used = sum(e.size for e in current) * entry.dtype.itemsize
            if fusion_threshold_bytes <= 0 or \
                    used + entry.size * entry.dtype.itemsize > fusion_threshold_bytes:
                closed.append(current)
                current = None
        if current is None:
            current = open_buckets[key] = []
        current.append(entry)
    closed.extend(open_buckets.values())
    closed.sort(key=lambda bucket: bucket[0].position)
    buckets = []
    for group in closed:
        offsets = np.concatenate([[0], np.cumsum([e.size for e in group])]).astype(int)
        buckets.append(Bucket(group[0].dtype, group[0].route, group, offsets[:-1].tolist(),
                              np.zeros(int(offsets[-1]), dtype=group[0].dtype)))
    return buckets
