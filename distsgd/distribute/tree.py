"""The canonical summation tree over M micro-batches: the same float additions, in the
same order, whichever rank computed which micro-batch.

The tree over micro-batches ``[0, M)``: a node ``[lo, hi)`` of more than one leaf is
``left + right`` with ``left = [lo, split)``, ``right = [split, hi)`` and
``split = lo + 2**floor(log2(hi - lo - 1))`` (the largest power of two below its size),
so every left subtree is a complete, aligned binary tree. The world-size-invariant sum of
M gradients is the root's value; it depends on M only.

A rank holding micro-batches ``[a, b)`` (contiguous, as :func:`~distsgd.distribute.data.
replica_share` splits them) adds its leaves as they come with a :class:`TreeSum`: its
stack keeps the complete subtrees, so it ends holding the maximal nodes inside
``[a, b)`` (:func:`pieces`: at most about ``2 log2 M`` of them) and never more than
``log2 M + 1`` partial sums. The ranks then exchange those pieces, and the owner of each
shard of elements finishes the tree over all the pieces with another :class:`TreeSum`
(:class:`~distsgd.distribute.transport.TreeTransport`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["Node", "TreeSum", "pieces", "split"]

#: A node of the tree: the micro-batches ``[lo, hi)`` it sums.
Node = tuple[int, int]


def split(lo: int, hi: int) -> int:
    """Where node ``[lo, hi)`` (two leaves or more) splits into its two children."""
    return lo + (1 << ((hi - lo - 1).bit_length() - 1))


@functools.lru_cache(maxsize=64)
def _parents(micro_batches: int) -> dict[Node, tuple[Node, bool]]:
    """Every node's parent and whether it is the left child."""
    parents: dict[Node, tuple[Node, bool]] = {}
    todo = [(0, micro_batches)]
    while todo:
        lo, hi = todo.pop()
        if hi - lo > 1:
            middle = split(lo, hi)
            parents[(lo, middle)] = ((lo, hi), True)
            parents[(middle, hi)] = ((lo, hi), False)
            todo += [(lo, middle), (middle, hi)]
    return parents


@functools.lru_cache(maxsize=1024)
def pieces(first: int, stop: int, micro_batches: int) -> tuple[Node, ...]:
    """The maximal nodes of the tree over ``micro_batches`` inside ``[first, stop)``, in
    order: what a rank holding those micro-batches can sum by itself."""
    found: list[Node] = []

    def visit(lo: int, hi: int) -> None:
        if stop <= lo or hi <= first:
            return
        if first <= lo and hi <= stop:
            found.append((lo, hi))
            return
        middle = split(lo, hi)
        visit(lo, middle)
        visit(middle, hi)

    visit(0, micro_batches)
    return tuple(found)


class TreeSum:
    """Adds the values of tree nodes that arrive in order, as the tree does (a stack).

    Args:
        micro_batches: M, the number of leaves.
        buffer: ``buffer(depth)`` gives a 1-D work array for the stack entry at that
            depth (reused across steps: pushing copies into it); None: pushed arrays are
            kept and summed in place (they must be writable and not needed afterwards).
    """

    def __init__(self, micro_batches: int,
                 buffer: Callable[[int], np.ndarray] | None = None) -> None:
        self.micro_batches = micro_batches
        self._parents = _parents(micro_batches)
        self._buffer = buffer
        self.stack: list[tuple[Node, np.ndarray]] = []

    def push(self, node: Node, values: np.ndarray) -> None:
        """Add the value of ``node``, the next node in order."""
        if self._buffer is not None:
            target = self._buffer(len(self.stack))
            np.copyto(target, values)
            values = target
        self.stack.append((node, values))
        while len(self.stack) >= 2:
            (left, left_values), (right, right_values) = self.stack[-2:]
            parent = self._parents.get(left)
            if parent is None or not parent[1] or self._parents.get(right) != (parent[0], False):
                break
            np.add(left_values, right_values, out=left_values)
            self.stack[-2:] = [(parent[0], left_values)]

    def nodes(self) -> list[Node]:
        """The complete nodes held, in order."""
        return [node for node, _ in self.stack]

    def root(self) -> np.ndarray:
        """The sum of all M leaves (every leaf must have been pushed)."""
        if self.nodes() != [(0, self.micro_batches)]:
            raise ValueError(f"the tree over {self.micro_batches} micro-batches is not "
                             f"complete: it holds {self.nodes()}")
        return self.stack[0][1]

    def clear(self) -> None:
        self.stack.clear()
