"""Builds the real csrc/cuda/*.cu kernels for the CPU against tests/cuda_emu/emu.h (see there), as a shared
library for ctypes. The two CUDA-only constructs g++ cannot read are rewritten in a copy of each source:
`kernel<<<grid, block, smem, stream>>>(args);` becomes `lmobj_emu::launch(kernel, grid, block, smem, stream,
[&] { kernel(args); });` and `extern __shared__ __align__(n) unsigned char name[];` a pointer to the block's
dynamic shared memory, and a static `__shared__ T name[N];` a static array registered with the shim (which
poisons it before each block). Every occurrence must be rewritten, or the build fails (a new construct needs a
rule here).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SOURCES = ("cross_entropy.cu", "corruption.cu")

_LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(([^;]*?)\);", re.S)
_DYN_SMEM = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];")
_STATIC_SMEM = re.compile(r"__shared__ ([A-Za-z_][\w:]*) (\w+)\[([^\]]+)\];")


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (for the host-usable cuda_runtime_api.h, cuda_bf16.h), or None."""
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_bf16.h").is_file():
            return Path(base) / "include"
    return None


def why_unavailable() -> str | None:
    if cuda_include() is None:
        return "no CUDA toolkit headers (CUDA_HOME/include/cuda_bf16.h)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler"
    return None


def rewrite(text: str, name: str) -> str:
    """`text` of csrc/cuda/`name` with launches and dynamic shared memory in emulator form."""
    out, n = _LAUNCH.subn(lambda m: f"::lmobj_emu::launch({m[1]}, {m[2]}, [&] {{ {m[1]}({m[3]}); }});", text)
    out = _DYN_SMEM.sub(r"unsigned char* \1 = ::lmobj_emu::dynamic_smem();", out)
    out = _STATIC_SMEM.sub(r"static \1 \2[\3]; static ::lmobj_emu::SharedArray \2_shared_reg(\2, sizeof \2);", out)
    if "<<<" in out or "__shared__" in out or n == 0:
        raise RuntimeError(f"csrc/cuda/{name}: a kernel launch or shared-memory declaration the emulator build "
                           f"does not know how to rewrite (tests/cuda_emu/build.py)")
    return out


def _compile(out_dir: Path, target: Path, flags: list[str], extra: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    srcs = []
    for name in SOURCES:
        dst = out_dir / (Path(name).stem + "_emu.cpp")
        dst.write_text(rewrite((ROOT / "csrc" / "cuda" / name).read_text(), name))
        srcs.append(str(dst))
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
           *flags, "-include", str(HERE / "emu.h"), f"-I{ROOT / 'csrc'}", f"-I{cuda_include()}", *srcs,
           str(HERE / "api.cpp"), *extra, "-o", str(target)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
    return target


def build(out_dir: Path) -> ctypes.CDLL:
    """The emulated launchers as a shared library (tests/cuda_emu/api.cpp's entry points)."""
    return ctypes.CDLL(str(_compile(out_dir, out_dir / "libcuda_emu.so", ["-O1", "-shared", "-fPIC"], [])))


def build_driver(out_dir: Path, sanitize: str) -> Path:
    """race_driver.cpp with -fsanitize=`sanitize` ("thread", or "address,undefined,alignment")."""
    return _compile(out_dir, out_dir / "race_driver", ["-O1", "-g", f"-fsanitize={sanitize}",
                                                      "-fno-sanitize-recover=all"], [str(HERE / "race_driver.cpp")])
