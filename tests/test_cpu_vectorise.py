"""The CPU kernels' hot loops vectorise: the per-element math helpers (fast_expf, fast_tanhf, Philox) must be
inlined into them. When gcc stopped inlining fast_expf (a third kernel used it), every exp loop became a scalar
call and cross_entropy on the CPU ran 3x slower with every test still green. This compiles the kernel files with
the extension's flags and gcc's vectoriser report, and fails on a call to one of our helpers left in a loop."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp

ROOT = os.path.join(os.path.dirname(__file__), "..")
pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs g++ on x86-64 (the flags of setup.py)")


@pytest.mark.parametrize("name", ["cross_entropy", "corruption"])
def test_helpers_are_inlined_into_the_loops(name, tmp_path):
    src = os.path.join(ROOT, "csrc", "cpu", f"{name}.cpp")
    includes = [f"-I{p}" for p in cpp.include_paths()] + [f"-I{sysconfig.get_paths()['include']}",
                                                          f"-I{os.path.join(ROOT, 'csrc')}"]
    cmd = ["g++", "-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-mavx2", "-mfma", "-std=c++20",
           "-fPIC", *includes, "-c", src, "-o", str(tmp_path / "k.o"), "-fopt-info-vec-missed"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    calls = [line for line in res.stderr.splitlines()
             if "clobbers memory" in line and any(f"lmobj::{f}" in line for f in ("fast_expf", "fast_tanhf", "philox"))]
    assert not calls, "helpers called, not inlined, inside loops:\n" + "\n".join(calls[:5])
