"""Aggregation overlapped with the backward pass (DDP's design), for a GradientBuffer.

The backward pass produces gradients from the last layer to the first and says so:
``buffer.ready(i)`` once variable ``i``'s gradient is complete. A chunk of the buffer
(:mod:`~distsgd.distribute.layout`) whose gradients are all ready is reduced at once,
while the backward pass goes on; ``apply_gradients(buffer)`` then waits for what is
left and updates from the reduced buffer, with no further data crossing ranks.

Collectives run in one fixed order on every rank: the operation check (the step and
the variables), the chunks in reverse order (the order gradients become ready), and a
byte per variable saying which ranks had a gradient. A chunk waits for the chunks after
it, so a rank whose backward pass finishes gradients in another order still issues the
same sequence. The chunks and sums are those of the plain step, so the results are
bitwise equal to it.

The reductions run on a communication thread (blocking calls; ``MPI_THREAD_MULTIPLE``),
which measured better here than non-blocking calls progressed from the backward pass
(``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from distsgd.distribute.comm import agree, raise_if_stopping
from distsgd.distribute.layout import Chunk, Route, bucket_source
from distsgd.distribute.plans import describe

__all__ = ["OverlappedReduction"]


class OverlappedReduction:
    """The overlapped aggregation of one :class:`~distsgd.GradientBuffer`, step after step.

    Args:
        aggregator: the :class:`~distsgd.distribute.GradientAggregator` of its variables.
        buffer: the buffer the backward pass writes.
        step: ``step()`` gives the step count of the step to come (the optimizer's).
    """

    def __init__(self, aggregator: Any, buffer: Any, step: Callable[[], int]) -> None:
        self.aggregator, self.buffer, self.step = aggregator, buffer, step
        variables = buffer.variables
        self.plan = aggregator.dense_plan(variables)
        self.signature = aggregator._signature(variables)
        grads = buffer.grads
        sources = [bucket_source(b, grads) for b in self.plan.buckets]
        self.order = [c for c in reversed(self.plan.chunks) if c.bucket.route is not Route.LOCAL]
        self._sources = {c.index: sources[c.bucket.index] for c in self.order}
        self._chunks_of: dict[int, list[int]] = {}
        for k, chunk in enumerate(self.order):
            for piece in chunk.pieces:
                self._chunks_of.setdefault(piece.position, []).append(k)
        self._tasks: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="distsgd-overlap", daemon=True)
        self._thread.start()
        self._active = False

    # --- the backward pass's side -------------------------------------------------------
    def ready(self, position: int) -> None:
        """Variable ``position``'s gradient is complete in the buffer."""
        if not self._active:
            self._begin()
        if position in self._ready:
            return
        self._ready.add(position)
        for k in self._chunks_of.get(position, ()):
            self._waiting[k].discard(position)
        while self._launched < len(self.order) and not self._waiting[self._launched]:
            self._tasks.put(("chunk", self.order[self._launched]))
            self._launched += 1

    def finish(self) -> frozenset[int]:
        """Reduce what is left and wait; returns the positions no rank had a gradient for.

        Raises what the communication thread raised (a mismatch, a stop request, ...).
        """
        if not self._active:
            self._begin()
        for position in range(len(self.buffer.variables)):
            self.ready(position)
        present = np.array([0 if i in self.buffer.missing else 1
                            for i in self.signature.crossing], dtype=np.uint8)
        self._tasks.put(("kinds", present))
        self._tasks.join()
        self._active = False
        error, self._error = self._error, None
        if error is not None:
            raise error
        missing = {i for i, here in zip(self.signature.crossing, present.tolist(), strict=True)
                   if not here}
        crossing = set(self.signature.crossing)
        missing |= {i for i in self.buffer.missing if i not in crossing}  # rank-local
        return frozenset(missing)

    def _begin(self) -> None:
        self._active = True
        self._ready: set[int] = set()
        self._waiting = [{p.position for p in c.pieces} for c in self.order]
        self._launched = 0
        self._error: BaseException | None = None
        step = self.step()
        self._label = f"overlapped gradient aggregation at step {step}"
        self._tasks.put(("begin", step))

    # --- the communication thread -------------------------------------------------------
    def _work(self) -> None:
        while True:
            kind, argument = self._tasks.get()
            try:
                if self._error is None:
                    self._run(kind, argument)
            except BaseException as error:  # raised in the main thread by finish()
                self._error = error
            finally:
                self._tasks.task_done()

    def _run(self, kind: str, argument: Any) -> None:
        aggregator, communicator = self.aggregator, self.aggregator.communicator
        label = self._label
        if kind == "begin":
            flags = agree(communicator, label, self.signature.digest, 0,
                          self.signature.items, describe)
            raise_if_stopping(flags, label, argument)
            return
        with communicator.busy(label):
            if kind == "kinds":
                if len(argument):
                    communicator.allreduce_(argument, "bor", what=f"{label}: gradient kinds")
                return
            chunk: Chunk = argument
            source = self._sources[chunk.index]
            grads = self.buffer.grads
            if source is not None:  # in place in the buffer
                aggregator._reduce_chunk_(self.plan, chunk, source[chunk.start:chunk.stop],
                                          grads, True, label)
            else:  # packed, reduced, written back
                values = aggregator._overlap_buffers.get(chunk.bucket.dtype, chunk.size)
                aggregator._reduce_chunk_(self.plan, chunk, values, grads, False, label)
                chunk.unpack_(values, grads)
