"""A multi-layer perceptron written with autograd.numpy against distsgd Variables."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import autograd.numpy as anp
import numpy as np

import distsgd

__all__ = ["MLP"]


class MLP:
    """``relu(x W1 + b1) ... W_out + b_out`` with a softmax cross-entropy loss.

    Weights use He initialisation from ``seed``; create the model inside
    ``strategy.scope()`` so every replica starts from rank 0's weights.
    """

    def __init__(self, layer_sizes: Sequence[int], seed: int = 0,
                 dtype: Any = np.float32) -> None:
        rng = np.random.default_rng([seed, 2024])
        self.variables: list[distsgd.Variable] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(layer_sizes)):
            scale = np.sqrt(2.0 / fan_in)
            self.variables.append(distsgd.Variable(
                (rng.standard_normal((fan_in, fan_out)) * scale).astype(dtype),
                name=f"dense_{i}/kernel"))
            self.variables.append(distsgd.Variable(np.zeros(fan_out, dtype),
                                                   name=f"dense_{i}/bias"))

    @property
    def num_parameters(self) -> int:
        return sum(v.size for v in self.variables)

    def logits(self, x: Any) -> Any:
        hidden = x
        pairs = list(zip(self.variables[::2], self.variables[1::2], strict=True))
        for kernel, bias in pairs[:-1]:
            hidden = anp.maximum(anp.dot(hidden, kernel) + bias, 0.0)
        kernel, bias = pairs[-1]
        return anp.dot(hidden, kernel) + bias

    def summed_loss(self, x: np.ndarray, y: np.ndarray) -> Any:
        """Sum over the examples of the softmax cross-entropy (divide by the global batch)."""
        logits = self.logits(x)
        shifted = logits - anp.max(logits, axis=1, keepdims=True)
        log_probs = shifted - anp.log(anp.sum(anp.exp(shifted), axis=1, keepdims=True))
        return -anp.sum(log_probs[np.arange(len(y)), y])

    def correct(self, x: np.ndarray, y: np.ndarray) -> int:
        """How many examples the model classifies correctly."""
        return int(np.sum(np.argmax(np.asarray(self.logits(x)), axis=1) == y))
