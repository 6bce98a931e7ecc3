"""Block-size sweep of the Triton attention kernels (issue 4: the `_CONFIGS` table of triton_kernels/attention.py
holds FlashAttention-2 / Triton-tutorial starting points, never tuned on a card).

For each kernel (fwd, dkdv, dq) and head dim (128, then 64), each candidate (BLOCK_M, BLOCK_N, num_warps,
num_stages) replaces that kernel's table entry while the other kernels keep theirs. The forward is timed for fwd,
the whole backward (delta, dK/dV, dQ) for dkdv and dq, at 2 x (2048 / D) x 8192 x D, causal, bfloat16; each
candidate's output or gradients are checked against the table's before it is timed (a wrong or failing candidate
is reported and skipped). Prints TFLOP/s per candidate (mask-aware FLOPs, ALGORITHMS.md; backward 2.5x forward)
and, per kernel and head dim, the fastest entry as a `_CONFIGS` line for this card's architecture.

  python benchmarks/bench_attention_tune.py --gpu     ~3 min on an H100 (one compile per candidate)
  python benchmarks/bench_attention_tune.py --quick   CPU interpreter, two candidates at a tiny size (smoke test)
Results: a table and benchmarks/results/attention_tune-<machine>-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys

if "--quick" in sys.argv[1:]:  # before triton is imported: its kernels run under the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, time_cpu, time_gpu, write_results  # noqa: E402

import lmobj_kernels as L  # noqa: E402

# Candidates per (kernel, head-dim bucket), the table's own entry added first. Kept to six or so each: every one is
# a compile. Shapes the published Hopper kernels use (FA2 Triton, the Triton tutorial, FlexAttention's defaults).
CANDIDATES = {
    ("fwd", 128): [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                   (128, 128, 8, 3)],
    ("fwd", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3),
                  (128, 64, 4, 4)],
    ("dkdv", 128): [(64, 128, 8, 2), (32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2),
                    (32, 64, 4, 2)],
    ("dkdv", 64): [(32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 4, 3), (32, 64, 4, 3), (128, 128, 8, 2),
                   (64, 64, 4, 3)],
    ("dq", 128): [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2),
                  (128, 32, 4, 3)],
    ("dq", 64): [(128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                 (128, 128, 8, 2)],
}
QUICK = [(32, 16, 4, 1), (16, 32, 4, 1)]


def _sweep(kernel: str, D: int, device: torch.device, quick: bool) -> list[dict]:
    from lmobj_kernels.triton_kernels import attention as A

    S = 64 if quick else 8192
    H = 2 if quick else 2048 // D
    B = 1 if quick else 2
    dtype = torch.float32 if quick else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, S, D, generator=gen).to(device, dtype) for _ in range(4))
    fwd_flops = 4 * B * H * S * S * D * (S + 1) / (2 * S)
    default = A.config(kernel, D, device)
    cands = QUICK if quick else [default] + [c for c in CANDIDATES[(kernel, D)] if c != default]
    orig = A.config
    timer = time_cpu if quick else time_gpu

    def run(with_grad: bool):
        if kernel == "fwd":
            return (L.attention(q, k, v, causal=True, backend="triton"),)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = L.attention(qq, kk, vv, causal=True, backend="triton")
        if not with_grad:
            return out, qq, kk, vv
        return torch.autograd.grad(out, (qq, kk, vv), do)

    rows, want = [], None
    for cand in cands:
        A.config = lambda kern, d, dev, cand=cand: cand if kern == kernel else orig(kern, d, dev)
        A._FITTED.clear()  # else the launcher reuses the config that ran first, whatever config() now says
        try:
            got = run(True)
            ran = {k[0]: v for k, v in A._FITTED.items()}.get(kernel, cand)
            if ran != cand:  # the card refused it: the launcher fell back (triton_kernels/attention.py)
                print(f"  {kernel} D={D} {cand}: n/a (does not fit; the launcher fell back to {ran})")
                continue
            ref = want if want is not None else got
            err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))
                      for a, b in zip(got, ref))
            if not err < 2e-2:  # relative to the largest value; block order alone changes bf16 results ~1e-3
                print(f"  {kernel} D={D} {cand}: disagrees with the table's config (rel err {err:.3g}); skipped")
                continue
            want = ref
            if kernel == "fwd":
                t, flops = timer(lambda: run(False)), fwd_flops
            else:
                out, *ins = run(False)
                t = timer(lambda o=out, ins=ins: torch.autograd.grad(o, ins, do, retain_graph=True))
                flops = 2.5 * fwd_flops
        except Exception as e:  # out of shared memory / registers for this block shape
            print(f"  {kernel} D={D} {cand}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        finally:
            A.config = orig
            A._FITTED.clear()
        tag = " (table)" if cand == default else ""
        print(f"  {kernel:5s} D={D:3d} {str(cand):18s} {t * 1e3:8.3f} ms {flops / t / 1e12:7.1f} TFLOP/s{tag}",
              flush=True)
        rows.append({"bench": f"attention_{kernel}", "backend": f"triton {cand}{tag}",
                     "shape": f"{B}x{H}x{S}x{D} causal", "metric": "tflops", "value": flops / t / 1e12,
                     "unit": "TFLOP/s", "config": list(cand), "kernel": kernel, "head_dim": D})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="sweep on the GPU (bf16, S=8192)")
    ap.add_argument("--quick", action="store_true", help="CPU interpreter smoke run")
    ap.add_argument("--out", default=None, help="folder for the JSON result")
    args = ap.parse_args(argv)
    if args.gpu == args.quick:
        ap.error("pass exactly one of --gpu and --quick")
    device = torch.device("cpu" if args.quick else "cuda")
    rows = []
    for D in ((32,) if args.quick else (128, 64)):
        for kernel in ("fwd", "dkdv", "dq"):
            rows += _sweep(kernel, D, device, args.quick)
    print(table(rows, ["bench", "shape", "backend", "value", "unit"]))
    if not args.quick:
        from lmobj_kernels.triton_kernels.attention import _arch

        arch = _arch(torch.cuda.current_device())
        print(f"\nfastest per kernel and head dim on {torch.cuda.get_device_name()} (paste into _CONFIGS):")
        for (kernel, D) in sorted({(r["kernel"], r["head_dim"]) for r in rows}):
            best = max((r for r in rows if (r["kernel"], r["head_dim"]) == (kernel, D)), key=lambda r: r["value"])
            print(f"    ({kernel!r}, {arch!r}, {D}): {tuple(best['config'])},  # {best['value']:.0f} TFLOP/s")
    path = write_results("attention_tune" + ("-quick" if args.quick else ""), rows, where=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
