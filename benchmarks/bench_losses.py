"""Benchmarks of the cross-entropy family, side by side with the peers in one run.

CPU (default; each case in a fresh process, glibc mmap threshold fixed, so that peak memory = growth of max RSS over
the inputs):
  linear_cross_entropy N=4096 D=768 V=50257 fp32 fwd+bwd: ours vs eager (logits, F.cross_entropy) vs PyTorch's
    chunked F.linear_cross_entropy; masked_lm_loss B=32 S=512 D=768 V=30522 15% masked vs the way HF's
    BertForMaskedLM computes it (logits everywhere, CE with ignore_index); cross_entropy N=8192 V=32000 vs
    F.cross_entropy.
GPU (--gpu): the same ops at real sizes (bf16), and the Gemma-2 2B / Llama-3 LM heads against torch eager,
  torch.compile, F.linear_cross_entropy, Liger-Kernel and Cut Cross-Entropy when importable. Time: median of
  triton.testing.do_bench; memory: peak allocated minus the inputs.
--quick: tiny sizes (a smoke test runs this).
Prints a table and writes benchmarks/results/losses-<machine>-<date>.json (and a PNG of the GPU head timings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import lmobj_kernels as L  # noqa: E402


# ---- the contenders: each returns a closure doing forward + backward ----
def lin_case(impl: str, h, w, t, shift=False):
    def run():
        h.grad = w.grad = None
        if impl.startswith("lmobj-"):  # lmobj-<backend>[-lowmem]
            backend, _, low = impl[len("lmobj-"):].partition("-")
            loss = L.linear_cross_entropy(h, w, t, shift=shift, backend=backend, low_memory=low == "lowmem")
        elif impl == "torch-eager":
            loss = F.cross_entropy((h @ w.t()).float(), t)
        elif impl == "torch-compile":
            loss = _compiled_eager()(h, w, t)
        elif impl == "torch-chunked":
            loss = F.linear_cross_entropy(h, w, t, options=torch.nn.LinearCrossEntropyOptions())
        elif impl == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            loss = liger_fused_linear_cross_entropy(h, w, t)
        elif impl == "cce":
            from cut_cross_entropy import linear_cross_entropy as cce

            loss = cce(h, w, t)
        else:
            raise ValueError(impl)
        loss.backward()
        return loss

    return run


_COMPILED = {}


def _compiled_eager():
    if "f" not in _COMPILED:
        _COMPILED["f"] = torch.compile(lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t))
    return _COMPILED["f"]


def mlm_case(impl: str, h, w, labels):
    def run():
        h.grad = w.grad = None
        if impl == "hf-bert":  # BertForMaskedLM: logits at every position, CE with ignore_index
            logits = h @ w.t()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        else:
            loss = L.masked_lm_loss(h, w, labels, backend=impl[len("lmobj-"):])
        loss.backward()
        return loss

    return run


def ce_case(impl: str, x, t):
    def run():
        x.grad = None
        loss = F.cross_entropy(x, t) if impl == "torch" else L.cross_entropy(x, t, backend=impl[len("lmobj-"):])
        loss.backward()
        return loss

    return run


def make_inputs(bench: str, size: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """Inputs drawn on `device` itself: on the CPU, the ~1e9 normals of a GPU case took ~7 s each, about half the
    losses benchmark's time cap in gpu_check.sh."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    ints = lambda v, shape: torch.randint(0, v, shape, generator=g, device=device)  # noqa: E731
    if bench in ("linear_ce", "head"):
        n, d, v = size["N"], size["D"], size["V"]
        h = rand(n, d).to(dtype).requires_grad_()
        w = rand(v, d).div_(d**0.5).to(dtype).requires_grad_()
        return h, w, ints(v, (n,))
    if bench == "masked_lm":
        b, s, d, v = size["B"], size["S"], size["D"], size["V"]
        h = rand(b, s, d).to(dtype).requires_grad_()
        w = rand(v, d).div_(d**0.5).to(dtype).requires_grad_()
        labels = ints(v, (b, s))
        labels[torch.rand(b, s, generator=g, device=device) >= 0.15] = -100
        return h, w, labels
    n, v = size["N"], size["V"]
    x = rand(n, v).mul_(2).to(dtype).requires_grad_()
    return x, ints(v, (n,))


def closure(bench: str, impl: str, inputs):
    if bench in ("linear_ce", "head"):
        return lin_case(impl, *inputs)
    if bench == "masked_lm":
        return mlm_case(impl, *inputs)
    return ce_case(impl, *inputs)


