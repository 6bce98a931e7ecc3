"""Backend choice and availability: `cuda` (csrc/cuda), `triton` (triton_kernels), `cpu` (csrc/cpu), `torch` (reference).

`backend="auto"` (or the LMOBJ_BACKEND environment variable) picks, for CUDA tensors, the backend the benchmarks
measured fastest for that op (FASTEST_ON_GPU), and for CPU tensors the C++ CPU kernel, else the reference.
Asking for a backend that cannot run raises an error that says why.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")

# Which backend `auto` uses on a GPU, per op family, from the GPU benchmarks (benchmarks/results/).
FASTEST_ON_GPU: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("cuda", "triton", "torch"),
    "linear_cross_entropy": ("cuda", "triton", "torch"),
    "attention": ("triton", "torch"),
}


@functools.lru_cache(maxsize=None)
def _C():
    """The compiled extension, or None with the reason in `_C_error()`."""
    try:
        return importlib.import_module("lmobj_kernels._C")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _C_error() -> str:
    try:
        importlib.import_module("lmobj_kernels._C")
        return ""
    except ImportError as e:  # pragma: no cover - depends on the install
        return f"the compiled extension lmobj_kernels._C could not be imported ({e}); build it with `make build`"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_error() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    return ""


def why_unavailable(backend: str, device: torch.device) -> str:
    """Empty string when `backend` can run on tensors of `device`, else the reason it cannot."""
    if backend == "torch":
        return ""
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, these are on {device}"
        return _C_error()
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        if _C() is None:
            return _C_error()
        if not _C().build_info()["with_cuda"]:
            return "lmobj_kernels was built without CUDA (rebuild with nvcc on PATH or FORCE_CUDA=1)"
        return ""
    if backend == "triton":
        err = _triton_error()
        if err:
            return err
        if device.type == "cuda":
            return ""
        if device.type == "cpu" and triton_interpret():
            return ""
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), these are on {device}"
    return f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}"


def resolve(backend: str, device: torch.device, family: str) -> str:
    """The backend that will run `family` on `device` for the caller's `backend` argument."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("LMOBJ_BACKEND", "auto") or "auto"
    if backend == "auto":
        if device.type == "cuda":
            order = FASTEST_ON_GPU.get(family, ("cuda", "triton", "torch"))
        else:
            order = ("cpu", "torch")
        for name in order:
            if not why_unavailable(name, device):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    reason = why_unavailable(backend, device)
    if reason:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return backend


def available_backends(device: torch.device) -> list[str]:
    return [b for b in BACKENDS if not why_unavailable(b, device)]


def triton_module(name: str):
    """Import lmobj_kernels.triton_kernels.<name> lazily, so that TRITON_INTERPRET set by tests is honoured."""
    return importlib.import_module(f"lmobj_kernels.triton_kernels.{name}")
