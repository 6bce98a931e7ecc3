"""Builds lmobj_kernels._C from csrc/: the C++ CPU kernels always, the CUDA kernels when CUDA is there.

CUDA is built when torch is a CUDA build and nvcc is found, or when FORCE_CUDA=1 (an error without nvcc).
LMOBJ_NO_CUDA=1 skips it (quick CPU-only development builds). Architectures: TORCH_CUDA_ARCH_LIST (default 8.0;9.0).
"""

import glob
import os
import platform
import shutil

from setuptools import setup

# The /usr/local/bin/nvcc wrapper makes torch guess CUDA_HOME=/usr/local, which has no CUDA headers.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if force and not nvcc:
        raise RuntimeError("FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME to the CUDA toolkit)")
    if os.environ.get("LMOBJ_NO_CUDA", "0") == "1":
        return False
    return force or (torch.version.cuda is not None and nvcc)


def _extension():
    if os.environ.get("LMOBJ_SKIP_EXT") == "1":  # the Makefile's editable install; `build_ext --inplace` builds _C
        return None
    with_cuda = _want_cuda()
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    sources = [rel(p) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    sources += [rel(p) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # -fno-trapping-math -fno-math-errno let gcc vectorise the exp loops (nothing here reads FP flags or errno);
    # the C++ standard comes from torch (C++20 for 2.14)
    # -fopenmp: at::parallel_for runs its range on one thread unless the extension itself is built with OpenMP
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    if platform.machine() in ("x86_64", "AMD64"):
        cxx += ["-mavx2", "-mfma"]  # the CPU kernels' inner loops auto-vectorise with these
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else ""
    define = [("LMOBJ_WITH_CUDA", "1" if with_cuda else "0"), ("LMOBJ_CUDA_ARCHS", f'"{archs}"'),
              ("LMOBJ_TORCH_VERSION", f'"{torch.__version__}"')]
    include = [os.path.join(ROOT, "csrc")]
    print(f"[lmobj setup] torch {torch.__version__} (cuda {torch.version.cuda}), CUDA_HOME={CUDA_HOME}, "
          f"build CUDA: {with_cuda}, archs: {os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else '-'}, "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}")
    if not with_cuda:
        return CppExtension("lmobj_kernels._C", sources, include_dirs=include, define_macros=define,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    sources += [rel(p) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))]
    sources += [rel(p) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
    # no --use_fast_math: it turns tanhf into tanh.approx (2^-11 error); kernels use __expf explicitly where it pays
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension("lmobj_kernels._C", sources, include_dirs=include, define_macros=define,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[e for e in [_extension()] if e is not None],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    package_dir={"lmobj_kernels": "lmobj_kernels", "lmobj_kernels.triton_kernels": "triton_kernels"},
    packages=["lmobj_kernels", "lmobj_kernels.reference", "lmobj_kernels.train", "lmobj_kernels.verify",
              "lmobj_kernels.triton_kernels"],
)
