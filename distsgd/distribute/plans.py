"""What one step moves across ranks, planned once per variable list and gradient kinds.

A :class:`StepPlan` is computed from what every rank agreed on (the variables, their
routes, which of them have dense, sparse or no gradients anywhere), so every rank plans
the same buckets and chunks and issues the same collectives. Nothing here communicates.
"""

from __future__ import annotations

import enum
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distsgd.distribute.layout import (
    LOCAL_CHUNK_BYTES,
    Bucket,
    Chunk,
    Entry,
    Route,
    plan_buckets,
    plan_chunks,
    route_of,
)
from distsgd.distribute.transport import Transport
from distsgd.indexed_slices import IndexedSlices
from distsgd.variables import Variable

__all__ = [
    "CACHED_PLANS",
    "LRU",
    "Kind",
    "Signature",
    "StepPlan",
    "build_plan",
    "describe",
    "kind_of",
    "signature_of",
]

#: Plans and signatures kept per aggregator (a program that passes ever-new variable
#: lists, or None patterns, must not accumulate them).
CACHED_PLANS = 64


class Kind(enum.IntFlag):
    """What gradient a rank holds for a variable (bits, OR-ed across ranks)."""

    NONE = 0
    DENSE = 1
    SPARSE = 2



@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a cheap cache key
class StepPlan:
    """What one step moves, agreed by every rank; made once per variable list and kinds.

    Positions index the step's (gradient, variable) pairs.
    """

    #: per position: ``None`` (no rank has a gradient), ``Kind.DENSE`` or ``Kind.SPARSE``
    kinds: tuple[Kind | None, ...]
    buckets: tuple[Bucket, ...]
    chunks: tuple[Chunk, ...]
    #: per bucket: how its sums cross ranks (None: it does not cross, or is broadcast)
    transports: tuple[Transport | None, ...]
    #: per bucket that crosses ranks: where its region starts in the kept results
    result_offsets: dict[int, int]
    #: elements of the kept results, per dtype
    result_elements: dict[np.dtype, int]
    #: positions with a sparse gradient (gathered if in ``gathered``)
    sparse: tuple[int, ...]
    gathered: tuple[int, ...]
    #: positions sparse here but dense on another rank: made dense here
    densify: tuple[int, ...]
    #: positions some rank has a gradient for, and those none has
    updated: tuple[int, ...]
    missing: tuple[int, ...]
    dense_elements: int
    #: per GradientBuffer used with this plan: each bucket's memory in it (or None)
    sources: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)


@dataclass(frozen=True, eq=False)
class Signature:
    """What the operation check of a variable list compares: one item per variable
    that crosses ranks (name, shape, dtype, route)."""

    items: list[tuple[Any, ...]]
    digest: bytes
    crossing: list[int]  # positions whose gradients cross ranks


def build_plan(variables: Sequence[Variable], local: bytes, shared: bytes, distributed: bool,
               *, fusion_threshold_bytes: int, chunk_bytes: int,
               transport_of: Callable[[np.dtype, Route], Transport | None]) -> StepPlan:
    """The plan of a step whose gradient kinds are ``local`` here and ``shared`` (OR-ed)
across ranks, one byte per variable; ``distributed``: gradients cross ranks."""
    kinds: list[Kind | None] = []
    entries, sparse, gathered, densify = [], [], [], []
    for position, (var, mine, everyone) in enumerate(zip(variables, local, shared,
                                                         strict=True)):
        # without crossing, every route is the identity: all dense gradients of a
        # dtype share buckets (longer runs, fewer kernel calls)
        route = route_of(var) if distributed else Route.LOCAL
        if route is Route.LOCAL:
            everyone = mine
        if everyone == Kind.NONE:
            kinds.append(None)
        elif everyone & Kind.DENSE:  # dense everywhere, or mixed: dense (as TF adds)
            kinds.append(Kind.DENSE)
            entries.append(Entry(position, var.dtype, route, var.shape))
            if mine == Kind.SPARSE:
                densify.append(position)
        else:
            kinds.append(Kind.SPARSE)
            sparse.append(position)
            if route is not Route.LOCAL:
                gathered.append(position)
    buckets = plan_buckets(entries, fusion_threshold_bytes)
    chunks = plan_chunks(buckets, chunk_bytes,
                         None if distributed else LOCAL_CHUNK_BYTES)
    offsets: dict[int, int] = {}
    elements: dict[np.dtype, int] = {}
    for bucket in buckets:
        if bucket.route is not Route.LOCAL:
            offsets[bucket.index] = elements.get(bucket.dtype, 0)
            elements[bucket.dtype] = offsets[bucket.index] + bucket.size
    return StepPlan(
        kinds=tuple(kinds), buckets=tuple(buckets), chunks=tuple(chunks),
        transports=tuple(transport_of(b.dtype, b.route) for b in buckets),
        result_offsets=offsets, result_elements=elements, sparse=tuple(sparse),
        gathered=tuple(gathered), densify=tuple(densify),
        updated=tuple(i for i, k in enumerate(kinds) if k is not None),
        missing=tuple(i for i, k in enumerate(kinds) if k is None),
        dense_elements=sum(bucket.size for bucket in buckets))


def describe(item: tuple[str, tuple[int, ...], str, str]) -> str:
    name, shape, dtype, route = item
    return f"{name!r} shape {shape} {np.dtype(dtype).name} ({route})"


def kind_of(grad: Any) -> int:
    if grad is None:
        return Kind.NONE
    return Kind.SPARSE if isinstance(grad, IndexedSlices) else Kind.DENSE


def signature_of(variables: Sequence[Variable], route_label: Callable[[Variable], str]
                 ) -> Signature:
    """The operation-check signature of ``variables`` (rank-local ones are left out)."""
    crossing = [i for i, v in enumerate(variables) if route_of(v) is not Route.LOCAL]
    items = [(variables[i].name, variables[i].shape, variables[i].dtype.str,
              route_label(variables[i])) for i in crossing]
    return Signature(items, hashlib.blake2b(repr(items).encode(), digest_size=8).digest(),
                     crossing)


class LRU(OrderedDict):
    """A dict that keeps its :data:`CACHED_PLANS` most recently used entries."""

    def lookup(self, key: Any) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def store(self, key: Any, value: Any) -> None:
        self[key] = value
        while len(self) > CACHED_PLANS:
            self.popitem(last=False)
