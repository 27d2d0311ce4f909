"""Distribution strategies (tf.distribute vocabulary) over the communicator layer.

:class:`MPIStrategy` replicates training across MPI ranks; the default strategy is one
process with the same numerics and no communication. ``MPIStrategy()`` run without
``mpirun``, or without mpi4py, is that single process too, so the same script runs both
ways.

A variable created in a strategy's ``scope()`` belongs to that strategy
(:attr:`~distsgd.Variable.distribute_strategy`). Everything that acts on variables
(``apply_gradients``, ``minimize``, checkpoints, :meth:`Strategy.check_replicas`) finds
the strategy from them with :func:`strategy_of`, never from the scope active when it is
called: inside or outside ``scope()`` gives the same result.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from distsgd._validation import check_number
from distsgd.distribute import comm as comm_lib
from distsgd.distribute.aggregation import GradientAggregator
from distsgd.distribute.layout import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_FUSION_THRESHOLD_BYTES,
    Route,
    route_of,
)
from distsgd.distribute.replicas import check_replicas
from distsgd.distribute.transport import TreeTransport, check_compression, make_transport
from distsgd.distribute.watchdog import install_abort_on_exception
from distsgd.variables import (
    Variable,
    VariableAggregation,
    VariableSynchronization,
    variable_creator_scope,
)

__all__ = ["MPIStrategy", "ReduceOp", "Strategy", "get_strategy", "has_strategy",
           "strategy_of"]

_local = threading.local()


class ReduceOp(enum.Enum):
    """How :meth:`Strategy.reduce` combines per-replica values."""

    SUM = "SUM"
    MEAN = "MEAN"


def _reduce_op(op: Any) -> ReduceOp:
    if isinstance(op, ReduceOp):
        return op
    if isinstance(op, str) and op.upper() in ReduceOp.__members__:
        return ReduceOp[op.upper()]
    raise ValueError(f"reduce_op={op!r}; expected ReduceOp.SUM or ReduceOp.MEAN")


class Strategy:
    """Data-parallel replication over a communicator.

    Args:
        communicator: ``None`` (one process) or a communicator object; subclasses
            may create it lazily by overriding :meth:`_make_communicator`.
        fusion_threshold_bytes: dense gradients are packed into buckets of up to this
            many bytes; 0 makes one bucket per tensor.
        allreduce_chunk_bytes: buckets travel in messages of at most this many bytes.
        sparse_as_dense: densify sparse gradients before aggregating them.
        compression: ``"bfloat16"`` sends summed float32 gradients as bfloat16, half
            the bytes, at a relative rounding error of at most 2**-9 on each input and
            on the sum (opt-in; see :mod:`~distsgd.distribute.transport`); ``None``
            (default) sends them exactly.
        check_replicas_every_steps: run :meth:`check_replicas` on a step's variables and
            optimizer state at the start of every this many steps (0: never).
        repair_replicas: with the periodic check, re-broadcast rank 0's values instead
            of raising :class:`~distsgd.distribute.ReplicaDivergenceError`.
        world_size_invariant: the same bits at any number of ranks: every step's
            gradients come as a :class:`~distsgd.GradientAccumulator` of the global
            batch's ``micro_batches`` micro-batches (rank ``r`` computes
            ``replica_share(micro_batches, r, P)`` of them), combined in a canonical tree
            of float additions (``distribute.tree``).
        micro_batches: M, the micro-batches of each global batch (at least the number of
            ranks); also the default of ``ShardedBatches.micro_batches``.
    """

    def __init__(self, communicator: Any = None, *,
                 fusion_threshold_bytes: int = DEFAULT_FUSION_THRESHOLD_BYTES,
                 allreduce_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 sparse_as_dense: bool = False, check_replicas_every_steps: int = 0,
                 repair_replicas: bool = False, compression: str | None = None,
                 world_size_invariant: bool = False, micro_batches: int | None = None) -> None:
        check_number("fusion_threshold_bytes", fusion_threshold_bytes, low=0)
        if not isinstance(world_size_invariant, bool):
            raise TypeError(f"world_size_invariant={world_size_invariant!r}; expected a bool")
        if micro_batches is not None:
            check_number("micro_batches", micro_batches, low=1, what="an integer >= 1")
            if int(micro_batches) != micro_batches:
                raise TypeError(f"micro_batches={micro_batches!r}; expected an integer >= 1")
        if world_size_invariant and micro_batches is None:
            raise ValueError("world_size_invariant=True needs micro_batches=M: the global "
                             "batch is cut into M micro-batches whatever the world size")
        if world_size_invariant and compression is not None:
            raise ValueError(f"compression={compression!r} with world_size_invariant=True: "
                             "the invariant sums travel exactly; choose one")
        check_number("allreduce_chunk_bytes", allreduce_chunk_bytes, low=1,
                     what="a number of bytes >= 1")
        check_number("check_replicas_every_steps", check_replicas_every_steps, low=0)
        for name, flag in (("sparse_as_dense", sparse_as_dense),
                           ("repair_replicas", repair_replicas)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}={flag!r}; expected a bool")
        self.compression = check_compression(compression)
        self._communicator = communicator
        self.fusion_threshold_bytes = int(fusion_threshold_bytes)
        self.allreduce_chunk_bytes = int(allreduce_chunk_bytes)
        self.sparse_as_dense = sparse_as_dense
        self.check_replicas_every_steps = int(check_replicas_every_steps)
        self.repair_replicas = repair_replicas
        #: the same bits at any world size (see ``GradientAccumulator``)
        self.world_size_invariant = world_size_invariant
        #: micro-batches per global batch (None: not cut)
        self.micro_batches = None if micro_batches is None else int(micro_batches)
        self._aggregator: GradientAggregator | None = None
        #: where in the data this rank is (``ShardedBatches`` sets it): part of the next
        #: step's operation check, so ranks on different batches are named
        self.data_position: str | None = None

    # --- the communicator and the aggregator, made on first use ----------------------
    def _make_communicator(self) -> Any:
        return comm_lib.SerialCommunicator()

    @property
    def communicator(self) -> Any:
        """The communicator every collective of this strategy goes through."""
        if self._communicator is None:
            self._communicator = self._make_communicator()
        return self._communicator

    @property
    def aggregator(self) -> GradientAggregator:
        """The one owner of each step's collectives (see ``aggregation``)."""
        if self._aggregator is None:
            tree = None
            if self.world_size_invariant:
                if self.num_replicas_in_sync > self.micro_batches:
                    raise ValueError(
                        f"micro_batches={self.micro_batches} with {self.num_replicas_in_sync} "
                        "ranks: every rank needs at least one micro-batch (give at least "
                        "as many micro-batches as ranks)")
                tree = TreeTransport(self.micro_batches)
            self._aggregator = GradientAggregator(
                self.communicator, fusion_threshold_bytes=self.fusion_threshold_bytes,
                sparse_as_dense=self.sparse_as_dense, chunk_bytes=self.allreduce_chunk_bytes,
                transport=make_transport(self.compression),
                replica_check=lambda state: self.check_replicas(
                    state, repair=self.repair_replicas),
                replica_check_every_steps=self.check_replicas_every_steps,
                position=self._take_data_position, tree=tree)
        return self._aggregator

    def _take_data_position(self) -> str | None:
        """The data position for the step being checked; each batch counts once."""
        position, self.data_position = self.data_position, None
        return position

    @property
    def num_replicas_in_sync(self) -> int:
        """The number of replicas (MPI ranks) training together."""
        return self.communicator.size

    @property
    def rank(self) -> int:
        """This replica's index, 0 .. num_replicas_in_sync - 1."""
        return self.communicator.rank

    # --- scope -------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self) -> Iterator[Strategy]:
        """Make this the current strategy; variables created inside belong to it.

        A mirrored variable starts from rank 0's initial value on every rank (checked
        first: all ranks must create the same variables in the same order).
        ``synchronization=NONE`` variables stay rank-local. Optimizers created inside
        update this strategy's variables only.
        """
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)
        try:
            with variable_creator_scope(self, self._mirror_variable):
                yield self
        finally:
            stack.pop()

    def _mirror_variable(self, var: Variable) -> None:
        if var.synchronization is not VariableSynchronization.NONE:
            self.broadcast(var, root=0, what=f"creation of variable {var.name!r}")

    # --- collectives for users -----------------------------------------------------------
    def reduce(self, reduce_op: Any, value: Any, axis: int | None = None) -> np.ndarray:
        """Combine ``value`` across replicas: SUM, or MEAN (over replicas, or over all
        elements along ``axis`` of every replica, i.e. the global batch)."""
        op = _reduce_op(reduce_op)
        array = np.asarray(value.numpy() if isinstance(value, Variable) else value)
        count = 1
        if axis is not None:
            count = array.shape[axis]
            array = array.sum(axis=axis)
        if array.dtype.kind not in "iuf":
            raise TypeError(f"value of dtype {array.dtype} cannot be reduced; expected numbers")
        total = np.array(array, order="C", copy=True).reshape(-1)
        counts = np.array([count], dtype=np.int64)
        self._begin(f"strategy.reduce({op.name})", None, total)
        self.communicator.allreduce_(total, "sum", what="strategy.reduce")
        total = total.reshape(array.shape)
        if op is ReduceOp.MEAN:
            self.communicator.allreduce_(counts, "sum", what="strategy.reduce (count)")
            total = total / counts[0]
        return total

    def broadcast(self, value: Any, root: int = 0, what: str = "strategy.broadcast") -> Any:
        """``root``'s value on every rank: a Variable is overwritten in place and
        returned; anything else comes back as a new array."""
        comm_lib._check_root(root, self.num_replicas_in_sync)
        target = value._array if isinstance(value, Variable) else \
            np.array(value, order="C", copy=True)
        self._begin(what, value.name if isinstance(value, Variable) else None, target)
        self.communicator.bcast_(target, root=root, what=what)
        return value if isinstance(value, Variable) else target

    def barrier(self) -> None:
        """Wait until every replica arrives (bounded by the collective deadline)."""
        comm_lib.agree(self.communicator, "strategy.barrier")

    def agree_steps(self, local_steps: int) -> int:
        """The number of steps every replica can take: the minimum over replicas."""
        steps = np.array([check_number("local_steps", local_steps, low=0)], dtype=np.int64)
        comm_lib.agree(self.communicator, "strategy.agree_steps")
        self.communicator.allreduce_(steps, "min", what="agreeing on the number of steps")
        return int(steps[0])

    def read_var(self, var: Variable) -> np.ndarray:
        """The variable's value as the strategy sees it.

        ``ON_READ`` variables (metrics) are combined across replicas per their
        aggregation (SUM, MEAN, or rank 0's value for ONLY_FIRST_REPLICA); others
        are in sync already and come back as a copy.
        """
        if var.synchronization is not VariableSynchronization.ON_READ:
            return var.numpy()
        if var.aggregation is VariableAggregation.NONE:
            raise ValueError(f"Could not convert from `VariableAggregation.NONE` to a reduce op "
                             f"for ON_READ variable {var.name!r}; give it SUM, MEAN or "
                             "ONLY_FIRST_REPLICA aggregation")
        if var.aggregation is VariableAggregation.ONLY_FIRST_REPLICA:
            return self.broadcast(var.numpy(), root=0, what=f"read of {var.name!r}")
        return self.reduce(var.aggregation.name, var.numpy()).astype(var.dtype)

    def _begin(self, what: str, name: str | None, array: np.ndarray) -> None:
        """The operation check of a user collective on ``array`` (same layout on all)."""
        item = (name, array.shape, array.dtype.str)
        comm_lib.agree(self.communicator, what, repr(item).encode(), details=[item],
                       describe=lambda item: f"{item[0] or 'value'} shape {item[1]} "
                                             f"{np.dtype(item[2]).name}", noun="value")

    def check_replicas(self, variables: Any, optimizer: Any = None,
                       repair: bool = False) -> list[str]:
        """Prove every replica holds bitwise the same variables (and optimizer state).

        ``variables`` (and, with ``optimizer``, its ``iterations`` and slots) must
        belong to this strategy; rank-local (``synchronization=NONE``) ones are skipped.
        See :func:`~distsgd.distribute.replicas.check_replicas`.

        Returns:
            The names of the variables that differed and were repaired (``repair``),
            else an empty list.

        Raises:
            ReplicaDivergenceError: replicas differ and ``repair`` is False.
            ValueError: a variable belongs to another strategy, or to none.
        """
        items = list(variables)
        strategy_of(items, self, what="check_replicas")
        items += list(optimizer.weights) if optimizer is not None else []
        return check_replicas(self.communicator, items, repair)

    def __repr__(self) -> str:
        size = "?" if self._communicator is None else self._communicator.size
        return f"<{type(self).__name__} replicas={size}>"


