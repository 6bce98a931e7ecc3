"""Small calls of every CUDA op, for `compute-sanitizer` (run by gpu_check.sh): odd sizes, unaligned rows,
ignored and shifted targets, each dtype. Exits non-zero if a result is non-finite where it must be finite."""

from __future__ import annotations

import sys

import torch

import lmobj_kernels as L


def losses() -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, v in ((1, 7), (5, 41), (3, 4097)):
            x = torch.randn(n, v + 1, generator=g)[:, :v].to("cuda", dtype).requires_grad_()  # unaligned rows
            t = torch.randint(0, v, (n,), generator=g).cuda()
            t[0] = -100
            for cap in (None, 3.0):
                loss = L.cross_entropy(x, t, backend="cuda", softcap=cap, label_smoothing=0.1, reduction="none")
                (gx,) = torch.autograd.grad(loss.sum(), x)
                assert torch.isfinite(loss).all() and torch.isfinite(gx).all()
        h = torch.randn(2, 9, 16, generator=g).to("cuda", dtype).requires_grad_()
        w = torch.randn(41, 16, generator=g).to("cuda", dtype).requires_grad_()
        y = torch.randint(0, 41, (2, 9), generator=g).cuda()
        loss = L.causal_lm_loss(h, w, y, backend="cuda", chunk_size=5)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    torch.cuda.synchronize()


def corruption() -> None:
    import os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_corruption

    bench_corruption.sanitize_case()


CASES = {"losses": losses, "corruption": corruption}


def main() -> int:
    names = sys.argv[1:] or list(CASES)
    for name in names:
        if name in CASES:
            CASES[name]()
            print(f"sanitize case {name}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
