"""Every Triton kernel, compiled for sm80, sm86 and sm90 at the sizes and block configs of a real run, fits its
card: compiles to a cubin, needs no more shared memory per block than the card has (the attention kernels'
fallback to smaller configs included) and launches a grid within CUDA's limits. No GPU needed: the kernels are
compiled, not run (benchmarks/triton_resources.py; --quick leaves out float32 attention, ~1 min of ptxas each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "triton_resources.py")


@pytest.mark.parametrize("triton_version", ["installed", "oldest"])
def test_every_kernel_fits_every_card(triton_version, tmp_path):
    """With the installed Triton and with the oldest supported one (3.6, what a GPU machine has: its front end
    refused code that 3.8 and the interpreter accepted; `make test` installs it in .venv/triton-3.6)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_version == "oldest":
        oldest = os.environ.get("LMOBJ_OLDEST_TRITON")
        if not oldest or not os.path.isdir(os.path.join(oldest, "triton")):
            pytest.skip("LMOBJ_OLDEST_TRITON names no folder with the oldest Triton (make test installs it)")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(oldest), env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    rows = json.load(open(next(tmp_path.glob("triton-resources-*.json"))))["rows"]
    seen = {(row["backend"], row["bench"]) for row in rows}
    for arch in ("sm80", "sm86", "sm90"):
        for kernel in ("attention/_attn_fwd_kernel", "attention/_attn_bwd_dkdv_kernel", "attention/_attn_bwd_dq_kernel",
                       "losses/_ce_fwd_kernel", "losses/_ce_grad_cols_kernel", "corruption/_span_kernel",
                       "corruption/_mlm_kernel"):
            assert (f"triton-{arch}", kernel) in seen, (arch, kernel)
    assert "B4096 H32" in r.stdout  # the B * H > 65535 case launched (a 1-D grid)
    if triton_version == "oldest":
        version = json.load(open(next(tmp_path.glob("triton-resources-*.json"))))["machine"]["triton"]
        assert version.startswith("3.6"), version
