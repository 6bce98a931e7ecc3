"""What every Triton kernel costs a GPU at the sizes and block configs a real run uses, found without a GPU.

Each launcher in triton_kernels/ is called on fake CUDA tensors (FakeTensorMode) with a stand-in Triton driver
that reports a chosen architecture; each launch is compiled (Triton's own argument specialisation, then
TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) instead of run. Per kernel this reports the registers per thread,
the stack (register spills), the shared memory it needs at launch against the architecture's per-block limit,
and the launch grid against CUDA's limits (x < 2^31, y and z <= 65535). A launch over the shared-memory limit is
refused as Triton's loader refuses it (OutOfResources), so the attention kernels' fallback to smaller configs runs
as on such a card and the table shows the config that would launch. A kernel that does not compile for an
architecture, needs more shared memory than the card has or launches an impossible grid fails here, on the CPU,
instead of on the first GPU run. Registers and spills say where a config is tight; timing still needs a card.

    python benchmarks/triton_resources.py [--arch 80 86 90] [--quick | --full] [--out DIR]

Architectures: 90 (H100/H200), 80 (A100), 86 (A10, RTX 30xx, and like 89: L4, RTX 40xx; 99 KB of shared
memory, and the kernels take their sm80 configs there). `--quick` (CI) takes a few minutes on 2 cores with an
empty Triton cache, the default ~15 (float32 attention tiles take ptxas about a minute each); `--full` adds
float16 and more head dims. Needs Triton's bundled ptxas and cuobjdump (in every Triton wheel) and must run without
TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Per-block shared memory a kernel may use (the opt-in maximum: cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 90: 232448}
GRID_LIMIT = (2**31 - 1, 65535, 65535)


class _Driver:
    """The part of a Triton driver that compiling needs: a device, a stream and the target architecture."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch  # Triton caches binders and kernels per device: one "device" per architecture

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _mock(v):
    """Fake tensors have no storage: give Triton's specialisation a dtype and an aligned address instead."""
    from triton.runtime.jit import MockTensor

    return MockTensor(v.dtype, list(v.shape)) if isinstance(v, torch.Tensor) else v


