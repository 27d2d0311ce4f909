"""Cross-rank gradient aggregation, per each variable's synchronization and aggregation.

| synchronization   | aggregation         | gradient every rank applies            |
|-------------------|---------------------|----------------------------------------|
| AUTO / ON_WRITE   | NONE, SUM           | sum over ranks (tf.distribute's rule)  |
| AUTO / ON_WRITE   | MEAN                | mean over ranks                        |
| AUTO / ON_WRITE   | ONLY_FIRST_REPLICA  | rank 0's gradient                      |
| NONE              | any                 | the rank's own (never communicated)    |

Every call, in the same order on every rank:

1. one tiny ``Allreduce(BOR)`` of a 64-bit signature hash, its complement and a flag
   byte: the hash comes back unchanged on all ranks only if every rank passes the
   same variables (names, shapes, dtypes, policies) in the same order; otherwise
   every rank raises the same :class:`MismatchError` naming the variable and the
   ranks. The flag says whether any rank has a ``None`` or sparse gradient;
2. only then, one ``Allreduce(BOR)`` of a byte per variable: bit 0 "dense here",
   bit 1 "sparse here", so a variable whose gradient is ``None`` on some ranks is
   sent as zeros (or an empty slice) there instead of being skipped, which would
   hang the others; mixed dense/sparse becomes dense, as in TF;
3. dense gradients, per-(dtype, route) buckets cut into chunks, each reduced into a
   buffer (``Allreduce`` for sum/mean, sent from where it lies when it is one piece,
   packed first otherwise; ``Bcast`` from rank 0 for first), then either kept
   (:meth:`aggregate`) or handed straight to the optimizer's update while in cache
   (streaming);
4. sparse gradients gathered with ``Allgatherv``: values and indices concatenated in
   rank order, values divided by the world size for MEAN, rank 0's slices for first.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distsgd.distribute.comm import DEFAULT_CHUNK_BYTES
from distsgd.distribute.compression import allreduce_bfloat16_, check_compression
from distsgd.distribute.fusion import (
    ISOLATED_CHUNK_BYTES,
    Bucket,
    Chunk,
    Entry,
    plan_buckets,
    plan_chunks,
    stream_chunks,
)
from distsgd.distribute.tuning import TIMED_ROUNDS, ChunkSizeTuner
from distsgd.indexed_slices import IndexedSlices, to_dense
from distsgd.kernels import ScratchBuffers
from distsgd.variables import Variable, VariableAggregation, VariableSynchronization

__all__ = ["AUTO", "AUTO_CHUNK_CANDIDATES_BYTES", "AUTO_TRIAL_CALLS", "AggregationPlan",
           "GradientAggregator", "MismatchError", "route_of"]

LOCAL, SUM, MEAN, FIRST = "local", "sum", "mean", "first"
_NONE, _DENSE, _SPARSE = 0, 1, 2
_FLOAT32 = np.dtype(np.float32)
_DENSE_KINDS = np.zeros(0, dtype=np.uint8)  # stands for "all dense" in the flag check
#: ``chunk_bytes="auto"``: see :class:`GradientAggregator`.
AUTO = "auto"
#: The chunk sizes ``"auto"`` chooses between where it measures.
AUTO_CHUNK_CANDIDATES_BYTES = (DEFAULT_CHUNK_BYTES, 16 << 20)
#: Calls of a tuned aggregation that try sizes (the next one chooses, see ``tuning``).
AUTO_TRIAL_CALLS = len(AUTO_CHUNK_CANDIDATES_BYTES) * (1 + TIMED_ROUNDS)


class MismatchError(ValueError):
    """Ranks passed different variables (or policies) to a collective operation."""


def route_of(var: Variable) -> str:
    """How ``var``'s gradient crosses ranks: local, sum, mean or first."""
    if var.synchronization is VariableSynchronization.NONE:
        return LOCAL
    return {VariableAggregation.NONE: SUM, VariableAggregation.SUM: SUM,
            VariableAggregation.MEAN: MEAN,
            VariableAggregation.ONLY_FIRST_REPLICA: FIRST}[var.aggregation]


