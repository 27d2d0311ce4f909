"""Data-parallel training across MPI ranks (tf.distribute vocabulary)."""

from distsgd.distribute.aggregation import GradientAggregator, Reduction, StepPlan
from distsgd.distribute.comm import CollectiveTimeoutError, MismatchError
from distsgd.distribute.data import ShardedBatches, replica_share
from distsgd.distribute.layout import Route, route_of
from distsgd.distribute.replicas import ReplicaDivergenceError, state_digest
from distsgd.distribute.strategy import (
    MPIStrategy,
    ReduceOp,
    Strategy,
    get_strategy,
    has_strategy,
    strategy_of,
)

__all__ = [
    "CollectiveTimeoutError",
    "GradientAggregator",
    "MPIStrategy",
    "MismatchError",
    "ReduceOp",
    "Reduction",
    "ReplicaDivergenceError",
    "Route",
    "ShardedBatches",
    "StepPlan",
    "Strategy",
    "get_strategy",
    "has_strategy",
    "replica_share",
    "route_of",
    "state_digest",
    "strategy_of",
]
