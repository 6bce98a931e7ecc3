"""Argument checks shared by the public API: what counts as a number and as a flag."""

from __future__ import annotations

import numpy as np


def is_int(v) -> bool:
    """A Python or NumPy int; not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what an int argument of the ops (schema `int`) can hold


def fits_int64(v) -> bool:
    """An int (is_int) an op's int64 argument can hold."""
    return INT64_MIN <= v <= INT64_MAX


def is_real(v) -> bool:
    """A Python or NumPy int or float; not a bool (True is an int to Python, not a smoothing or a scale)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")
