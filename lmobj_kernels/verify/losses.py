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
        bias = (torch.randn(v, generator=gen) * 0.1).to(device=dev, dtype=dtype).requires_grad_()
        y = torch.randint(0, v, h.shape[:-1], generator=gen).to(dev)
        masked = y.clone()
        masked[torch.rand(y.shape, generator=gen).to(dev) >= 0.15] = -100
        shape = f"{tuple(h.shape)}x{v}"
        yield from _linear_op("causal_lm_loss",
                              lambda t, y=y, **kw: L.causal_lm_loss(t[0], t[1], y, chunk_size=64, **kw),
                              (h, w), backends, dtype, shape, (("", {}), ("[low_memory]", {"low_memory": True})))
        yield from _linear_op("linear_cross_entropy",
                              lambda t, y=y, **kw: L.linear_cross_entropy(t[0], t[1], y, bias=t[2], z_loss=1e-3,
                                                                          softcap=30.0, chunk_size=48, **kw),
                              (h, w, bias), backends, dtype, shape)
        yield from _linear_op("masked_lm_loss",
                              lambda t, m=masked, **kw: L.masked_lm_loss(t[0], t[1], m, bias=t[2], **kw),
                              (h, w, bias), backends, dtype, shape, (("", {}), ("[max_predictions]",
                                                                            {"max_predictions": h.shape[1]})))
        yield from _linear_op("seq2seq_lm_loss",
                              lambda t, m=masked, s=d**-0.5, **kw: L.seq2seq_lm_loss(t[0], t[1], m, hidden_scale=s,
                                                                                  label_smoothing=0.1, **kw),
                              (h, w), backends, dtype, shape)


def _linear_op(op, call, tensors, backends, dtype, shape, variants=(("", {}),)):
    """Rows of one linear loss: call(tensors, backend=..., **variant) on each kernel backend against the torch
    backend in float64 (the truth), with the torch backend in `dtype` as plain PyTorch's yardstick."""
    t64 = [t.detach().double().requires_grad_() for t in tensors]
    ref = call(t64, backend="torch")
    rg = torch.autograd.grad(ref, t64)
    plain = call(list(tensors), backend="torch")
    pg = torch.autograd.grad(plain, tensors)
    # the loss compared row by row (the max over rows; one scalar's error against another's is a coin toss)
    ref_rows = call(t64, backend="torch", reduction="none").detach()
    plain_rows = call(list(tensors), backend="torch", reduction="none").detach()
    for b in backends:
        for tag, kw in variants:
            out = call(list(tensors), backend=b, **kw)
            og = torch.autograd.grad(out, tensors)
            rows = call(list(tensors), backend=b, reduction="none", **kw).detach()
            yield _row(op + tag, b, dtype, shape, float((rows.double() - ref_rows).abs().max()),
                       lowp_bound(ref_rows, plain_rows))
            for name, o, r, p in zip(("d_hidden", "d_weight", "d_bias"), og, rg, pg):
                bound = lowp_bound(r, p, factor=grad_factor(b, dtype), floor=1e-6 + interpreter_ulp(r, b, dtype))
                yield _row(f"{op}{tag}.{name}", b, dtype, shape, float((o.double() - r).abs().max()), bound)
