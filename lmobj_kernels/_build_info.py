"""What the package was built with and which backends can run here (and why not)."""

from __future__ import annotations

import torch

from lmobj_kernels._backend import _C, BACKENDS, _C_error, why_unavailable


def build_info() -> dict:
    """torch/CUDA versions built against, compiled CUDA architectures, and each backend's availability here."""
    info: dict = {"torch_runtime": torch.__version__, "cuda_runtime": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if _C() is not None:
        built = _C().build_info()
        info.update(torch_built=built["torch_version_built"], with_cuda=built["with_cuda"],
                    cuda_archs=built["cuda_archs"].split(";") if built["cuda_archs"] else [])
    else:
        info.update(torch_built=None, with_cuda=False, cuda_archs=[], extension_error=_C_error())
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    info["backends"] = {
        dev.type: {b: (why_unavailable(b, dev) or "available") for b in BACKENDS} for dev in devices
    }
    if not torch.cuda.is_available():
        info["backends"]["cuda"] = {b: "no CUDA GPU visible" for b in BACKENDS if b != "torch"}
    return info
