"""distsgd: tf.keras's SGD (OptimizerV2 API) for numpy, replicated across MPI ranks.

Importing distsgd never initialises MPI.
"""

from distsgd import distribute, optimizers
from distsgd.accumulation import GradientAccumulator
from distsgd.gradients import GradientBuffer, gradients, value_and_gradients
from distsgd.indexed_slices import IndexedSlices
from distsgd.variables import Variable, VariableAggregation, VariableSynchronization

__all__ = [
    "GradientAccumulator",
    "GradientBuffer",
    "IndexedSlices",
    "Variable",
    "VariableAggregation",
    "VariableSynchronization",
    "__version__",
    "distribute",
    "gradients",
    "optimizers",
    "value_and_gradients",
]
__version__ = "0.1.0"
