"""Launch on the device of the data: Triton launches on the current CUDA device and its stream, so a launcher
called with tensors on another GPU (cuda:1 while cuda:0 is current) would hand one device's pointers to a kernel
on the other. `on_data_device` makes the first tensor argument's device current for the call."""

from __future__ import annotations

import functools

import torch


def on_data_device(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or not t.is_cuda or t.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)

    return run
