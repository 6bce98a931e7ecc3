"""Verify rows for the corruption family: every kernel backend against the NumPy reference, byte for byte
(max_err = number of differing ids; bound 0)."""

from __future__ import annotations

import torch

import lmobj_kernels.corruption as C
from lmobj_kernels._backend import available_backends


def _row(op, backend, shape, diff):
    return {"op": op, "backend": backend, "dtype": "int64", "shape": shape, "max_err": float(diff), "bound": 0.0,
            "ok": bool(diff == 0)}


def _diff(outs, refs) -> int:
    return sum(int((o.cpu() != r).sum()) if o.shape == r.shape else o.numel() + r.numel() for o, r in zip(outs, refs))


def cases(device: str = "cpu"):
    dev = torch.device(device)
    seed = int(torch.seed() % (2**62))
    gen = torch.Generator().manual_seed(seed)
    backends = [b for b in available_backends(dev) if b != "torch"]
    if dev.type == "cpu" and "triton" in backends:
        B, S = 6, 41  # the interpreter is slow
    else:
        B, S = (37, 568) if dev.type == "cuda" else (16, 200)
    x = torch.randint(2, 30000, (B, S), generator=gen)
    lens = torch.randint(0, S + 1, (B,), generator=gen).tolist()
    lens[0] = S
    kw = dict(vocab_size=32100, eos_id=1, seed=seed, row_offset=3)
    ref = C.span_corrupt(x, lens, backend="torch", **kw)
    for b in backends:
        out = C.span_corrupt(x.to(dev), lens, backend=b, **kw)
        yield _row("span_corrupt", b, f"{B}x{S}", _diff(out, ref))
    words = torch.cumsum((torch.rand(B, S, generator=gen) < 0.5).long(), 1)
    for exact in (False, True):
        for w in (None, words):
            mkw = dict(mask_id=3, vocab_size=32100, special_ids=[101, 102], pad_id=0, exact=exact, seed=seed)
            ref = C.mlm_mask(x, word_ids=w, backend="torch", **mkw)
            for b in backends:
                out = C.mlm_mask(x.to(dev), word_ids=None if w is None else w.to(dev), backend=b, **mkw)
                name = "mlm_mask" + (".exact" if exact else "") + (".words" if w is not None else "")
                yield _row(name, b, f"{B}x{S}", _diff(out, ref))
