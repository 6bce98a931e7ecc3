"""Verify rows for the attention family: every mask on every backend that runs here, forward and gradients,
against the float64 reference with DESIGN.md's low-precision rule."""

from __future__ import annotations

import torch

import lmobj_kernels as L
from lmobj_kernels._backend import available_backends
from lmobj_kernels.attention import _document_prefixes
from lmobj_kernels.reference import attention as ref
from lmobj_kernels.verify import lowp_bound, rule_floor


def _row(op, backend, dtype, shape, err, bound):
    return {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "shape": shape,
            "max_err": err, "bound": bound, "ok": bool(err <= bound)}


def _masks(B, Hq, S, gen):
    prefix = torch.randint(0, S + 1, (B,), generator=gen)
    kv = torch.randint(1, S + 1, (B,), generator=gen)
    docs = torch.sort(torch.randint(0, 4, (B, S), generator=gen), dim=1).values
    return {
        "causal": dict(causal=True),
        "prefix_lm": dict(causal=True, prefix_lens=prefix),
        "padding": dict(kv_lens=kv),
        "docs_causal": dict(causal=True, doc_ids=docs),
        "docs_padding": dict(doc_ids=docs, kv_lens=kv),
        "sliding_window": dict(causal=True, window=(S // 5, None)),
        "local_padding": dict(window=(S // 7, S // 9), kv_lens=kv),
        "softcap": dict(causal=True, window=(S // 3, None), softcap=1.0),
        "dropout_padding": dict(kv_lens=kv, dropout_p=0.1, seed=int(torch.randint(0, 2**62, (1,), generator=gen))),
        "alibi_causal": dict(causal=True, alibi_slopes=L.alibi_slopes(Hq)),
        # a packed prefix LM: each document's first third of tokens is its prefix (t5x's decoder_causal_attention)
        "prefix_per_doc": dict(causal=True, doc_ids=docs,
                               prefix_mask=_document_prefixes(docs, torch.ones(B, dtype=torch.long), 3)),
    }


def _cross_masks(B, S, Sk, gen):
    """Packed cross attention (a packed encoder-decoder): the queries' and the keys' documents, and key padding."""
    docs = torch.sort(torch.randint(0, 4, (B, S), generator=gen), dim=1).values
    kv_docs = torch.sort(torch.randint(0, 4, (B, Sk), generator=gen), dim=1).values
    kv = torch.randint(1, Sk + 1, (B,), generator=gen)
    return {"cross_docs": dict(doc_ids=docs, kv_doc_ids=kv_docs, kv_lens=kv)}


def cases(device: str = "cpu"):
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(torch.seed() % (2**31))
    on_gpu = dev.type == "cuda"
    # on the CPU: torch, and the Triton kernel when TRITON_INTERPRET=1 (`lmobj verify --triton-interpret`)
    backends = [b for b in available_backends(dev) if b in ("triton", "torch")]
    dtypes = [torch.bfloat16, torch.float16] if on_gpu else [torch.float32]
    B, Hq, Hkv, S, D = (2, 8, 2, 1000, 128) if on_gpu else (2, 4, 2, 77, 32)
    Sk = S * 3 // 2 + 5  # cross attention's keys

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dtype).requires_grad_()

    for dtype in dtypes:
        q, k, v = rnd(B, Hq, S, D, dtype=dtype), rnd(B, Hkv, S, D, dtype=dtype), rnd(B, Hkv, S, D, dtype=dtype)
        kc, vc = rnd(B, Hkv, Sk, D, dtype=dtype), rnd(B, Hkv, Sk, D, dtype=dtype)
        do = torch.randn(B, Hq, S, D, generator=gen).to(device=dev, dtype=dtype)
        masks = [(name, opts, k, v) for name, opts in _masks(B, Hq, S, gen).items()]
        masks += [(name, opts, kc, vc) for name, opts in _cross_masks(B, S, Sk, gen).items()]
        for mask_name, opts, keys, values in masks:
            opts = {n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in opts.items()}
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, keys, values))
            r, _ = ref.attention(q64, k64, v64, **opts)
            rg = torch.autograd.grad(r, (q64, k64, v64), do.double())
            p, _ = ref.attention(q, keys, values, upcast=False, **opts)
            pg = torch.autograd.grad(p, (q, keys, values), do)
            shape = f"{B}x{Hq}/{Hkv}x{S}x{D}" + (f" (Sk {keys.shape[2]})" if keys.shape[2] != S else "")
            for b in backends:
                o = L.attention(q, keys, values, backend=b, **opts)
                og = torch.autograd.grad(o, (q, keys, values), do)
                err = float((o.detach().double() - r.detach()).abs().max())
                yield _row(f"attention[{mask_name}]", b, dtype, shape, err,
                           lowp_bound(r.detach(), p.detach(), floor=rule_floor(r, dtype, b)))
                for gname, a, rr, pp in zip(("dq", "dk", "dv"), og, rg, pg):
                    yield _row(f"attention[{mask_name}].{gname}", b, dtype, shape, float((a.double() - rr).abs().max()),
                               lowp_bound(rr, pp, factor=3.0, floor=rule_floor(rr, dtype, b)))
