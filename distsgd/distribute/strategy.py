"""Distribution strategies (tf.distribute vocabulary) over the communicator layer.

:class:`MPIStrategy` replicates training across MPI ranks; the default strategy
(returned by :func:`get_strategy` outside any ``scope()``) is one process with the
same numerics and no communication. ``MPIStrategy()`` run without ``mpirun``, or
without mpi4py, is that single process too, so the same script runs both ways.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from distsgd._validation import check_number
from distsgd.distribute import comm as comm_lib
from distsgd.distribute.aggregation import (
    AUTO,
    AUTO_CHUNK_CANDIDATES_BYTES,
    GradientAggregator,
    agree_or_raise,
    route_of,
    signature_hash,
)
from distsgd.distribute.compression import check_compression
from distsgd.distribute.fusion import DEFAULT_FUSION_THRESHOLD_BYTES
from distsgd.variables import (
    Variable,
    VariableAggregation,
    VariableSynchronization,
    variable_creator_scope,
)

__all__ = ["MPIStrategy", "ReduceOp", "ReplicaDivergenceError", "Strategy", "get_strategy"]

_local = threading.local()


class ReplicaDivergenceError(RuntimeError):
    """Replicas that should be identical hold different values."""


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
        fusion_threshold_bytes: dense gradients are packed into buffers of up to this
            many bytes; 0 sends one buffer per tensor.
        sparse_as_dense: densify sparse gradients before aggregating them.
        compression: ``"bfloat16"`` sends summed float32 gradients as bfloat16, half
            the bytes, at a relative rounding error of at most 2**-9 on each input and
            on the sum (opt-in; see :mod:`~distsgd.distribute.compression`); ``None``
            (default) sends them exactly.
    """

    #: the aggregation's chunk size (``MPIStrategy`` sets it; None: the communicator's)
    allreduce_chunk_bytes: int | str | None = None

    def __init__(self, communicator: Any = None, *,
                 fusion_threshold_bytes: int = DEFAULT_FUSION_THRESHOLD_BYTES,
                 sparse_as_dense: bool = False, check_replicas_every_steps: int = 0,
                 repair_replicas: bool = False, compression: str | None = None) -> None:
        check_number("fusion_threshold_bytes", fusion_threshold_bytes, low=0)
        self.compression = check_compression(compression)
        check_number("check_replicas_every_steps", check_replicas_every_steps, low=0)
        for name, flag in (("sparse_as_dense", sparse_as_dense),
                           ("repair_replicas", repair_replicas)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}={flag!r}; expected a bool")
        self._communicator = communicator
        self.fusion_threshold_bytes = int(fusion_threshold_bytes)
        self.sparse_as_dense = sparse_as_dense
        self.check_replicas_every_steps = int(check_replicas_every_steps)
        self.repair_replicas = repair_replicas
        self._aggregator: GradientAggregator | None = None
        self._applied_steps = 0

    # --- the communicator, made on first use --------------------------------------------
    def _make_communicator(self) -> Any:
        return comm_lib.SerialCommunicator()

    @property
    def communicator(self) -> Any:
        """The communicator every collective of this strategy goes through."""
        if self._communicator is None:
            self._communicator = self._make_communicator()
        return self._communicator

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
        """Make this the current strategy; variables created inside are mirrored.

        A mirrored variable starts from rank 0's initial value on every rank (checked
        first: all ranks must create the same variables in the same order).
        ``synchronization=NONE`` variables stay rank-local.
        """
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)
        try:
            with variable_creator_scope(self._mirror_variable):
                yield self
        finally:
            stack.pop()

    def _mirror_variable(self, var: Variable) -> None:
        if var.synchronization is VariableSynchronization.NONE or \
                self.communicator.size == 1:
            return
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
        self._check_same_layout(total, "reduce")
        self.communicator.allreduce_(total, "sum", what="strategy.reduce")
        total = total.reshape(array.shape)
        if op is ReduceOp.MEAN:
            counts = np.array([count], dtype=np.int64)
            self.communicator.allreduce_(counts, "sum", what="strategy.reduce (count)")
            total = total / counts[0]
        return total

    def broadcast(self, value: Any, root: int = 0, what: str = "strategy.broadcast") -> Any:
        """``root``'s value on every rank: a Variable is overwritten in place and
        returned; anything else comes back as a new array."""
        comm_lib._check_root(root, self.num_replicas_in_sync)
        target = value._array if isinstance(value, Variable) else \
            np.array(value, order="C", copy=True)
        name = value.name if isinstance(value, Variable) else None
        self._check_same_layout(target, what, name)
        self.communicator.bcast_(target, root=root, what=what)
        return value if isinstance(value, Variable) else target

    def barrier(self) -> None:
        """Wait until every replica arrives (bounded by the collective deadline)."""
        self.communicator.barrier("strategy.barrier")

    def agree_steps(self, local_steps: int) -> int:
        """The number of steps every replica can take: the minimum over replicas."""
        steps = np.array([check_number("local_steps", local_steps, low=0)], dtype=np.int64)
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

    def _check_same_layout(self, array: np.ndarray, what: str, name: str | None = None) -> None:
        if self.communicator.size == 1:
            return
        signature = [(name, array.shape, array.dtype.str)]
        agree_or_raise(self.communicator, signature, signature_hash(signature), what,
                       lambda item: f"{item[0] or 'value'} shape {item[1]} "
                                    f"{np.dtype(item[2]).name}")

    def check_replicas(self, variables: Any, optimizer: Any = None,
                       repair: bool = False) -> list[str]:
        """Prove every replica holds bitwise the same variables (and optimizer state).

        Each rank hashes every mirrored variable (and, with ``optimizer``, its
        ``iterations`` and slots); one ``Allreduce(BOR)`` of the hashes and their
        complements finds the variables that differ anywhere. Rank-local
        (``synchronization=NONE``) variables are skipped.

        Returns:
            The names of the variables that differed and were repaired (``repair``),
            else an empty list.

        Raises:
            ReplicaDivergenceError: replicas differ and ``repair`` is False; the
                message names each variable and the ranks that differ from rank 0.
        """
        items = list(variables) + (list(optimizer.weights) if optimizer is not None else [])
        items = [v for v in items if route_of(v) != "local"]
        if self.communicator.size == 1 or not items:
            return []
        digests = np.stack([np.frombuffer(hashlib.blake2b(
            np.ascontiguousarray(v._array).reshape(-1).view(np.uint8), digest_size=8).digest(),
            dtype=np.uint8) for v in items])
        buffer = np.concatenate([digests, ~digests], axis=1)
        self.communicator.allreduce_(buffer, "bor", what="replica check")
        differs = ~(np.all(buffer[:, :8] == digests, axis=1)
                    & np.all(buffer[:, 8:] == ~digests, axis=1))
        if not differs.any():
            return []
        everyone = self.communicator.allgather_object(
            [d.tobytes().hex() for d in digests[differs]])
        names = [v.name for v, bad in zip(items, differs, strict=True) if bad]
        details = []
        for column, name in enumerate(names):
            ranks = [r for r, row in enumerate(everyone) if row[column] != everyone[0][column]]
            details.append(f"{name!r}: ranks {ranks} differ from rank 0")
        if not repair:
            raise ReplicaDivergenceError(f"replicas diverged in {len(names)} "
                                         f"variable{'s' if len(names) > 1 else ''}: "
                                         + "; ".join(details))
        for var, bad in zip(items, differs, strict=True):
            if bad:
                self.broadcast(var, root=0, what=f"repair of {var.name!r}")
        warnings.warn("replicas diverged and were repaired from rank 0: " + "; ".join(details),
                      stacklevel=2)
        return names

    def _any_replica(self, flag: bool, what: str) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if self.communicator.size == 1:
            return bool(flag)
        value = np.array([1 if flag else 0], dtype=np.uint8)
        self.communicator.allreduce_(value, "max", what=what)
        return bool(value[0])

    # --- used by the optimizer -----------------------------------------------------------
    def _after_apply(self, optimizer: Any, variables: list[Variable]) -> None:
        self._applied_steps += 1
        every = self.check_replicas_every_steps
        if every and self._applied_steps % every == 0:
            self.check_replicas(variables, optimizer, repair=self.repair_replicas)

    def _gradient_aggregator(self) -> GradientAggregator:
        """The aggregation layer of this strategy (made on first use)."""
        if self._aggregator is None:
            self._aggregator = GradientAggregator(
                self.communicator, fusion_threshold_bytes=self.fusion_threshold_bytes,
                sparse_as_dense=self.sparse_as_dense, compression=self.compression,
                chunk_bytes=self.allreduce_chunk_bytes)
        return self._aggregator

    def _aggregate_gradients(self, pairs: list[tuple[Any, Variable]],
                             step: int | None = None) -> list[Any]:
        """Every pair's gradient aggregated across replicas (see ``GradientAggregator``)."""
        return self._gradient_aggregator().aggregate([g for g, _ in pairs],
                                                     [v for _, v in pairs], step)

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
        allreduce_chunk_bytes: large reductions go in chunks of this many bytes.
            ``"auto"`` (default): 4 MiB, except that an aggregation keeping all its
            results (steps that clip by norm or skip non-finite gradients) between two
            ranks times 4 and 16 MiB on its first 16 calls and keeps the faster; the
            bits cannot change (see ``GradientAggregator``).
        sparse_as_dense: densify sparse gradients instead of gathering them.
        compression: ``"bfloat16"``: summed float32 gradients travel as bfloat16
            (opt-in, lossy; see :class:`Strategy`); ``None``: exactly.
        check_replicas_every_steps: run :meth:`check_replicas` on the updated
            variables and optimizer state every this many steps (0: never).
        repair_replicas: with the periodic check, re-broadcast rank 0's values
            instead of raising :class:`ReplicaDivergenceError`.
        timeout_seconds: deadline of every collective (default ``DISTSGD_TIMEOUT``
            or 600 s); a peer that does not arrive raises ``CollectiveTimeoutError``.
        abort_on_exception: an unhandled exception on any rank prints its traceback
            and aborts the whole job (``MPI_Abort``) instead of leaving peers blocked.
    """

    def __init__(self, comm: Any = None, *,
                 fusion_threshold_bytes: int = DEFAULT_FUSION_THRESHOLD_BYTES,
                 allreduce_chunk_bytes: int | str = AUTO,
                 sparse_as_dense: bool = False, check_replicas_every_steps: int = 0,
                 repair_replicas: bool = False, timeout_seconds: float | None = None,
                 abort_on_exception: bool = True, compression: str | None = None) -> None:
        super().__init__(None, fusion_threshold_bytes=fusion_threshold_bytes,
                         sparse_as_dense=sparse_as_dense, compression=compression,
                         check_replicas_every_steps=check_replicas_every_steps,
                         repair_replicas=repair_replicas)
        expected = f"{AUTO!r} or a number of bytes >= 1"
        if isinstance(allreduce_chunk_bytes, str):
            if allreduce_chunk_bytes != AUTO:
                raise ValueError(f"allreduce_chunk_bytes={allreduce_chunk_bytes!r}; "
                                 f"expected {expected}")
        else:
            check_number("allreduce_chunk_bytes", allreduce_chunk_bytes, low=1, what=expected)
            allreduce_chunk_bytes = int(allreduce_chunk_bytes)
        if timeout_seconds is not None:
            check_number("timeout_seconds", timeout_seconds, low=1e-3)
        self._comm = comm
        self.allreduce_chunk_bytes = allreduce_chunk_bytes
        self.timeout_seconds = timeout_seconds
        self.abort_on_exception = abort_on_exception

    def _make_communicator(self) -> Any:
        if self._comm is None and not comm_lib.launched_by_mpi():
            return comm_lib.SerialCommunicator()
        try:
            communicator = comm_lib.MPICommunicator(
                # "auto": the aggregation sizes its messages; none is cut again
                self._comm, chunk_bytes=max(AUTO_CHUNK_CANDIDATES_BYTES)
                if self.allreduce_chunk_bytes == AUTO else self.allreduce_chunk_bytes,
                timeout_seconds=self.timeout_seconds)
        except ImportError:
            if self._comm is not None:
                raise
            return comm_lib.SerialCommunicator()
        if self.abort_on_exception and communicator.size > 1:
            comm_lib.install_abort_on_exception(communicator)
        return communicator


_DEFAULT = Strategy()


def get_strategy() -> Strategy:
    """The strategy whose ``scope()`` is active in this thread, else the default one."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _DEFAULT