def signature_hash(signature: Sequence[Any]) -> bytes:
    """8 bytes identifying ``signature`` (a sequence of reprs-able tuples)."""
    return hashlib.blake2b(repr(tuple(signature)).encode(), digest_size=8).digest()


def agree_or_raise(communicator: Any, signature: Sequence[Any], digest: bytes, what: str,
                   describe: Any = repr, flag: int = 0) -> int:
    """Prove every rank holds the same ``signature``, or raise the same error on all.

    One ``Allreduce(BOR)`` of ``digest``, its complement and ``flag`` (a byte): the
    digest and complement come back unchanged on every rank exactly when all
    digests are equal. Returns the OR of every rank's ``flag``.
    """
    mine = np.frombuffer(digest, dtype=np.uint8)
    header = np.concatenate([mine, ~mine, np.array([flag], dtype=np.uint8)])
    communicator.allreduce_(header, "bor", what=f"{what}: signature check")
    if np.array_equal(header[:8], mine) and np.array_equal(header[8:16], ~mine):
        return int(header[16])
    raise MismatchError(_mismatch_message(communicator.allgather_object(list(signature)),
                                          what, describe))


def _mismatch_message(signatures: list[list[Any]], what: str, describe: Any) -> str:
    length = max(len(s) for s in signatures)
    for i in range(length):
        items = [s[i] if i < len(s) else None for s in signatures]
        if any(item != items[0] for item in items):
            break
    groups: dict[str, list[int]] = {}
    for rank, item in enumerate(items):
        groups.setdefault("(nothing)" if item is None else describe(item), []).append(rank)
    held = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {d}"
                     for d, r in groups.items())
    counts = sorted({len(s) for s in signatures})
    extra = "" if len(counts) == 1 else \
        f" (ranks pass {' vs '.join(map(str, counts))} variables)"
    return (f"ranks disagree in {what} at variable #{i}{extra}: {held}. Every rank must "
            "pass the same variables, in the same order, with the same shapes, dtypes and "
            "policies.")


def _describe(item: tuple[str, tuple[int, ...], str, str]) -> str:
    name, shape, dtype, route = item
    return f"{name!r} shape {shape} {np.dtype(dtype).name} ({route})"


@dataclass(frozen=True, eq=False)  # hashed by identity: a cheap key for plans
class _Signature:
    key: tuple[int, ...]
    items: list[Any]
    digest: bytes
    positions: list[int]


@dataclass
class AggregationPlan:
    """What one call moves, agreed by every rank (cached per variable list and kinds).

    ``kinds[i]`` is the gradient variable ``i`` gets: ``None`` (no rank has one),
    dense (``_DENSE``) or sparse (``_SPARSE``). Dense gradients travel in ``chunks`` of
    ``buckets``; ``sparse`` lists the positions gathered with ``Allgatherv``;
    ``densify`` the positions sparse here but dense elsewhere.
    """

    kinds: tuple[int | None, ...]
    buckets: list[Bucket]
    chunks: list[Chunk]
    sparse: list[int]
    densify: list[int]
    label: str = ""
    #: elements of the dense results that cross ranks, per dtype
    result_elements: dict[np.dtype, int] = field(default_factory=dict)
    #: every position with a sparse gradient (gathered or rank-local)
    sparse_positions: list[int] = field(default_factory=list)
    #: elements of all dense gradients
    dense_elements: int = 0
    #: per-plan data of the plan's user (the optimizer's update segments)
    user_data: dict[Any, Any] = field(default_factory=dict)


