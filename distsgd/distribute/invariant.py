"""One world-size-invariant step: the dense chunks of a GradientAccumulator's tree.

Where a plain step reduces each chunk of the caller's gradients with ``Allreduce``, an
invariant step reduces the chunk of each of the rank's tree pieces with the
:class:`~distsgd.distribute.transport.TreeTransport`: ``MEAN`` divides by the number of
micro-batches M (not of ranks), ``ONLY_FIRST_REPLICA`` broadcasts micro-batch 0's
gradient (held by rank 0), and rank-local variables sum their own pieces.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distsgd.distribute.layout import Chunk, Route
from distsgd.distribute.transport import TreeTransport
from distsgd.kernels import ScratchBuffers

__all__ = ["TreeStep"]


class TreeStep:
    """The pieces of one step's accumulator, ready to be reduced chunk by chunk."""

    def __init__(self, accumulator: Any, transport: TreeTransport, communicator: Any,
                 scratch: ScratchBuffers) -> None:
        self.transport, self.communicator, self._scratch = transport, communicator, scratch
        self.micro_batches = transport.micro_batches
        pieces = accumulator.pieces()
        count = len(next(iter(pieces.values()), []))
        self.piece_views = [accumulator.views({d: flats[j] for d, flats in pieces.items()})
                            for j in range(count)]
        first = accumulator.first_flats()
        self.first_views = None if first is None else accumulator.views(first)

    def reduce_chunk_(self, chunk: Chunk, target: np.ndarray, what: Any) -> None:
        """``chunk``'s elements of the step's tree root (per its route) into ``target``."""
        route = chunk.bucket.route
        if route is Route.FIRST:
            if self.first_views is not None:
                chunk.pack_(self.first_views, target)
            else:
                target.fill(0)
            self.communicator.bcast_(target, root=0, what=what)
            return
        values = []
        for j, views in enumerate(self.piece_views):
            packed = self._scratch.get(chunk.bucket.dtype, chunk.size, 32 + j)
            chunk.pack_(views, packed)
            values.append(packed)
        if route is Route.LOCAL:  # this rank's own: its pieces, in order
            np.copyto(target, values[0])
            for piece in values[1:]:
                np.add(target, piece, out=target)
            return
        self.transport.reduce_(self.communicator, values, target, what)
        if route is Route.MEAN:
            np.divide(target, self.micro_batches, out=target)
