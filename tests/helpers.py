"""Shared test helpers: state snapshots and TF's comparison tolerance."""

from __future__ import annotations

import numpy as np

import distsgd

FLOAT_DTYPES = [np.float16, np.float32, np.float64]


def tolerance(dtype) -> dict:
    """assertAllCloseAccordingToType: 1e-6, relaxed to 1e-3 for float16."""
    return {"rtol": 1e-3, "atol": 1e-3} if np.dtype(dtype) == np.float16 else \
        {"rtol": 1e-6, "atol": 1e-6}


def snapshot(optimizer, variables) -> list:
    """Everything an update could change: variables, optimizer weights and slot names."""
    return ([v.numpy() for v in variables] + [w.numpy() for w in optimizer.weights]
            + [list(optimizer.get_slot_names()), len(optimizer.weights)])


def assert_same_state(before, after) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


def variables(*values, dtype=np.float32):
    return [distsgd.Variable(np.array(v, dtype=dtype), name=f"var{i}")
            for i, v in enumerate(values)]