class GradientAggregator:
    """Aggregates the gradients of one ``apply_gradients`` call across ranks.

    Args:
        communicator: a :class:`~distsgd.distribute.comm.Communicator`.
        fusion_threshold_bytes: dense bucket size cap; 0 sends one buffer per tensor.
        sparse_as_dense: densify :class:`IndexedSlices` before reducing.
        chunk_bytes: dense buckets travel in messages of at most this many bytes
            (default: the communicator's ``chunk_bytes``, else 4 MiB). ``"auto"``: 4 MiB,
            except where a measured choice costs nothing: an aggregation that keeps
            all its results (:meth:`aggregate`; no chunk buffer, so no memory depends
            on the size) between exactly two ranks (every element's sum is then
            ``a + b``, which IEEE addition makes independent of how the message is
            cut, so the bits cannot change) times 4 and 16 MiB chunks on its first
            calls and keeps the faster (:class:`~distsgd.distribute.tuning.ChunkSizeTuner`).
            Streamed steps keep 4 MiB: each reduced chunk is updated while in cache,
            and its buffer's size is memory the step holds.
        compression: ``"bfloat16"``: summed float32 gradients travel as bfloat16
            (:mod:`~distsgd.distribute.compression`); None: exactly.
    """

    def __init__(self, communicator: Any, *, fusion_threshold_bytes: int,
                 sparse_as_dense: bool, chunk_bytes: int | str | None = None,
                 compression: str | None = None) -> None:
        self.communicator = communicator
        self.compression = check_compression(compression)
        self.fusion_threshold_bytes = fusion_threshold_bytes
        self.sparse_as_dense = sparse_as_dense
        self.auto_chunks = chunk_bytes == AUTO
        self.chunk_bytes = DEFAULT_CHUNK_BYTES if self.auto_chunks else \
            int(chunk_bytes or getattr(communicator, "chunk_bytes", 0) or DEFAULT_CHUNK_BYTES)
        self.calls = 0
        # Bounded caches: programs that pass ever-new variable lists (or whose None
        # pattern keeps changing) must not accumulate signatures or plans.
        self._signatures: OrderedDict[tuple[int, ...], _Signature] = OrderedDict()
        self._plans: OrderedDict[tuple[Any, ...], AggregationPlan] = OrderedDict()
        # keyed by what crosses ranks (agreed), used in call order: alike on every rank
        self._tuners: OrderedDict[tuple[Any, ...], ChunkSizeTuner] = OrderedDict()
        self._last_signature: tuple[Sequence[Variable], _Signature] | None = None
        self._results = ScratchBuffers()
        self._wire = ScratchBuffers()  # bfloat16 transport's buffers

    @property
    def distributed(self) -> bool:
        """Whether gradients cross ranks (more than one rank)."""
        return self.communicator.size > 1

    def local_form(self, grads: Sequence[Any], variables: Sequence[Variable]) -> Sequence[Any]:
        """The gradients as they will be sent: sparse ones densified with ``sparse_as_dense``."""
        if not self.sparse_as_dense:
            return grads
        return [to_dense(g.values, g.indices, v.shape) if isinstance(g, IndexedSlices) else g
                for g, v in zip(grads, variables, strict=True)]

    def agree(self, grads: Sequence[Any], variables: Sequence[Variable],
              step: int | None = None, all_dense: bool = False) -> AggregationPlan:
        """Prove every rank passes the same variables and agree on what moves.

        Collectives, on every rank in this order: the signature check, then, only when
        some rank has a ``None`` or sparse gradient, the kinds exchange. ``grads`` are
        in :meth:`local_form`; ``all_dense`` promises they are all dense arrays.

        Raises:
            MismatchError: on every rank alike, naming the variable and the ranks.
        """
        self.calls += 1
        label = f"gradient aggregation at step {step}" if step is not None else \
            f"gradient aggregation (call {self.calls})"
        signature = self._signature(variables)
        # kinds, one byte per variable; None stands for "all dense" (the common case)
        local = None if all_dense else bytes(map(_kind, grads))
        if local is not None and local.count(_DENSE) == len(local):
            local = None
        shared = local
        if self.distributed:
            kinds = _DENSE_KINDS if local is None else \
                np.frombuffer(local, dtype=np.uint8)[signature.positions]
            if agree_or_raise(self.communicator, signature.items, signature.digest, label,
                              _describe, flag=0 if local is None else
                              int(bool(np.any(kinds != _DENSE)))):
                kinds = np.full(len(signature.positions), _DENSE, dtype=np.uint8) \
                    if local is None else kinds.copy()
                self.communicator.allreduce_(kinds, "bor", what=f"{label}: gradient kinds")
                merged = bytearray(local or bytes(len(variables) * [_DENSE]))
                for position, kind in zip(signature.positions, kinds.tolist(), strict=True):
                    merged[position] = kind
                shared = bytes(merged)
        key = (signature, local, shared)
        plan = _lookup(self._plans, key)
        if plan is None:
            dense = bytes(len(variables) * [_DENSE])
            plan = self._plan(variables, local or dense, shared or dense)
            _store(self._plans, key, plan, _PLANS_KEPT)
        plan.label = label
        return plan

    def _signature(self, variables: Sequence[Variable]) -> _Signature:
        last = self._last_signature
        if last is not None and last[0] is variables:
            return last[1]  # the very tuple of the last call (the optimizer passes it on)
        key = tuple(v._unique_id for v in variables)
        cached = _lookup(self._signatures, key)
        if cached is None:
            positions = [i for i, v in enumerate(variables) if route_of(v) != LOCAL]
            items = [(variables[i].name, variables[i].shape, variables[i].dtype.str,
                      self._route_label(variables[i])) for i in positions]
            cached = _Signature(key, items, signature_hash(items), positions)
            _store(self._signatures, key, cached, _SIGNATURES_KEPT)
        if isinstance(variables, tuple):
            self._last_signature = (variables, cached)
        return cached

    def _compressed(self, dtype: np.dtype, route: str) -> bool:
        return self.compression is not None and route in (SUM, MEAN) and dtype == _FLOAT32

    def _route_label(self, var: Variable) -> str:
        """``var``'s route as the signature check compares it (with its transport)."""
        route = route_of(var)
        return f"{route}, {self.compression}" if self._compressed(var.dtype, route) else route

    def _plan(self, variables: Sequence[Variable], local: bytes,
              shared: bytes) -> AggregationPlan:
        kinds: list[int | None] = []
        entries, sparse, densify = [], [], []
        for position, (var, mine, everyone) in enumerate(zip(variables, local, shared,
                                                             strict=True)):
            # one rank: every route is the identity, so all dense gradients of a dtype
            # share buckets (longer runs, fewer kernel calls)
            route = route_of(var) if self.distributed else LOCAL
            if everyone == _NONE:
                kinds.append(None)
            elif everyone & _DENSE if route != LOCAL else mine == _DENSE:
                # dense everywhere, or mixed: densify (TF adds them densely)
                kinds.append(_DENSE)
                entries.append(Entry(position, var.dtype, route, var.shape))
                if mine == _SPARSE:
                    densify.append(position)
            else:
                kinds.append(_SPARSE)
                if route != LOCAL:
                    sparse.append(position)
        buckets = plan_buckets(entries, self.fusion_threshold_bytes)
        chunks = plan_chunks(buckets, self.chunk_bytes,
                             None if self.distributed else ISOLATED_CHUNK_BYTES)
        result_elements: dict[np.dtype, int] = {}
        for bucket in buckets:
            if bucket.route != LOCAL:
                result_elements[bucket.dtype] = result_elements.get(bucket.dtype, 0) + bucket.size
        return AggregationPlan(tuple(kinds), buckets, chunks, sparse, densify, "",
                               result_elements, [i for i, k in enumerate(kinds) if k == _SPARSE],
                               sum(bucket.size for bucket in buckets))

    def densified(self, plan: AggregationPlan, grads: Sequence[Any],
                  variables: Sequence[Variable]) -> Sequence[Any]:
        """``grads`` with the plan's mixed sparse/dense gradients made dense here."""
        if not plan.densify:
            return grads
        grads = list(grads)
        for position in plan.densify:
            grad = grads[position]
            grads[position] = to_dense(grad.values, grad.indices, variables[position].shape)
        return grads

    def reduce_chunk_(self, plan: AggregationPlan, chunk: Chunk, buffer: np.ndarray,
                      send: np.ndarray | None = None) -> None:
        """Combine one chunk across ranks into ``buffer``, per its bucket's route: the
        packed ``buffer`` in place, or ``send`` (the chunk's elements where they lie)."""
        bucket = chunk.bucket
        if bucket.route == LOCAL or bucket.route == FIRST:
            if send is not None:
                np.copyto(buffer, send)
            if bucket.route == LOCAL:
                return
        what = _ChunkLabel(plan.label, chunk)
        if bucket.route == FIRST:
            self.communicator.bcast_(buffer, root=0, what=what)
        else:
            if self._compressed(bucket.dtype, bucket.route):
                allreduce_bfloat16_(self.communicator, buffer, send, self._wire, what)
            else:
                self.communicator.allreduce_(buffer, "sum", what=what, send=send)
            if bucket.route == MEAN:
                np.divide(buffer, self.communicator.size, out=buffer)

    def aggregate(self, grads: Sequence[Any], variables: Sequence[Variable],
                  step: int | None = None) -> list[Any]:
        """The aggregated gradient for each variable (``None``: none on any rank).

        Dense results are views of one results array per dtype, overwritten by the next
        call; ``step`` (the optimizer's iterations) labels errors.
        """
        grads = self.local_form(grads, variables)
        return self.reduce_planned(self.agree(grads, variables, step), grads, variables)

    def reduce_planned(self, plan: AggregationPlan, grads: Sequence[Any],
                       variables: Sequence[Variable]) -> list[Any]:
        """:meth:`aggregate` after :meth:`agree`: move everything, keep the results."""
        if not self.distributed:
            return [g if kind is not None else None
                    for g, kind in zip(grads, plan.kinds, strict=True)]
        grads = self.densified(plan, grads, variables)
        result: list[Any] = list(grads)
        # one results array per dtype, shared by every plan: each bucket gets a region
        regions, used = {}, dict.fromkeys(plan.result_elements, 0)
        flats = {dtype: self._results.get(dtype, size)
                 for dtype, size in plan.result_elements.items()}
        for bucket in plan.buckets:
            if bucket.route != LOCAL:
                start = used[bucket.dtype]
                regions[bucket.index] = flats[bucket.dtype][start:start + bucket.size]
                used[bucket.dtype] = start + bucket.size
        tuner = self._tuner(plan)
        chunk_bytes = self.chunk_bytes if tuner is None else \
            tuner.chunk_bytes(self.communicator)
        seconds = None
        started = time.perf_counter()
        try:
            stream_chunks(self._kept_chunks(plan, chunk_bytes), grads, _ignore,
                          reduce=functools.partial(self.reduce_chunk_, plan),
                          out=lambda chunk: regions[chunk.bucket.index][chunk.start:chunk.stop])
            seconds = time.perf_counter() - started
        finally:
            if tuner is not None:
                tuner.record(seconds)
        for index, region in regions.items():
            bucket = plan.buckets[index]
            for entry, view in zip(bucket.entries, bucket.views(region), strict=True):
                result[entry.position] = view
        for position, slices in self.gather_sparse(plan, grads, variables).items():
            result[position] = slices
        return [None if kind is None else g for g, kind in zip(result, plan.kinds, strict=True)]

    def _kept_chunks(self, plan: AggregationPlan, chunk_bytes: int) -> list[Chunk]:
        """The plan's chunks that cross ranks, cut at ``chunk_bytes`` (made once)."""
        key = ("kept chunks", chunk_bytes)
        chunks = plan.user_data.get(key)
        if chunks is None:
            chunks = plan.chunks if chunk_bytes == self.chunk_bytes else \
                plan_chunks(plan.buckets, chunk_bytes)
            chunks = plan.user_data[key] = [c for c in chunks if c.bucket.route != LOCAL]
        return chunks

    def _tuner(self, plan: AggregationPlan) -> ChunkSizeTuner | None:
        """The chunk size tuner of the plan's messages, or None where none is tuned
        (a fixed size, not two ranks, or no bucket the candidates would cut apart)."""
        if not self.auto_chunks or self.communicator.size != 2:
            return None
        key = plan.user_data.get("tuning key", False)
        if key is False:  # what crosses ranks: the same on every rank
            crossing = [b for b in plan.buckets if b.route != LOCAL]
            key = plan.user_data["tuning key"] = tuple(
                (b.dtype.str, b.route, b.size) for b in crossing) if any(
                b.nbytes > min(AUTO_CHUNK_CANDIDATES_BYTES) for b in crossing) else None
        if key is None:
            return None
        tuner = _lookup(self._tuners, key)
        if tuner is None:
            tuner = ChunkSizeTuner(AUTO_CHUNK_CANDIDATES_BYTES)
            _store(self._tuners, key, tuner, _PLANS_KEPT)
        return tuner

    def chosen_chunk_bytes(self) -> list[int]:
        """The chunk size each tuned aggregation chose (the least recently used first)."""
        return [t.chosen for t in self._tuners.values() if t.chosen is not None]

    def gather_sparse(self, plan: AggregationPlan, grads: Sequence[Any],
                      variables: Sequence[Variable]) -> dict[int, IndexedSlices]:
        """Gather the plan's sparse gradients from every rank (``Allgatherv``, rank order)."""
        if not plan.sparse:
            return {}
        size = self.communicator.size
        rows = np.array([0 if grads[i] is None else len(grads[i].indices) for i in plan.sparse],
                        dtype=np.int64)
        all_rows = self.communicator.allgatherv(
            rows, np.full(size, len(plan.sparse)), what=f"{plan.label}: sparse row counts"
        ).reshape(size, len(plan.sparse))
        gathered = {}
        for column, position in enumerate(plan.sparse):
            var = variables[position]
            row_elements = math.prod(var.shape[1:])
            grad = grads[position]
            if grad is None:
                values = np.zeros((0,) + var.shape[1:], dtype=var.dtype)
                indices = np.zeros(0, dtype=np.int64)
            else:
                values, indices = grad.values, grad.indices
            label = f"{plan.label}: sparse gradient of {var.name!r}"
            counts = all_rows[:, column]
            all_values = self.communicator.allgatherv(
                np.ascontiguousarray(values).reshape(-1), counts * row_elements, what=label)
            all_indices = self.communicator.allgatherv(indices, counts, what=label)
            all_values = all_values.reshape((-1,) + var.shape[1:])
            route = route_of(var)
            if route == FIRST:
                all_values, all_indices = all_values[:counts[0]], all_indices[:counts[0]]
            elif route == MEAN:
                np.divide(all_values, size, out=all_values)
            gathered[position] = IndexedSlices(all_values, all_indices, var.shape)
        return gathered


