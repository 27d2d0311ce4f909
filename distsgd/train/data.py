"""Datasets that need no download: scikit-learn's bundled digits, or synthetic data."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "digits", "synthetic"]


class Dataset(NamedTuple):
    """Train and test splits; features float32 in [0, 1]-ish, labels int64 classes."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int,
           num_classes: int, name: str) -> Dataset:
    order = np.random.default_rng([seed, 12345]).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], num_classes, name)


def digits(seed: int = 0) -> Dataset:
    """sklearn's 8x8 handwritten digits (1,797 images, 10 classes); 20% held out."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the digits dataset needs scikit-learn: pip install "
                         "'distsgd[examples]'") from None
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return _split(x, bunch.target.astype(np.int64), 0.2, seed, 10, "digits")


def synthetic(num_examples: int, num_features: int, num_classes: int, seed: int = 0) -> Dataset:
    """Gaussian features labelled by a random linear teacher (for scaling runs)."""
    rng = np.random.default_rng([seed, 777])
    x = rng.standard_normal((num_examples, num_features)).astype(np.float32)
    teacher = rng.standard_normal((num_features, num_classes)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int64)
    return _split(x, y, 0.1, seed, num_classes, "synthetic")
