"""Gradient accumulation: several micro-batches' gradients, combined before one update.

The job of Horovod's ``backward_passes_per_step`` and DDP's ``no_sync``: a rank adds the
gradients of each of its micro-batches, then one ``apply_gradients(accumulator)``
combines them across ranks and updates. Under a world-size-invariant strategy
(``MPIStrategy(world_size_invariant=True, micro_batches=M)``) the micro-batches are
numbered ``0 .. M-1`` across the whole global batch, rank ``r`` adds exactly its share
``replica_share(M, r, P)`` in order, and the combination is the canonical tree
(:mod:`~distsgd.distribute.tree`): the same bits at any number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distsgd.distribute.data import replica_share
from distsgd.distribute.layout import Route, route_of
from distsgd.distribute.strategy import strategy_of
from distsgd.distribute.tree import TreeSum
from distsgd.gradients import GradientBuffer, value_and_gradients
from distsgd.indexed_slices import IndexedSlices
from distsgd.kernels import ScratchBuffers
from distsgd.optimizers.validation import validate_gradient
from distsgd.variables import Variable

__all__ = ["GradientAccumulator"]

_NONE, _DENSE, _SPARSE = 0, 1, 2


class GradientAccumulator:
    """The combined gradients of several micro-batches, for one ``apply_gradients``.

    ::

        accumulator = distsgd.GradientAccumulator(variables)
        for index, (x, y) in batches.micro_batches(epoch, step):  # this rank's share
            accumulator.add(lambda: loss(x, y), index=index)       # autograd, or
            # accumulator.add(gradients=[...], index=index)         # your own backward
        optimizer.apply_gradients(accumulator)                     # then it starts anew

    A micro-batch's loss is scaled by the *global* batch size, as for one step. Dense
    gradients are written into :attr:`buffer` (``add(loss)`` does it with autograd; a
    backward pass of your own may fill ``buffer.grads`` and call ``add(index=...)``);
    ``add(gradients=...)`` also takes :class:`~distsgd.IndexedSlices` and ``None``.

    Under a world-size-invariant strategy, ``index`` is the micro-batch's number in
    ``[0, M)`` and each rank adds exactly ``replica_share(M, rank, P)``, in order; the
    result is bitwise the same at every world size, for every policy (``MEAN`` is the
    mean over the M micro-batches, ``ONLY_FIRST_REPLICA`` micro-batch 0's gradient),
    dense or sparse. Otherwise ``index`` may be omitted: the micro-batches are summed in
    the order added, then aggregated across ranks as usual.

    Args:
        variables: the variables, in the order of the gradients.
        strategy: their strategy (found from them when None).

    Raises:
        ValueError: at ``add``, an index out of turn; at ``apply_gradients``, a share not
            complete (every error before anything crosses ranks or changes).
    """

    def __init__(self, variables: Sequence[Variable], strategy: Any = None) -> None:
        self.variables: tuple[Variable, ...] = tuple(variables)
        self.strategy = strategy_of(self.variables, strategy, what="GradientAccumulator")
        #: where one micro-batch's dense gradients are written
        self.buffer = GradientBuffer(self.variables)
        self.invariant = bool(getattr(self.strategy, "world_size_invariant", False))
        self.micro_batches: int | None = getattr(self.strategy, "micro_batches", None)
        self._scratch = ScratchBuffers()
        self._first_route = [route_of(v) is Route.FIRST for v in self.variables]
        # (summing mode) the running sum, reduced in place by apply_gradients
        self._summed = None if self.invariant else GradientBuffer(self.variables)
        self._trees = {dtype: TreeSum(self.micro_batches or 1, self._buffer_of(dtype))
                       for dtype in self.buffer.flat} if self.invariant else {}
        self.reset()

    # --- adding micro-batches ------------------------------------------------------------
    def reset(self) -> None:
        """Forget what was added (``apply_gradients`` does it after each step)."""
        self.added = 0
        self.kinds = bytearray(len(self.variables))
        self.sparse: dict[int, list[tuple[int | None, IndexedSlices]]] = {}
        self.first: dict[Any, np.ndarray] | None = None  # micro-batch 0's flats
        self._next: int | None = None
        for tree in self._trees.values():
            tree.clear()

    def share(self) -> range:
        """The micro-batch indices this rank adds (a world-size-invariant strategy)."""
        if not self.invariant:
            raise ValueError("only a world-size-invariant strategy numbers micro-batches")
        share = replica_share(self.micro_batches, self.strategy.rank,
                              self.strategy.num_replicas_in_sync)
        return range(share.start, share.stop)

    def add(self, loss: Callable[[], Any] | None = None, *, index: int | None = None,
            gradients: Sequence[Any] | None = None, grad_loss: Any = None) -> Any:
        """Add one micro-batch: the gradients of ``loss()`` (autograd), or ``gradients``
        (one per variable: an array, :class:`~distsgd.IndexedSlices` or ``None``), or,
        with neither, what :attr:`buffer` holds. Returns ``loss()``'s value (or None)."""
        if self.invariant:
            expected = self.share()
            wanted = expected.start + self.added
            if index != wanted or wanted >= expected.stop:
                raise ValueError(
                    f"index={index!r}; this rank adds micro-batches {expected.start} to "
                    f"{expected.stop - 1} of {self.micro_batches}, in order, and expects "
                    f"{wanted if wanted < expected.stop else 'none more this step'}")
        value = None
        sparse: dict[int, IndexedSlices] = {}
        if loss is not None and gradients is not None:
            raise ValueError("add(loss=..., gradients=...): give one of them")
        if loss is not None:
            value, _ = value_and_gradients(loss, self.variables, grad_loss, out=self.buffer)
            present = [i not in self.buffer.missing for i in range(len(self.variables))]
        elif gradients is not None:
            present, sparse = self._write(gradients)
        else:
            present = [i not in self.buffer.missing for i in range(len(self.variables))]
        for i, here in enumerate(present):
            self.kinds[i] |= (_SPARSE if i in sparse else _DENSE) if here else _NONE
        for i, slices in sparse.items():
            self.sparse.setdefault(i, []).append((index, slices))
        self._accumulate(index)
        self.added += 1
        return value

    def _write(self, gradients: Sequence[Any]) -> tuple[list[bool], dict[int, IndexedSlices]]:
        """Validate and write ``gradients`` into the buffer (sparse ones densified there,
        and kept)."""
        if len(gradients) != len(self.variables):
            raise ValueError(f"gradients has {len(gradients)} entries; expected one per "
                             f"variable ({len(self.variables)})")
        checked = [validate_gradient(g, v, i) for i, (g, v) in
                   enumerate(zip(gradients, self.variables, strict=True))]
        sparse = {}
        for i, (grad, target) in enumerate(zip(checked, self.buffer.grads, strict=True)):
            if grad is None:
                target.fill(0)
            elif isinstance(grad, IndexedSlices):
                target.fill(0)
                np.add.at(target, grad.indices, grad.values)  # the leaf is dense too
                sparse[i] = grad
            else:
                np.copyto(target, grad)
        return [g is not None for g in checked], sparse

    def _accumulate(self, index: int | None) -> None:
        if self.invariant:
            if index == 0 and any(self._first_route):
                self.first = {d: f.copy() for d, f in self.buffer.flat.items()}
            for dtype, flat in self.buffer.flat.items():
                self._trees[dtype].push((index, index + 1), flat)
            return
        for dtype, flat in self.buffer.flat.items():
            total = self._summed.flat[dtype]
            if self.added == 0:
                np.copyto(total, flat)
            else:
                np.add(total, flat, out=total)

    def _buffer_of(self, dtype: Any) -> Callable[[int], np.ndarray]:
        size = self.buffer.flat[dtype].size
        return lambda depth: self._scratch.get(dtype, size, 16 + depth)

    # --- what apply_gradients reads ------------------------------------------------------
    def check_complete(self) -> None:
        """Raise ``ValueError`` unless this rank added its whole share (before a step)."""
        if self.added == 0:
            raise ValueError("apply_gradients(accumulator): no micro-batch was added")
        if self.invariant and self.added != len(self.share()):
            share = self.share()
            raise ValueError(f"apply_gradients(accumulator): this rank added {self.added} "
                             f"of its micro-batches {share.start} to {share.stop - 1}")

    def local_kinds(self) -> bytes:
        """Per variable: 1 dense (in some micro-batch), 2 sparse only, 0 none."""
        return bytes(_DENSE if k & _DENSE else k for k in self.kinds)

    def gradients(self) -> tuple[list[Any], GradientBuffer | None]:
        """(Summing mode) the summed gradients per variable, and the buffer they lie in
        when they are all dense (then reduced in place there)."""
        grads: list[Any] = []
        for i, (kind, view) in enumerate(zip(self.local_kinds(), self._summed.grads,
                                             strict=True)):
            grads.append(view if kind == _DENSE else self.sparse_of(i) if kind == _SPARSE
                         else None)
        dense = all(kind == _DENSE for kind in self.local_kinds())
        return grads, self._summed if dense else None

    def pieces(self) -> dict[Any, list[np.ndarray]]:
        """(Invariant mode) per dtype, this rank's tree pieces, flat, in node order."""
        return {dtype: [values for _, values in tree.stack]
                for dtype, tree in self._trees.items()}

    def first_flats(self) -> dict[Any, np.ndarray] | None:
        """(Invariant mode) micro-batch 0's flats, on the rank that holds it."""
        return self.first

    def sparse_of(self, position: int) -> IndexedSlices | None:
        """The sparse gradient of a variable: its micro-batches' slices concatenated in
        order (for ``ONLY_FIRST_REPLICA`` under invariance, micro-batch 0's only)."""
        parts = self.sparse.get(position, [])
        if self.invariant and self._first_route[position]:
            parts = [(index, slices) for index, slices in parts if index == 0]
        if not parts:
            return None
        return IndexedSlices(np.concatenate([p.values for _, p in parts]),
                             np.concatenate([p.indices for _, p in parts]),
                             self.variables[position].shape)

    def views(self, flats: dict[Any, np.ndarray]) -> list[np.ndarray | None]:
        """Each variable's gradient as a view of ``flats`` (laid out as :attr:`buffer`;
        None for a dtype ``flats`` lacks)."""
        used: dict[Any, int] = dict.fromkeys(self.buffer.flat, 0)
        views: list[np.ndarray | None] = []
        for var in self.variables:
            start = used[var.dtype]
            flat = flats.get(var.dtype)
            views.append(None if flat is None else
                         flat[start:start + var.size].reshape(var.shape))
            used[var.dtype] = start + var.size
        return views
