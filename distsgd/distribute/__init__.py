"""Data-parallel training across MPI ranks (tf.distribute vocabulary)."""

from distsgd.distribute.aggregation import MismatchError
from distsgd.distribute.comm import CollectiveTimeoutError
from distsgd.distribute.data import ShardedBatches, replica_share
from distsgd.distribute.strategy import (
    MPIStrategy,
    ReduceOp,
    ReplicaDivergenceError,
    Strategy,
    get_strategy,
)

__all__ = [
    "CollectiveTimeoutError",
    "MPIStrategy",
    "MismatchError",
    "ReduceOp",
    "ReplicaDivergenceError",
    "ShardedBatches",
    "Strategy",
    "get_strategy",
    "replica_share",
]