class MPIStrategy(Strategy):
    """Synchronous data parallelism across MPI ranks (one replica per rank).

    Args:
        comm: an ``mpi4py.MPI.Comm`` to work within. ``None`` means a private
            ``Clone()`` of ``MPI.COMM_WORLD``, made on first use (never at import).
            Without an MPI launcher or without mpi4py, the strategy runs as one
            process with identical numerics.
        fusion_threshold_bytes: dense bucket size cap in bytes (0: no fusion).
        allreduce_chunk_bytes: buckets travel in messages of at most this many bytes
            (default 4 MiB).
        sparse_as_dense: densify sparse gradients instead of gathering them.
        compression: ``"bfloat16"``: summed float32 gradients travel as bfloat16
            (opt-in, lossy; see :class:`Strategy`); ``None``: exactly.
        check_replicas_every_steps: run :meth:`check_replicas` on a step's variables and
            optimizer state at the start of every this many steps (0: never).
        repair_replicas: with the periodic check, re-broadcast rank 0's values
            instead of raising ``ReplicaDivergenceError``.
        timeout_seconds: deadline of every collective (default ``DISTSGD_TIMEOUT``
            or 600 s); a peer that does not arrive raises ``CollectiveTimeoutError``.
        abort_on_exception: an unhandled exception on any rank prints its traceback
            and aborts the whole job (``MPI_Abort``) instead of leaving peers blocked.
        world_size_invariant, micro_batches: see :class:`Strategy`.
    """

    def __init__(self, comm: Any = None, *,
                 fusion_threshold_bytes: int = DEFAULT_FUSION_THRESHOLD_BYTES,
                 allreduce_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 sparse_as_dense: bool = False, check_replicas_every_steps: int = 0,
                 repair_replicas: bool = False, timeout_seconds: float | None = None,
                 abort_on_exception: bool = True, compression: str | None = None,
                 world_size_invariant: bool = False, micro_batches: int | None = None) -> None:
        super().__init__(None, fusion_threshold_bytes=fusion_threshold_bytes,
                         allreduce_chunk_bytes=allreduce_chunk_bytes,
                         sparse_as_dense=sparse_as_dense, compression=compression,
                         check_replicas_every_steps=check_replicas_every_steps,
                         repair_replicas=repair_replicas,
                         world_size_invariant=world_size_invariant,
                         micro_batches=micro_batches)
        if timeout_seconds is not None:
            check_number("timeout_seconds", timeout_seconds, low=1e-3)
        self._comm = comm
        self.timeout_seconds = timeout_seconds
        self.abort_on_exception = abort_on_exception

    def _make_communicator(self) -> Any:
        if self._comm is None and not comm_lib.launched_by_mpi():
            return comm_lib.SerialCommunicator()
        try:
            communicator = comm_lib.MPICommunicator(self._comm,
                                                    timeout_seconds=self.timeout_seconds)
        except ImportError:
            if self._comm is not None:
                raise
            return comm_lib.SerialCommunicator()
        if self.abort_on_exception and communicator.size > 1:
            install_abort_on_exception(communicator)
        return communicator


