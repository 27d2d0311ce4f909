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
3. dense gradients, packed into flat per-(dtype, route) buckets, reduced in place
   (chunked ``Allreduce`` for sum/mean, ``Bcast`` from rank 0 for first);
4. sparse gradients gathered with ``Allgatherv``: values and indices concatenated in
   rank order, values divided by the world size for MEAN, rank 0's slices for first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from distsgd.distribute.fusion import Bucket, Entry, plan_buckets
from distsgd.indexed_slices import IndexedSlices, to_dense
from distsgd.timeline import timeline
from distsgd.variables import Variable, VariableAggregation, VariableSynchronization

__all__ = ["GradientAggregator", "MismatchError", "route_of"]

LOCAL, SUM, MEAN, FIRST = "local", "sum", "mean", "first"
_NONE, _DENSE, _SPARSE = 0, 1, 2


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


class GradientAggregator:
    """Aggregates the gradients of one ``apply_gradients`` call across ranks.

    Args:
        communicator: a :class:`~distsgd.distribute.comm.Communicator`.
        fusion_threshold_bytes: dense bucket size cap; 0 sends one buffer per tensor.
        sparse_as_dense: densify :class:`IndexedSlices` before reducing.
    """

    def __init__(self, communicator: Any, *, fusion_threshold_bytes: int,
                 sparse_as_dense: bool) -> None:
        self.communicator = communicator
        self.fusion_threshold_bytes = fusion_threshold_bytes
        self.sparse_as_dense = sparse_as_dense
        self.calls = 0
        # Bounded caches: programs that pass ever-new variable lists (or whose None
        # pattern keeps changing) must not accumulate signatures or fusion buffers.
        self._signatures: OrderedDict[tuple[int, ...], tuple[list[Any], bytes, list[int]]] = \
            OrderedDict()
        self._plans: OrderedDict[tuple[Any, ...], list[Bucket]] = OrderedDict()

    def aggregate(self, grads: Sequence[Any], variables: Sequence[Variable],
                  step: int | None = None) -> list[Any]:
        """The aggregated gradient for each variable (``None``: none on any rank).

        ``step`` (the optimizer's iterations) only labels errors and timeouts.
        """
        self.calls += 1
        grads = [self._local_form(g, v) for g, v in zip(grads, variables, strict=True)]
        if self.communicator.size == 1:
            return grads
        signature, digest, positions = self._signature(variables)
        what = f"gradient aggregation at step {step}" if step is not None else \
            f"gradient aggregation (call {self.calls})"
        kinds = np.array([_kind(grads[i]) for i in positions], dtype=np.uint8)
        not_all_dense = int(bool(np.any(kinds != _DENSE)))
        if agree_or_raise(self.communicator, signature, digest, what, _describe,
                          flag=not_all_dense):
            self.communicator.allreduce_(kinds, "bor", what=f"{what}: gradient kinds")
        if not positions:
            return grads

        result = list(grads)
        dense_entries, sparse_positions = [], []
        for position, kind in zip(positions, kinds.tolist(), strict=True):
            var = variables[position]
            if kind == _NONE:
                result[position] = None
            elif kind == _SPARSE:
                sparse_positions.append(position)
            else:  # dense everywhere, or mixed: densify (TF adds them densely)
                if isinstance(grads[position], IndexedSlices):
                    grads[position] = to_dense(grads[position].values,
                                               grads[position].indices, var.shape)
                dense_entries.append(Entry(position, var.dtype, route_of(var), var.shape))
        self._reduce_dense(grads, dense_entries, result, digest, what)
        self._gather_sparse(grads, variables, sparse_positions, result, what)
        return result

    def _local_form(self, grad: Any, var: Variable) -> Any:
        if self.sparse_as_dense and isinstance(grad, IndexedSlices):
            return to_dense(grad.values, grad.indices, var.shape)
        return grad

    def _signature(self, variables: Sequence[Variable]) -> tuple[list[Any], bytes, list[int]]:
        key = tuple(v._unique_id for v in variables)
        cached = _lookup(self._signatures, key)
        if cached is None:
            positions = [i for i, v in enumerate(variables) if route_of(v) != LOCAL]
            signature = [(variables[i].name, variables[i].shape, variables[i].dtype.str,
                          route_of(variables[i])) for i in positions]
            cached = (signature, signature_hash(signature), positions)
            _store(self._signatures, key, cached, _SIGNATURES_KEPT)
        return cached

    def _reduce_dense(self, grads: list[Any], entries: list[Entry], result: list[Any],
                      digest: bytes, what: str) -> None:
        if not entries:
            return
        key = (digest, tuple(e.position for e in entries))
        buckets = _lookup(self._plans, key)
        if buckets is None:
            buckets = plan_buckets(entries, self.fusion_threshold_bytes)
            _store(self._plans, key, buckets, _PLANS_KEPT)
        size = self.communicator.size
        chunk_bytes = getattr(self.communicator, "chunk_bytes", 1 << 62)
        for number, bucket in enumerate(buckets):
            label = (f"{what}: bucket {number + 1}/{len(buckets)} ({bucket.route}, "
                     f"{bucket.dtype.name}, {bucket.nbytes} bytes)")
            step = max(1, chunk_bytes // bucket.dtype.itemsize)
            with timeline.span(f"bucket {number + 1}", "aggregate", route=bucket.route,
                               dtype=bucket.dtype.name, bytes=bucket.nbytes):
                for start in range(0, bucket.buffer.size, step):
                    stop = min(start + step, bucket.buffer.size)
                    bucket.pack_(grads, start, stop)
                    chunk = bucket.buffer[start:stop]
                    if bucket.route == FIRST:
                        self.communicator.bcast_(chunk, root=0, what=label)
                    else:
                        self.communicator.allreduce_(chunk, "sum", what=label)
                        if bucket.route == MEAN:
                            np.divide(chunk, size, out=chunk)
            for entry, view in zip(bucket.entries, bucket.views(), strict=True):
                result[entry.position] = view

    def _gather_sparse(self, grads: list[Any], variables: Sequence[Variable],
                       positions: list[int], result: list[Any], what: str) -> None:
        if not positions:
            return
        size = self.communicator.size
        rows = np.array([0 if grads[i] is None else len(grads[i].indices) for i in positions],
                        dtype=np.int64)
        all_rows = self.communicator.allgatherv(
            rows, np.full(size, len(positions)), what=f"{what}: sparse row counts"
        ).reshape(size, len(positions))
        for column, position in enumerate(positions):
            var = variables[position]
            row_elements = int(np.prod(var.shape[1:], dtype=np.int64))
            grad = grads[position]
            if grad is None:
                values = np.zeros((0,) + var.shape[1:], dtype=var.dtype)
                indices = np.zeros(0, dtype=np.int64)
            else:
                values, indices = grad.values, grad.indices
            label = f"{what}: sparse gradient of {var.name!r}"
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
            result[position] = IndexedSlices(all_values, all_indices, var.shape)


_SIGNATURES_KEPT = 64
_PLANS_KEPT = 4


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
