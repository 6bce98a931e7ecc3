"""Verify rows for the cross-entropy family."""

from __future__ import annotations

import torch

import lmobj_kernels as L
from lmobj_kernels._backend import available_backends
from lmobj_kernels.verify import grad_factor, interpreter_ulp, lowp_bound


def _row(op, backend, dtype, shape, err, bound):
    return {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "shape": shape,
            "max_err": err, "bound": bound, "ok": bool(err <= bound)}


def cases(device: str = "cpu"):
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(torch.seed() % (2**31))
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if dev.type == "cuda" else [])
    backends = [b for b in available_backends(dev) if b != "torch"]
    for dtype in dtypes:
        n, v, d = (423, 4097, 64) if dev.type == "cuda" else (37, 1001, 32)
        logits = (torch.randn(n, v, generator=gen) * 3).to(device=dev, dtype=dtype)
        target = torch.randint(0, v, (n,), generator=gen).to(dev)
        target[::5] = -100
        ref = L.cross_entropy(logits.double(), target, reduction="none", label_smoothing=0.1, backend="torch")
        plain = L.cross_entropy(logits, target, reduction="none", label_smoothing=0.1, backend="torch")
        bound = lowp_bound(ref, plain.to(dtype))
        for b in backends:
            out = L.cross_entropy(logits, target, reduction="none", label_smoothing=0.1, backend=b)
            yield _row("cross_entropy", b, dtype, f"{n}x{v}", float((out.double() - ref).abs().max()), bound)

        h = torch.randn(2, n // 2 + 1, d, generator=gen).to(device=dev, dtype=dtype).requires_grad_()
        w = (torch.randn(v, d, generator=gen) / d**0.5).to(device=dev, dtype=dtype).requires_grad_()
        y = torch.randint(0, v, h.shape[:-1], generator=gen).to(dev)
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = L.causal_lm_loss(h64, w64, y, backend="torch")
        rg = torch.autograd.grad(ref, (h64, w64))
        plain = L.causal_lm_loss(h, w, y, backend="torch")
        pg = torch.autograd.grad(plain, (h, w))
        for b in backends:
            for low in (False, True):
                op = "causal_lm_loss" + ("[low_memory]" if low else "")
                out = L.causal_lm_loss(h, w, y, backend=b, chunk_size=64, low_memory=low)
                og = torch.autograd.grad(out, (h, w))
                err = abs(float(out.detach()) - float(ref.detach()))
                bound = lowp_bound(ref.detach(), plain.detach())
                yield _row(op, b, dtype, f"{tuple(h.shape)}x{v}", err, bound)
                for name, o, r, p in zip(("d_hidden", "d_weight"), og, rg, pg):
                    bound = lowp_bound(r, p, factor=grad_factor(b, dtype), floor=1e-6 + interpreter_ulp(r, b, dtype))
                    yield _row(f"{op}.{name}", b, dtype, f"{tuple(h.shape)}x{v}",
                               float((o.double() - r).abs().max()), bound)