_DEFAULT = Strategy()


def get_strategy() -> Strategy:
    """The strategy whose ``scope()`` is active in this thread, else the default one."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _DEFAULT


def has_strategy() -> bool:
    """Whether a strategy's ``scope()`` is active in this thread (tf.distribute's name)."""
    return bool(getattr(_local, "stack", None))


def strategy_of(variables: Sequence[Variable], bound: Strategy | None = None, *,
                what: str = "this call") -> Strategy:
    """The strategy that owns ``variables``: the one every mirrored variable was created
    in (rank-local ones fit any), else ``bound``, else the default strategy.

    ``bound`` is the strategy the caller already belongs to (an optimizer's, or the
    strategy whose method is called). The decision is local (no collective), and every
    rank of the same program reaches the same one.

    Raises:
        ValueError: naming the variables and the fix, where a strategy with more than one
            replica is involved and the variables mix strategies, include mirrored ones
            created outside any ``scope()``, or belong to a strategy other than ``bound``.
    """
    owners: dict[int, tuple[Strategy | None, list[str]]] = {}
    for var in variables:
        if route_of(var) is not Route.LOCAL:
            owner = var.distribute_strategy
            owners.setdefault(id(owner), (owner, []))[1].append(var.name)
    found = [owner for owner, _ in owners.values()]
    multi = [s for s in [*found, bound] if s is not None and s.num_replicas_in_sync > 1]
    if not multi:  # one process everywhere: any combination computes the same
        return next((s for s in found if s is not None), bound or _DEFAULT)
    strategy = multi[0]
    if bound in (None, strategy) and all(owner is strategy for owner in found):
        return strategy
    parts = []
    for owner, names in owners.values():
        shown = ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")
        parts.append(f"{shown} created outside any strategy.scope()" if owner is None
                     else f"{shown} created in the scope of {owner!r}")
    if bound is not None:
        parts.append(f"the optimizer (or strategy) of the call belongs to {bound!r}")
    raise ValueError(
        f"{what}: a step across {strategy.num_replicas_in_sync} replicas must involve one "
        f"strategy only, but: {'; '.join(parts)}. Create every variable and the optimizer "
        "inside the same `with strategy.scope():`, or pass "
        "synchronization=VariableSynchronization.NONE for a variable meant to stay "
        "rank-local (never synchronized).")
