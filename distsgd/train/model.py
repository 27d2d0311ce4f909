"""A multi-layer perceptron written with autograd.numpy against distsgd Variables."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
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

    def loss_and_gradients(self, x: np.ndarray, y: np.ndarray, scale: float,
                           out: distsgd.GradientBuffer,
                           ready: Callable[[int], None] | None = None) -> float:
        """``scale * summed_loss(x, y)`` and its gradients, written into ``out`` by an
        explicit backward pass (matrix products at BLAS speed, without autograd's
        per-operation costs), layer by layer from the last: ``ready(i)`` is called as soon
        as variable ``i``'s gradient is complete (what an overlapped reduction waits for).

        The same math as autograd on :meth:`summed_loss`, in float32; the bits may differ
        (another order of the same operations).
        """
        kernels = [v.value() for v in self.variables[::2]]
        biases = [v.value() for v in self.variables[1::2]]
        inputs, hidden = [], np.asarray(x, dtype=kernels[0].dtype)
        for kernel, bias in zip(kernels[:-1], biases[:-1], strict=True):
            inputs.append(hidden)
            hidden = np.matmul(hidden, kernel)
            hidden += bias
            np.maximum(hidden, 0, out=hidden)  # relu, in place: its output is its mask
        inputs.append(hidden)
        logits = np.matmul(hidden, kernels[-1])
        logits += biases[-1]
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        totals = probabilities.sum(axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = float(np.sum(np.log(totals[:, 0]) - logits[rows, y], dtype=np.float64)) * scale
        # d(loss)/d(logits) = scale * (softmax - one-hot)
        probabilities /= totals
        probabilities[rows, y] -= 1
        delta = probabilities
        delta *= delta.dtype.type(scale)
        grads = out.grads
        for layer in range(len(kernels) - 1, -1, -1):
            np.matmul(inputs[layer].T, delta, out=grads[2 * layer])
            np.sum(delta, axis=0, out=grads[2 * layer + 1])
            if ready is not None:
                ready(2 * layer)
                ready(2 * layer + 1)
            if layer:
                delta = np.matmul(delta, kernels[layer].T)
                delta *= inputs[layer] > 0  # relu's gradient
        out.missing = frozenset()
        return loss

    def correct(self, x: np.ndarray, y: np.ndarray) -> int:
        """How many examples the model classifies correctly."""
        return int(np.sum(np.argmax(np.asarray(self.logits(x)), axis=1) == y))
