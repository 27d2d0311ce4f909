"""The one owner of a step's collectives: agree, plan, reduce, gather.

| synchronization   | aggregation         | gradient every rank applies            |
|-------------------|---------------------|----------------------------------------|
| AUTO / ON_WRITE   | NONE, SUM           | sum over ranks (tf.distribute's rule)  |
| AUTO / ON_WRITE   | MEAN                | mean over ranks                        |
| AUTO / ON_WRITE   | ONLY_FIRST_REPLICA  | rank 0's gradient                      |
| NONE              | any                 | the rank's own (never communicated)    |

One :meth:`GradientAggregator.reduce` call per step runs, on every rank in this order:

1. the operation check (:func:`~distsgd.distribute.comm.agree`): one tiny
   ``Allreduce(BOR)`` proving that every rank is at the same step with the same
   variables (names, shapes, dtypes, routes, transport), else the same
   :class:`MismatchError` on every rank; its flag says whether any rank has a
   ``None`` or sparse gradient;
2. only then, one ``Allreduce(BOR)`` of a byte per variable (bit 0 "dense here", bit
   1 "sparse here"): a gradient that is ``None`` on some ranks is sent as zeros there,
   never skipped (which would hang the others); mixed dense/sparse becomes dense;
3. at every ``replica_check_every_steps``-th step, the replica check;
4. ``consumer.prepare(plan)``, which may still raise (on every rank alike);
5. the dense chunks in plan order: each reduced into a buffer (``Allreduce`` through
   the transport for sum and mean, ``Bcast`` from rank 0 for first; in place in a
   :class:`~distsgd.GradientBuffer`, sent from where it lies when it is one piece of
   one gradient, packed first otherwise), then handed to ``consumer.consume`` while
   in cache, or kept;
6. sparse gradients gathered with ``Allgatherv``: values and indices concatenated in
   rank order, values divided by the world size for mean, rank 0's slices for first;
7. with ``check_finite``, one ``Allreduce(MAX)`` of a byte: whether any rank's
   aggregated gradients hold NaN or inf.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from distsgd.distribute.comm import MismatchError, agree, raise_if_stopping
from distsgd.distribute.invariant import TreeStep
from distsgd.distribute.layout import (
    DEFAULT_CHUNK_BYTES,
    Chunk,
    Route,
    bucket_source,
    route_of,
)
from distsgd.distribute.overlap import OverlappedReduction
from distsgd.distribute.plans import (
    LRU,
    Kind,
    Signature,
    StepPlan,
    build_plan,
    describe,
    kind_of,
    signature_of,
)
from distsgd.distribute.sparse import all_finite, gather_sparse
from distsgd.distribute.transport import ExactTransport, Transport, TreeTransport
from distsgd.indexed_slices import IndexedSlices, to_dense
from distsgd.kernels import ScratchBuffers
from distsgd.timeline import timeline
from distsgd.variables import Variable

__all__ = ["ChunkConsumer", "ChunkPart", "GradientAggregator", "Kind", "MismatchError",
           "Reduction", "StepPlan"]


#: A chunk that needs no message is read where its gradients lie, one update call per
#: piece, unless it has more than MAX_PIECES_IN_PLACE pieces of fewer than
#: MIN_MEAN_PIECE_ELEMENTS_IN_PLACE elements on average: then they are packed first, so
#: that one update call covers them all (a call costs about as much as updating a few
#: thousand elements; the copy, one more pass).
MAX_PIECES_IN_PLACE = 4
MIN_MEAN_PIECE_ELEMENTS_IN_PLACE = 16384


#: A reduced run of a chunk: ``(chunk, elements, offset of elements[0] in the chunk)``.
ChunkPart = tuple[Chunk, np.ndarray, int]


class ChunkConsumer(Protocol):
    """What takes a step's reduced dense gradients as they arrive (the optimizer's update)."""

    def prepare(self, plan: StepPlan) -> None:
        """Called once all ranks agreed on ``plan``, before any data moves; may raise."""

    def consume(self, parts: Sequence[ChunkPart]) -> None:
        """Use reduced gradient elements (valid only during the call)."""


@dataclass
class Reduction:
    """The outcome of one :meth:`GradientAggregator.reduce` call."""

    plan: StepPlan
    #: per position, the aggregated dense gradient (None: sparse, missing, or streamed)
    dense: list[np.ndarray | None]
    #: per sparse position, the aggregated (gathered) slices
    sparse: dict[int, IndexedSlices]
    #: whether every rank's aggregated gradients were finite (None: not checked)
    finite: bool | None = None


class GradientAggregator:
    """Aggregates the gradients of each step across ranks (see the module docstring).

    Args:
        communicator: a :class:`~distsgd.distribute.comm.Communicator`.
        fusion_threshold_bytes: dense bucket size cap; 0 sends one bucket per tensor.
        sparse_as_dense: densify :class:`IndexedSlices` before reducing.
        chunk_bytes: dense buckets travel in messages of at most this many bytes.
        transport: how summed buckets cross ranks (default: exactly).
        replica_check: ``replica_check(state)`` proves the replicas agree on ``state``
            (the strategy's ``check_replicas``); run before the data moves of every
            ``replica_check_every_steps``-th step (steps counted from 1; 0: never).
        position: ``position()`` names where in the data this rank is (the strategy's
            ``data_position``); it is part of each step's operation check.
        tree: world-size invariance: steps come as accumulators of this transport's M
            micro-batches, combined in the canonical tree (see ``invariant``).
    """

    def __init__(self, communicator: Any, *, fusion_threshold_bytes: int,
                 sparse_as_dense: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 transport: Transport | None = None,
                 replica_check: Callable[[Sequence[Variable]], Any] | None = None,
                 replica_check_every_steps: int = 0,
                 position: Callable[[], str | None] | None = None,
                 tree: TreeTransport | None = None) -> None:
        self.communicator = communicator
        self.fusion_threshold_bytes = int(fusion_threshold_bytes)
        self.sparse_as_dense = sparse_as_dense
        self.chunk_bytes = int(chunk_bytes)
        self.transport = transport or ExactTransport()
        self._exact = ExactTransport()
        self.replica_check = replica_check
        self.replica_check_every_steps = int(replica_check_every_steps)
        self.position = position
        #: the world-size-invariant combination (None: plain sums)
        self.tree = tree
        self._tree_step: TreeStep | None = None
        # bounded: programs that pass ever-new variable lists (or None patterns) must not
        # accumulate signatures or plans
        self._signatures = LRU()  # variable ids -> Signature
        self._last_signature: tuple[tuple[Variable, ...], Signature] | None = None
        self._plans = LRU()  # (signature, kinds here, kinds everywhere, distributed) -> plan
        self._results = ScratchBuffers()  # kept results: one array per dtype
        self._chunk_buffers = ScratchBuffers()  # streamed chunks
        self._overlap_buffers = ScratchBuffers()  # the communication thread's chunks
        # buffer -> its overlapped reduction (kept for the process's life: the reduction's
        # thread waits for the buffer's next step)
        self._overlaps: dict[Any, OverlappedReduction] = {}

    @property
    def distributed(self) -> bool:
        """Whether gradients cross ranks (more than one rank)."""
        return self.communicator.size > 1

    # --- the step ---------------------------------------------------------------------
    def reduce(self, grads: Sequence[Any], variables: Sequence[Variable], *, step: int,
               all_dense: bool = False, buffer: Any = None,
               consumer: ChunkConsumer | None = None, aggregate: bool = True,
               check_finite: bool = False,
               replica_state: Callable[[], Sequence[Variable]] | None = None,
               accumulator: Any = None) -> Reduction:
        """Aggregate one step's gradients across ranks (all of the module's steps).

        Args:
            grads: per variable, a dense array of its shape and dtype, an
                :class:`IndexedSlices`, or ``None`` (checked by the caller).
            variables: the variables, in the same order on every rank.
            step: the step count (the optimizer's ``iterations``): ranks at different
                steps raise :class:`MismatchError`; a stop request (SIGINT or SIGTERM on
                any rank) raises ``StopRequested`` on every rank, before anything moves.
            all_dense: the caller promises every gradient is a dense array.
            buffer: the :class:`~distsgd.GradientBuffer` whose arrays ``grads`` are, if
                any: its memory is reduced in place.
            consumer: takes the reduced dense chunks as they arrive (streaming); without
                one, the dense results are kept and returned.
            aggregate: False: the gradients are aggregated already; nothing crosses ranks.
            check_finite: agree on whether the aggregated gradients are all finite.
            replica_state: what the periodic replica check covers (called if it runs).
            accumulator: a :class:`~distsgd.GradientAccumulator` holding the step's
                micro-batches (then ``grads`` are ignored): summed, or, under a
                world-size-invariant strategy, combined in the canonical tree.

        Raises:
            MismatchError: ranks at different steps or with different variables.
            ValueError: from ``consumer.prepare`` (every rank alike); plain gradients to
                a world-size-invariant aggregator, or an incomplete accumulator (before
                any collective).
        """
        local_kinds = None
        if accumulator is not None:
            accumulator.check_complete()
            if accumulator.invariant:
                local_kinds = accumulator.local_kinds()
                grads = [accumulator.sparse_of(i) if k == Kind.SPARSE else None
                         for i, k in enumerate(local_kinds)]
            else:
                grads, buffer = accumulator.gradients()
                all_dense = buffer is not None
        elif self.tree is not None and aggregate:
            raise ValueError(
                "this strategy is world-size-invariant: pass the step's gradients as a "
                "distsgd.GradientAccumulator (one micro-batch at a time, with its index), or "
                "give minimize a list of (micro-batch index, loss) pairs; plain gradients "
                "depend on how the batch was split across ranks")
        overlapped = self._overlaps.get(buffer) if buffer is not None and aggregate and \
            accumulator is None else None
        if overlapped is not None:  # reduced during the backward pass: update locally
            with timeline.span("aggregate"):
                missing = overlapped.finish()
                self._check_replicas_if_due(step, replica_state)
            grads = [None if i in missing else g for i, g in enumerate(buffer.grads)]
            all_dense, aggregate = not missing, False
        self._tree_step = None
        try:
            return self._reduce(grads, variables, step, all_dense, buffer, consumer,
                                aggregate, check_finite, replica_state, local_kinds,
                                accumulator)
        finally:
            self._tree_step = None

    def _check_replicas_if_due(self, step: int,
                               replica_state: Callable[[], Sequence[Variable]] | None) -> None:
        """The periodic replica check, every ``replica_check_every_steps`` steps."""
        every = self.replica_check_every_steps
        if every and self.replica_check is not None and replica_state is not None \
                and (step + 1) % every == 0:
            self.replica_check(replica_state())

    def overlap(self, buffer: Any, step: Callable[[], int]) -> bool:
        """Reduce ``buffer``'s chunks as the backward pass marks its gradients ready
        (``buffer.ready(i)``; see ``overlap``); ``step()`` gives the coming step's count.
        Returns whether anything is overlapped (not in one process)."""
        if not self.distributed or self.tree is not None:
            return False
        if buffer not in self._overlaps:
            reduction = OverlappedReduction(self, buffer, step)
            self._overlaps[buffer] = reduction
            buffer.on_ready = reduction.ready
        return True

    def dense_plan(self, variables: Sequence[Variable]) -> StepPlan:
        """The plan of a step in which every rank has every gradient, dense."""
        key = (self._signature(variables), None, None, self.distributed)
        plan = self._plans.lookup(key)
        if plan is None:
            dense = bytes(len(variables) * [Kind.DENSE])
            plan = build_plan(variables, dense, dense, self.distributed,
                              fusion_threshold_bytes=self.fusion_threshold_bytes,
                              chunk_bytes=self.chunk_bytes, transport_of=self._transport_of)
            self._plans.store(key, plan)
        return plan

    def _reduce(self, grads: Sequence[Any], variables: Sequence[Variable], step: int,
                all_dense: bool, buffer: Any, consumer: ChunkConsumer | None, aggregate: bool,
                check_finite: bool, replica_state: Callable[[], Sequence[Variable]] | None,
                local_kinds: bytes | None, accumulator: Any) -> Reduction:
        with timeline.span("aggregate"):
            if self.sparse_as_dense and aggregate:
                grads = [to_dense(g.values, g.indices, v.shape)
                         if isinstance(g, IndexedSlices) else g
                         for g, v in zip(grads, variables, strict=True)]
                all_dense = all_dense or not any(g is None for g in grads)
            where = self.position() if self.position is not None else None
            label = f"gradient aggregation at step {step}" + (f" ({where})" if where else "")
            plan = self._agree(grads, variables, label, all_dense, aggregate, step, local_kinds)
            if aggregate:
                self._check_replicas_if_due(step, replica_state)
            if consumer is not None:
                consumer.prepare(plan)
            if local_kinds is not None:  # the accumulator's tree, densified leaves and all
                self._tree_step = TreeStep(accumulator, self.tree, self.communicator,
                                           self._chunk_buffers)
            elif plan.densify:
                grads = list(grads)
                for position in plan.densify:
                    grad = grads[position]
                    grads[position] = to_dense(grad.values, grad.indices,
                                               variables[position].shape)
            sources = self._bucket_sources(plan, buffer, grads)
            with self.communicator.busy(label):  # a failure from here on is not agreed
                if accumulator is not None:
                    accumulator.reset()  # (it holds its values until they are reduced)
                if consumer is None:
                    dense = self._reduce_kept(plan, grads, sources, label)
                else:
                    self._reduce_streamed(plan, grads, sources, label, consumer)
                    dense = [None] * len(grads)
                divisor = self.communicator.size if self.tree is None else \
                    self.tree.micro_batches  # MEAN: over the ranks, or the micro-batches
                sparse = gather_sparse(self.communicator, plan, grads, variables, label,
                                       divisor)
                finite = None
                if check_finite:
                    finite = all_finite(self.communicator, dense, sparse, label)
        return Reduction(plan, dense, sparse, finite)

    # --- agreement and plans ----------------------------------------------------------
    def _agree(self, grads: Sequence[Any], variables: Sequence[Variable], label: str,
               all_dense: bool, aggregate: bool, step: int,
               local_kinds: bytes | None = None) -> StepPlan:
        # a tree step plans every route even in one process (MEAN divides by M there too)
        distributed = (self.distributed or local_kinds is not None) and aggregate
        signature = self._signature(variables)
        local = local_kinds if local_kinds is not None else \
            None if all_dense else bytes(map(kind_of, grads))
        if local is not None and local.count(Kind.DENSE) == len(local):
            local = None  # stands for "all dense", the common case
        shared = local
        if distributed and self.distributed:
            crossing = [] if local is None else [local[i] for i in signature.crossing]
            flag = int(any(kind != Kind.DENSE for kind in crossing))
            flags = agree(self.communicator, label, signature.digest, flag, signature.items,
                          describe)
            raise_if_stopping(flags, label, step)
            if flags & 1 and signature.crossing:
                kinds = np.array(crossing or [Kind.DENSE] * len(signature.crossing),
                                 dtype=np.uint8)
                self.communicator.allreduce_(kinds, "bor", what=f"{label}: gradient kinds")
                merged = bytearray(local or bytes(len(variables) * [Kind.DENSE]))
                for position, kind in zip(signature.crossing, kinds.tolist(), strict=True):
                    merged[position] = kind
                shared = bytes(merged)
        if not self.distributed and aggregate:  # one process: a stop request still counts
            raise_if_stopping(agree(self.communicator, label), label, step)
        key = (signature, local, shared, distributed)
        plan = self._plans.lookup(key)
        if plan is None:
            dense = bytes(len(variables) * [Kind.DENSE])
            plan = build_plan(variables, local or dense, shared or dense, distributed,
                              fusion_threshold_bytes=self.fusion_threshold_bytes,
                              chunk_bytes=self.chunk_bytes, transport_of=self._transport_of)
            self._plans.store(key, plan)
        return plan

    def _signature(self, variables: Sequence[Variable]) -> Signature:
        last = self._last_signature
        if last is not None and last[0] is variables:  # the same tuple as the last step's
            return last[1]
        key = tuple(map(_unique_id, variables))
        cached = self._signatures.lookup(key)
        if cached is None:
            cached = signature_of(variables, self._route_label)
            self._signatures.store(key, cached)
        if isinstance(variables, tuple):  # (a GradientBuffer passes the same one each step)
            self._last_signature = (variables, cached)
        return cached

    def _transport_of(self, dtype: np.dtype, route: Route) -> Transport | None:
        if route in (Route.SUM, Route.MEAN):
            return self.transport if self.transport.carries(dtype, route) else self._exact
        return None

    def _route_label(self, var: Variable) -> str:
        """``var``'s route as the operation check compares it (with its transport)."""
        route = route_of(var)
        transport = self._transport_of(var.dtype, route)
        exact = transport is None or isinstance(transport, ExactTransport)
        label = route.value if exact else f"{route.value}, {transport.name}"
        if self.tree is not None:
            label += f", tree of {self.tree.micro_batches} micro-batches"
        return label

    def _bucket_sources(self, plan: StepPlan, buffer: Any,
                        grads: Sequence[Any]) -> list[np.ndarray | None] | None:
        """Per bucket, the buffer's memory holding exactly its gradients, or None."""
        if buffer is None or plan.densify:
            return None
        sources = plan.sources.get(buffer)
        if sources is None:
            sources = plan.sources[buffer] = [bucket_source(b, grads) for b in plan.buckets]
        return sources

    # --- dense gradients --------------------------------------------------------------
    def _reduce_chunk_(self, plan: StepPlan, chunk: Chunk, target: np.ndarray,
                       grads: Sequence[Any], in_place: bool, label: str) -> None:
        """Combine ``chunk`` across ranks into ``target`` (its gradients packed there first,
        or sent from where they lie when the chunk is one piece, unless ``in_place``)."""
        started = time.perf_counter()
        bucket = chunk.bucket
        what = _ChunkLabel(label, chunk)
        if self._tree_step is not None:  # the accumulator's pieces, not ``grads``
            self._tree_step.reduce_chunk_(chunk, target, what)
        else:
            send = None
            if not in_place:
                views = chunk.views(grads) if len(chunk.pieces) == 1 else None
                if views is None or bucket.route is Route.FIRST:
                    chunk.pack_(grads, target)
                else:
                    send = views[0][0]
            if bucket.route is Route.FIRST:
                self.communicator.bcast_(target, root=0, what=what)
            else:
                plan.transports[bucket.index].allreduce_sum_(self.communicator, target, send,
                                                             what)
                if bucket.route is Route.MEAN:
                    np.divide(target, self.communicator.size, out=target)
        if timeline.recording:
            timeline.event(f"bucket {bucket.index + 1}", "aggregate", started,
                           time.perf_counter(), elements=chunk.size)

    def _reduce_streamed(self, plan: StepPlan, grads: Sequence[Any],
                         sources: list[np.ndarray | None] | None, label: str,
                         consumer: ChunkConsumer) -> None:
        local: list[ChunkPart] = []
        for chunk in plan.chunks:
            bucket = chunk.bucket
            source = None if sources is None else sources[bucket.index]
            if source is not None:
                values = source[chunk.start:chunk.stop]
            elif self._tree_step is not None:
                values = self._chunk_buffers.get(bucket.dtype, chunk.size)
                self._reduce_chunk_(plan, chunk, values, grads, False, label)
                consumer.consume(((chunk, values, 0),))
                continue
            elif bucket.route is Route.LOCAL and (
                    len(chunk.pieces) <= MAX_PIECES_IN_PLACE
                    or chunk.size >= MIN_MEAN_PIECE_ELEMENTS_IN_PLACE * len(chunk.pieces)):
                local.extend((chunk, view, offset) for view, offset in chunk.views(grads))
                continue
            else:
                values = self._chunk_buffers.get(bucket.dtype, chunk.size)
            if bucket.route is Route.LOCAL:
                if source is None:  # many small gradients: one packed run, one update
                    chunk.pack_(grads, values)
                    consumer.consume(((chunk, values, 0),))
                else:
                    local.append((chunk, values, 0))
                continue
            self._reduce_chunk_(plan, chunk, values, grads, source is not None, label)
            consumer.consume(((chunk, values, 0),))
        if local:  # nothing to wait for: all at once (the consumer may split them)
            consumer.consume(local)

    def _reduce_kept(self, plan: StepPlan, grads: Sequence[Any],
                     sources: list[np.ndarray | None] | None,
                     label: str) -> list[np.ndarray | None]:
        result: list[np.ndarray | None] = [
            g if kind is Kind.DENSE else None for g, kind in zip(grads, plan.kinds, strict=True)]
        regions: dict[int, np.ndarray] = {}
        flats = {dtype: self._results.get(dtype, n) for dtype, n in plan.result_elements.items()}
        for bucket in plan.buckets:
            if bucket.route is Route.LOCAL and self._tree_step is None:
                continue  # the caller's gradients are the results
            source = None if sources is None else sources[bucket.index]
            start = plan.result_offsets[bucket.index]
            regions[bucket.index] = source if source is not None else \
                flats[bucket.dtype][start:start + bucket.size]
        for chunk in plan.chunks:
            region = regions.get(chunk.bucket.index)
            if region is not None:
                source = None if sources is None else sources[chunk.bucket.index]
                self._reduce_chunk_(plan, chunk, region[chunk.start:chunk.stop], grads,
                                    source is not None, label)
        for index, region in regions.items():
            bucket = plan.buckets[index]
            for entry, view in zip(bucket.entries, bucket.views(region), strict=True):
                result[entry.position] = view
        return result

class _ChunkLabel:
    """Names a chunk's collective in a timeout report (formatted only then)."""

    __slots__ = ("chunk", "label")

    def __init__(self, label: str, chunk: Chunk) -> None:
        self.label, self.chunk = label, chunk

    def __str__(self) -> str:
        bucket = self.chunk.bucket
        names = ", ".join(f"#{e.position}" for e in bucket.entries[:3])
        return (f"{self.label}: {bucket.route.value} {bucket.dtype.name} bucket "
                f"{bucket.index + 1} ({bucket.nbytes} bytes; variables {names}"
                f"{', ...' if len(bucket.entries) > 3 else ''}), elements "
                f"{self.chunk.start}-{self.chunk.stop}")


_unique_id = operator.attrgetter("_unique_id")