@contextlib.contextmanager
def capture(arch: int):
    """Inside: Triton launches compile for `arch` and are recorded in the yielded list instead of running; CUDA
    tensors are fake (torch.empty(..., device="cuda") works without a GPU)."""
    from lmobj_kernels.triton_kernels import attention
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    launches: list[dict] = []
    orig_run, orig_arch = JITFunction.run, attention._arch

    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig_run(self, *map(_mock, args), grid=grid, warmup=True,
                          **{k: _mock(v) for k, v in kwargs.items()})
        if kernel.metadata.shared > SHARED_LIMIT[arch]:  # what Triton's loader does on such a card
            raise OutOfResources(kernel.metadata.shared, SHARED_LIMIT[arch], "shared memory")
        g = tuple(grid) + (1,) * (3 - len(grid))
        launches.append({"kernel": self.fn.__name__, "compiled": kernel, "grid": g,
                         "warps": kwargs.get("num_warps", 4), "stages": kwargs.get("num_stages", 3)})
        return kernel

    saved, saved_device = driver._active, torch.cuda.current_device
    driver.set_active(_Driver(arch))
    JITFunction.run = run
    torch.cuda.current_device = lambda: 0  # the fake tensors' device (the launchers' on_data_device asks)
    attention._arch = lambda device_index: "sm90" if arch >= 90 else "sm80"
    attention._FITTED.clear()  # configs fitted for another architecture
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield launches
    finally:
        JITFunction.run, attention._arch = orig_run, orig_arch
        driver._active, torch.cuda.current_device = saved, saved_device


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(compiled) -> dict:
    """Registers and stack bytes (from cuobjdump of the cubin) and the launch's shared memory (Triton's)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    reg, stack, static_shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack + local, "shared": compiled.metadata.shared + static_shared}


# ---- the launches of a real run, per family ----
def _attention_cases(size: str):
    dims = {"quick": (64, 128, 256), "default": (64, 96, 128, 256), "full": (64, 80, 96, 128, 200, 256)}[size]
    dtypes = (torch.bfloat16, torch.float32) + ((torch.float16,) if size == "full" else ())
    masks = {"causal": dict(causal=True), "all": dict(causal=True, prefix=True, kv=True, docs=True),
             "window": dict(causal=True, kv=True, window=(1023, 64)), "softcap": dict(causal=True, softcap=50.0),
             "padding": dict(kv=True), "dropout": dict(kv=True, dropout=0.1), "alibi": dict(causal=True, alibi=True),
             "prefix_mask": dict(causal=True, prefix_mask=True, docs=True)}
    for d in dims:
        for dt in dtypes:
            # float32 tiles are slow to compile (~1 min each on 2 cores: ptxas spills, and a card that refuses a
            # config compiles the next one too): quick (CI) leaves them to the default run
            if size == "quick" and dt == torch.float32:
                continue
            for mname, m in masks.items():
                if mname == "padding" and (size != "full" and d != 128 or size == "quick"):
                    continue
                if mname in ("dropout", "alibi", "prefix_mask") and size != "full" and d != 128:  # one head dim each
                    continue
                yield "attention", f"B2 H16 S8192 D{d} {str(dt)[6:]} {mname}", _attention(2, 16, 8192, d, dt, m)
    yield "attention", "B4096 H32 S128 D64 bf16 padding (B*H > 65535)", _attention(
        4096, 32, 128, 64, torch.bfloat16, dict(kv=True))


def _attention(B, H, S, D, dtype, m):
    def launch():
        from lmobj_kernels.triton_kernels import attention as A

        q, k, v, o, do = (torch.empty(B, H, S, D, dtype=dtype, device="cuda") for _ in range(5))
        lse = torch.empty(B, H, S, dtype=torch.float32, device="cuda")
        ints = lambda *shape: torch.empty(*shape, dtype=torch.int64, device="cuda")  # noqa: E731
        prefix, kv, docs = (ints(B) if m.get("prefix") else None, ints(B) if m.get("kv") else None,
                            ints(B, S) if m.get("docs") else None)
        if m.get("prefix_mask"):  # per-token prefix flags (B, S)
            prefix = torch.zeros(B, S, dtype=torch.bool, device="cuda")
        wl, wr = m.get("window", (-1, -1))
        cap, drop = m.get("softcap", 0.0), m.get("dropout", 0.0)
        seed = torch.zeros(1, dtype=torch.int64, device="cuda")
        slopes = torch.empty(B, H, dtype=torch.float32, device="cuda") if m.get("alibi") else None
        A.attention_forward(q, k, v, prefix, docs, kv, m.get("causal", False), wl, wr, D ** -0.5, cap, drop, seed,
                            slopes)
        A.attention_backward(do, q, k, v, o, lse, prefix, docs, kv, m.get("causal", False), wl, wr, D ** -0.5, cap,
                             drop, seed, slopes)
    return launch


def _loss_cases(size: str):
    heads = [(8192, 32000), (8192, 128256), (4096, 256000)] + ([(64, 50257), (8192, 151936)] if size == "full"
                                                               else [])
    for N, V in heads:
        for dt in (torch.bfloat16, torch.float32):
            yield "losses", f"N{N} V{V} {str(dt)[6:]}", _losses(N, V, dt)


def _losses(N, V, dtype):
    def launch():
        from lmobj_kernels.triton_kernels import cross_entropy as C

        x = torch.empty(N, V, dtype=dtype, device="cuda")
        t = torch.empty(N, dtype=torch.int64, device="cuda")
        loss, lse = C.ce_forward(x, t, 0, 0, -100, 0.1, 1e-4, 30.0, grad_inplace=True)
        C.ce_forward(x, t, 0, 512, -100, 0.0, 0.0, 0.0)  # no cap, no in-place gradient, causal shift
        C.ce_backward(torch.empty(N, device="cuda"), x, t, lse, 0, 0, -100, 0.1, 1e-4, 30.0)
        C.ce_backward(torch.empty(N, device="cuda"), x, t, lse, 0, 512, -100, 0.0, 0.0, 0.0)
        w = torch.empty(N, device="cuda")
        # narrow, not x[:, :4096]: a CPU-only torch refuses to index a fake CUDA tensor
        C.ce_grad_cols_(x.narrow(1, 0, 4096), t, lse, w, 0, V, 0.1, 1e-4, 30.0)
    return launch


def _corruption_cases(size: str):
    full = size == "full"
    for B, S in [(1024, 568), (256, 3000), (64, 8192)] + ([(16, 32768)] if full else []):
        yield "corruption", f"span B{B} S{S}", _span(B, S)
    for B, S in [(256, 512), (64, 8192)] + ([(16, 32768)] if full else []):
        for words in (False, True):
            for exact in (False, True):
                name = f"mlm B{B} S{S}" + (" words" if words else "") + (" exact" if exact else "")
                yield "corruption", name, _mlm(B, S, words, exact)


def _span(B, S):
    def launch():
        from lmobj_kernels.triton_kernels import corruption as K

        from lmobj_kernels.corruption import _fixed_plan_cached

        in_w, tg_w, _ = _fixed_plan_cached(S, 0.15, 3.0)
        x = torch.empty(B, S, dtype=torch.int64, device="cuda")
        i64 = lambda *s: torch.empty(*s, dtype=torch.int64, device="cuda")  # noqa: E731
        K.span_corrupt(x, i64(B), i64(1), 0, 0.15, 3.0, i64(100), 1, 0, -100, in_w, tg_w)
    return launch


def _mlm(B, S, words, exact):
    def launch():
        from lmobj_kernels.triton_kernels import corruption as K

        from lmobj_kernels.reference.corruption import rate_bits

        x = torch.empty(B, S, dtype=torch.int64, device="cuda")
        w = torch.empty(B, S, dtype=torch.int64, device="cuda") if words else None
        i64 = lambda *s: torch.empty(*s, dtype=torch.int64, device="cuda")  # noqa: E731
        select = rate_bits(0.15) if exact else 1 << 30  # exact: the float64 bits of the rate
        K.mlm_mask(x, w, i64(1), 0, i64(3), exact, select, 1 << 31, 3 << 30, 0, 30522, 103, -100)
    return launch


FAMILIES = {"attention": _attention_cases, "losses": _loss_cases, "corruption": _corruption_cases}


def check(arch: int, family: str, case: str, launch) -> list[dict]:
    """Compile the launches of one case for `arch`; a row per launched kernel, with `ok` and why not."""
    rows = []
    try:
        with capture(arch) as launches:
            launch()
    except Exception as e:  # a compile error: the case fails as a whole
        return [{"arch": f"sm{arch}", "family": family, "case": case, "kernel": "?", "ok": False,
                 "why": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}]
    for la in launches:
        r = resources(la["compiled"])
        why = []
        if r["shared"] > SHARED_LIMIT[arch]:
            why.append(f"shared {r['shared']} B > {SHARED_LIMIT[arch]} B")
        for axis, (n, lim) in enumerate(zip(la["grid"], GRID_LIMIT)):
            if n > lim:
                why.append(f"grid[{axis}] = {n} > {lim}")
        rows.append({"arch": f"sm{arch}", "family": family, "case": case, "kernel": la["kernel"],
                     "warps": la["warps"], "stages": la["stages"], **r, "grid": "x".join(map(str, la["grid"])),
                     "ok": not why, "why": "; ".join(why)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80, 86], choices=sorted(SHARED_LIMIT))
    ap.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--quick", action="store_true", help="the CI subset: no float32 attention")
    ap.add_argument("--full", action="store_true", help="float16 and more head dims, sizes and heads")
    ap.add_argument("--out", default=None, help="folder for the JSON result (default benchmarks/results)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")
    import common

    t0 = time.time()
    rows = []
    for arch in args.arch:
        for fam in args.family:
            size = "full" if args.full else ("quick" if args.quick else "default")
            for family, case, launch in FAMILIES[fam](size):
                t1 = time.time()
                rows.extend(check(arch, family, case, launch))
                print(f"  sm{arch} {case}: {time.time() - t1:.1f} s", file=sys.stderr, flush=True)
    # one row per distinct kernel variant and case; the worst of the same kernel in a case is what matters
    cols = ["arch", "family", "case", "kernel", "warps", "stages", "regs", "stack", "shared", "grid", "ok", "why"]
    print(common.table(rows, cols))
    bad = [r for r in rows if not r["ok"]]
    spills = [r for r in rows if r.get("stack", 0) > 0]
    print(f"\n{len(rows)} launches compiled in {time.time() - t0:.0f} s; {len(bad)} cannot run; "
          f"{len(spills)} spill registers (stack > 0)")
    out = [{"bench": f"{r['family']}/{r['kernel']}", "backend": f"triton-{r['arch']}", "shape": r["case"],
            "metric": m, "value": r[m], "unit": u} for r in rows if "regs" in r
           for m, u in (("regs", "registers"), ("stack", "bytes"), ("shared", "bytes"))]
    print("wrote", common.write_results("triton-resources-quick" if args.quick else "triton-resources", out, args.out))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