# ---- CPU: one measurement per fresh process ----
CPU_SIZES = {
    "linear_ce": dict(N=4096, D=768, V=50257),
    "masked_lm": dict(B=32, S=512, D=768, V=30522),
    "cross_entropy": dict(N=8192, V=32000),
}
QUICK_SIZES = {
    "linear_ce": dict(N=256, D=64, V=2003),
    "masked_lm": dict(B=4, S=64, D=64, V=1001),
    "cross_entropy": dict(N=256, V=4001),
}
CPU_IMPLS = {
    "linear_ce": ["lmobj-cpu", "lmobj-cpu-lowmem", "torch-eager", "torch-chunked"],
    "masked_lm": ["lmobj-cpu", "hf-bert"],
    "cross_entropy": ["lmobj-cpu", "torch"],
}


# glibc serves an allocation below its mmap threshold from the heap and keeps it when freed, and it raises that
# threshold (up to 32 MB) each time a larger block is freed; a later buffer may then land beside the kept one, so the
# max RSS of the same run varied by 20-40 MB between processes (measured: 181-204 MB for one contender). A fixed
# threshold returns every large block on free: max RSS growth is then the high-water mark of live memory, for
# every contender alike (allocator caches inside the libraries, such as MKL's, still count).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_cpu_child(bench: str, impl: str, size: dict, repeat: int) -> dict:
    # Inputs are made without large temporaries: a freed temporary would raise max RSS before the base is read and
    # hide that much of the contender's own memory.
    closure(bench, impl, make_inputs(bench, QUICK_SIZES[bench], "cpu", torch.float32))()  # load libraries first
    inputs = make_inputs(bench, size, "cpu", torch.float32)
    base = common.max_rss_bytes()
    fn = closure(bench, impl, inputs)
    secs = common.time_cpu(fn, warmup=1, repeat=repeat)
    return {"seconds": secs, "peak_mb": (common.max_rss_bytes() - base) / 2**20}


