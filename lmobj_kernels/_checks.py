"""Argument checks shared by the public API: what counts as a number and as a flag, the ranges the ops' int64 and
float32 arguments hold, and the inputs as autocast casts them."""

from __future__ import annotations

import numpy as np
import torch


def is_int(v) -> bool:
    """A Python or NumPy int; not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what an int argument of the ops (schema `int`) can hold


def fits_int64(v) -> bool:
    """An int (is_int) an op's int64 argument can hold."""
    return INT64_MIN <= v <= INT64_MAX


FLOAT32_MAX = float(np.finfo(np.float32).max)  # the kernels compute in float32: a larger option is inf there
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # a smaller softcap's 1 / c is inf in float32: NaN at a score of 0
_AUTOCAST_CAST = (torch.float16, torch.bfloat16, torch.float32)


def autocast_inputs(device_type: str, *tensors):
    """`tensors` as autocast casts the inputs of torch's lower-precision ops (F.linear, SDPA): float16, bfloat16
    and float32 to the autocast dtype, float64 and anything not a tensor as they are; unchanged with autocast off."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CAST else t for t in tensors)


def is_real(v) -> bool:
    """A Python or NumPy int or float; not a bool (True is an int to Python, not a smoothing or a scale)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")
