"""Data-parallel training across MPI ranks (tf.distribute vocabulary)."""

from distsgd.distribute.strategy import get_strategy

__all__ = ["get_strategy"]