def run_cpu(quick: bool) -> list[dict]:
    sizes = QUICK_SIZES if quick else CPU_SIZES
    rows = []
    for bench, impls in CPU_IMPLS.items():
        size = sizes[bench]
        for impl in impls:
            if impl == "torch-chunked" and not _available(impl):
                print(f"  {impl}: F.linear_cross_entropy not in torch {torch.__version__}, skipped")
                continue
            repeat = 1 if quick or bench == "masked_lm" else 3
            cmd = [sys.executable, __file__, "--child", json.dumps([bench, impl, size, repeat])]
            out = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV)
            if out.returncode != 0:
                print(f"  {bench}/{impl} failed:\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            shape = "x".join(f"{k}={v}" for k, v in size.items())
            rows.append({"bench": bench, "backend": impl, "shape": shape, "metric": "time", "value": r["seconds"],
                         "unit": "s"})
            rows.append({"bench": bench, "backend": impl, "shape": shape, "metric": "peak_mem", "value": r["peak_mb"],
                         "unit": "MB"})
    return rows


# ---- GPU ----
GPU_HEADS = {"gemma2-2b": dict(N=8192, D=2304, V=256000), "llama3": dict(N=8192, D=4096, V=128256)}


def _available(impl: str) -> bool:
    try:
        if impl == "liger":
            import liger_kernel  # noqa: F401
        elif impl == "cce":
            import cut_cross_entropy  # noqa: F401
        elif impl == "torch-chunked":
            return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    except Exception as e:  # noqa: BLE001 - any import failure means the peer is absent
        print(f"  {impl} unavailable: {e}")
        return False
    return True


def measure_gpu(bench: str, impl: str, size: dict, dtype: torch.dtype) -> dict | None:
    torch.cuda.empty_cache()
    inputs = make_inputs(bench, size, "cuda", dtype)
    fn = closure(bench, impl, inputs)
    try:
        fn()
        for t in inputs:  # peak = growth over the inputs alone: the gradients count
            if isinstance(t, torch.Tensor):
                t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        secs = common.time_gpu(fn)
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
        print(f"  {bench}/{impl} failed: {type(e).__name__}: {str(e)[:300]}")
        return None
    finally:
        del fn, inputs
    return {"seconds": secs, "peak_mb": peak / 2**20}


def run_gpu(quick: bool, full: bool = False, rows: list[dict] | None = None) -> list[dict]:
    """The GPU cases; each case's rows are appended to `rows` as soon as it is measured."""
    from lmobj_kernels import _loss_ops

    print(f"  dW accumulation through cuBLAS addmm(out_dtype=float32): {_loss_ops._addmm_out_dtype_works()}")
    rows = [] if rows is None else rows
    plan = [
        ("cross_entropy", dict(N=8192, V=128256), torch.bfloat16, ["lmobj-cuda", "lmobj-triton", "torch"]),
        ("cross_entropy", dict(N=8192, V=32000), torch.bfloat16, ["lmobj-cuda", "lmobj-triton", "torch"]),
        ("masked_lm", dict(B=32, S=512, D=768, V=30522), torch.bfloat16, ["lmobj-cuda", "lmobj-triton", "hf-bert"]),
    ]
    # torch.compile costs ~40 s of compilation per shape: only with --full (run 1 on an H200 measured it:
    # benchmarks/results/losses-gpu-H200-2026-11-27-run1.json)
    heads = ["lmobj-cuda", "lmobj-triton", "lmobj-cuda-lowmem", "lmobj-triton-lowmem", "torch-eager",
             "torch-chunked", "liger", "cce"] + (
        ["torch-compile"] if full else [])
    for size in GPU_HEADS.values():
        plan.insert(0, ("head", size, torch.bfloat16, [h for h in heads if _available(h)]))
    if quick:
        plan = [(b, {k: min(v, 4096) for k, v in s.items()}, dt, im) for b, s, dt, im in plan if b == "cross_entropy"]
    for bench, size, dtype, impls in plan:
        shape = "x".join(f"{k}={v}" for k, v in size.items())
        for impl in impls:
            r = measure_gpu(bench, impl, size, dtype)
            if r is None:
                continue
            extra = {}
            if bench == "head":  # 3 GEMMs of 2*N*D*V flops (fwd logits, dh, dW)
                extra = {"tflops": 6 * size["N"] * size["D"] * size["V"] / r["seconds"] / 1e12}
            elif bench == "cross_entropy":  # bytes: read logits twice, write grad once
                extra = {"GBps": 3 * size["N"] * size["V"] * 2 / r["seconds"] / 1e9}
            for metric, value, unit in [("time", r["seconds"] * 1e3, "ms"), ("peak_mem", r["peak_mb"], "MB")] + [
                (k, v, k) for k, v in extra.items()
            ]:
                rows.append({"bench": bench, "backend": impl, "shape": shape, "metric": metric, "value": value,
                             "unit": unit})
            print(f"  {bench:14s} {shape:28s} {impl:14s} {r['seconds'] * 1e3:9.3f} ms  {r['peak_mb']:9.1f} MB",
                  flush=True)
    return rows


def pivot(rows: list[dict]) -> list[dict]:
    """One line per (bench, shape, backend) with time, memory and the ratio to the first peer of that bench."""
    out: dict = {}
    for r in rows:
        key = (r["bench"], r["shape"], r["backend"])
        out.setdefault(key, {"bench": r["bench"], "shape": r["shape"], "backend": r["backend"]})
        out[key][f"{r['metric']} ({r['unit']})"] = r["value"]
    return list(out.values())


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    heads = [r for r in rows if r["bench"] == "head" and r["metric"] == "time"]
    if not heads:
        return
    shapes = sorted({r["shape"] for r in heads})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4))
    axes = axes if len(shapes) > 1 else [axes]
    for ax, shape in zip(axes, shapes):
        rs = [r for r in heads if r["shape"] == shape]
        ax.barh([r["backend"] for r in rs], [r["value"] for r in rs])
        ax.set_xlabel("forward + backward (ms)")
        ax.set_title(shape, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--full", action="store_true", help="with --gpu: torch.compile peers too (+~80 s)")
    p.add_argument("--out", default=common.RESULTS, help="folder for the JSON/PNG results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        bench, impl, size, repeat = json.loads(a.child)
        print(json.dumps(measure_cpu_child(bench, impl, size, repeat)))
        return 0
    if a.gpu and not torch.cuda.is_available():
        p.error("--gpu: no CUDA GPU visible")
    name = "losses-quick" if a.quick else "losses"
    rows: list[dict] = []
    if a.gpu:
        common.write_on_term(name, rows, a.out)
        run_gpu(a.quick, a.full, rows)
    else:
        rows = run_cpu(a.quick)
    table = pivot(rows)
    cols = ["bench", "shape", "backend"] + sorted({k for r in table for k in r} - {"bench", "shape", "backend"})
    print(common.table(table, cols))
    path = common.write_results(name, rows, a.out)
    print(f"wrote {path}")
    if a.gpu:
        plot(rows, path.replace(".json", ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