class _ChunkLabel:
    """Names a chunk's collective in a timeout report (formatted only then)."""

    __slots__ = ("chunk", "label")

    def __init__(self, label: str, chunk: Chunk) -> None:
        self.label, self.chunk = label, chunk

    def __str__(self) -> str:
        bucket = self.chunk.bucket
        names = ", ".join(repr(e.position) for e in bucket.entries[:3])
        return (f"{self.label}: {bucket.route} {bucket.dtype.name} bucket {bucket.index + 1} "
                f"({bucket.nbytes} bytes; variables #{names}"
                f"{', ...' if len(bucket.entries) > 3 else ''}), elements "
                f"{self.chunk.start}-{self.chunk.stop}")


def _ignore(*args: Any) -> None:
    """``on_chunk`` of a reduction that keeps its results where they were reduced."""


_SIGNATURES_KEPT = 64
_PLANS_KEPT = 64


def _lookup(cache: OrderedDict, key: Any) -> Any:
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _store(cache: OrderedDict, key: Any, value: Any, limit: int) -> None:
    cache[key] = value
    while len(cache) > limit:
        cache.popitem(last=False)


def _kind(grad: Any) -> int:
    if grad is None:
        return _NONE
    return _SPARSE if isinstance(grad, IndexedSlices) else _DENSE
