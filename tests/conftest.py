"""Shared test helpers: backends that can run here, the low-precision rule, GPU marker handling."""

from __future__ import annotations

import os

import pytest
import torch

from lmobj_kernels import _backend
from lmobj_kernels._backend import available_backends
from lmobj_kernels.verify import grad_factor, lowp_bound

HAS_GPU = torch.cuda.is_available()


def pytest_configure(config):
    # TRITON_INTERPRET=1 asks for the Triton tests: an interpreter that cannot run here stops the run with the
    # reason, instead of skipping every Triton test as if the variable were unset
    if os.environ.get("TRITON_INTERPRET") == "1" and _backend._INTERPRETER_ERROR:
        raise pytest.UsageError(f"TRITON_INTERPRET=1, but {_backend._INTERPRETER_ERROR}")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def backends_here(device: str = "cpu", include_torch: bool = False) -> list[str]:
    """Kernel backends that run on `device` here: cpu (C++), triton (interpreted on CPU when TRITON_INTERPRET=1)."""
    names = available_backends(torch.device(device))
    return [b for b in names if include_torch or b != "torch"]


def bf16_grad_factor(backend: str) -> float:
    """The rule's gradient factor for bfloat16 results of `backend` here (lmobj_kernels.verify.grad_factor)."""
    return grad_factor(backend, torch.bfloat16)


def assert_lowp_close(out, ref64, plain, factor=2.0, floor=1e-6, what="output"):
    """DESIGN.md's rule: |out - ref64| <= factor * |plain - ref64| + floor (max norm), where `plain` is plain
    PyTorch in the same precision as `out`. NaN never passes."""
    out, ref64, plain = out.detach().double(), ref64.detach().double(), plain.detach().double()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = float((out - ref64).abs().max()) if out.numel() else 0.0
    bound = lowp_bound(ref64, plain, factor, floor)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g}"


@pytest.fixture
def gen():
    """A fresh seed per test (shown in the captured output of a failure; LMOBJ_TEST_SEED replays one)."""
    seed = int(os.environ.get("LMOBJ_TEST_SEED", torch.seed() % (2**31)))
    print(f"LMOBJ_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
