"""Backend choice and availability: `cuda` (csrc/cuda), `triton` (triton_kernels), `cpu` (csrc/cpu),
`torch` (reference/).

`backend="auto"` (or the LMOBJ_BACKEND environment variable) picks, for CUDA tensors, the backend the benchmarks
measured fastest for that op (FASTEST_ON_GPU), and for CPU tensors the C++ CPU kernel, else the reference.
Asking for a backend that cannot run raises an error that says why.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")

# Which backend `auto` uses on a GPU, per op family, from the GPU benchmarks (benchmarks/results/).
FASTEST_ON_GPU: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("cuda", "triton", "torch"),
    "linear_cross_entropy": ("cuda", "triton", "torch"),
    "corruption": ("cuda", "triton", "torch"),  # span_corrupt, mlm_mask: to confirm with bench_corruption --gpu
    "attention": ("triton", "torch"),
}


def _load_extension():
    try:
        return importlib.import_module("lmobj_kernels._C"), ""
    except ImportError as e:  # pragma: no cover - depends on the install
        return None, f"the compiled extension lmobj_kernels._C could not be imported ({e}); build it with `make build`"


def _triton_missing() -> str:
    return "" if importlib.util.find_spec("triton") is not None else "Triton is not installed"


def _version(package: str) -> tuple[int, ...]:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def _interpreter_error() -> str:
    """Why Triton's interpreter cannot run the kernels here, or "". Triton 3.6's interpreter turns a loaded scalar
    (a one-element array) into a loop bound with int(), which NumPy 2.4 refuses: every kernel whose loop bounds
    come from memory failed with "only 0-dimensional arrays can be converted" (3.7 squeezes the array first)."""
    triton, numpy = _version("triton"), _version("numpy")
    if triton and triton < (3, 7) and numpy >= (2, 4):
        return (f"Triton {'.'.join(map(str, triton))}'s interpreter needs NumPy < 2.4 (NumPy "
                f"{'.'.join(map(str, numpy))} is installed): pip install 'numpy<2.4', or Triton >= 3.7")
    return ""


# Resolved once at import, so that backend choice is plain Python data that torch.compile traces without breaks.
_EXT, _EXT_ERROR = _load_extension()
_WITH_CUDA = bool(_EXT is not None and _EXT.build_info()["with_cuda"])
_TRITON_ERROR = _triton_missing()
_INTERPRETER_ERROR = _interpreter_error()  # whether TRITON_INTERPRET is set is read per call, the versions here


def _C():
    """The compiled extension module, or None (the reason is in `_C_error()`)."""
    return _EXT


def _C_error() -> str:
    return _EXT_ERROR


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
        if _EXT is None:
            return _EXT_ERROR
        if not _WITH_CUDA:
            return "lmobj_kernels was built without CUDA (rebuild with nvcc on PATH or FORCE_CUDA=1)"
        return ""
    if backend == "triton":
        if _TRITON_ERROR:
            return _TRITON_ERROR
        if device.type == "cuda":
            return ""
        if device.type == "cpu" and triton_interpret():
            return _INTERPRETER_ERROR
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), these are on {device}"
    return f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}"


def check_backend_name(backend) -> None:
    """`backend` is "auto" or one of BACKENDS (a TypeError or ValueError naming the argument otherwise)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")


def resolve(backend: str, device: torch.device, family: str) -> str:
    """The backend that will run `family` on `device` for the caller's `backend` argument."""
    check_backend_name(backend)
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
    if backend not in BACKENDS:  # from LMOBJ_BACKEND (the argument was checked above)
        raise ValueError(f"LMOBJ_BACKEND must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    reason = why_unavailable(backend, device)
    if reason:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return backend


def available_backends(device: torch.device) -> list[str]:
    return [b for b in BACKENDS if not why_unavailable(b, device)]


def triton_module(name: str):
    """Import lmobj_kernels.triton_kernels.<name> lazily, so that TRITON_INTERPRET set by tests is honoured."""
    return importlib.import_module(f"lmobj_kernels.triton_kernels.{name}")
