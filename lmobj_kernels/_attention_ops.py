"""Op registration of the attention family (layers in the style of quack: ops -> autograd -> functional API).

Triton ops `lmobj::attn_fwd_triton` (out, lse) and `lmobj::attn_bwd_triton` (dq, dk, dv): torch.library custom
ops over triton_kernels/attention.py, each with a fake, and autograd on the forward that calls the backward op.
window_left / window_right: the sliding window's bounds, -1 for an unbounded side; softcap: 0.0 for none;
dropout_p: 0.0 for none, else `seed` (int64 [1]) keys the Philox draws, which the backward regenerates;
prefix_lens: None, the prefix lengths (B,), or the prefix flags (B, S) of `attention(prefix_mask=)` (bool or
int); alibi_slopes: None, or float32 (B, Hq) contiguous (no gradient); kv_doc_ids: None (the keys share doc_ids,
self-attention), or the keys' documents (B, Sk) (packed cross attention; doc_ids are then the queries'). The two
default to None, so callers of the ops written before them keep working. The ops trust their arguments' shapes
and ranges: `attention()` checks them.
So torch.compile(fullgraph=True) traces through them and torch.library.opcheck checks them.
"""

from __future__ import annotations

from typing import Optional  # torch.library infers op schemas from these annotations

import torch
from torch import Tensor

from lmobj_kernels._backend import triton_module


@torch.library.custom_op("lmobj::attn_fwd_triton", mutates_args=())
def attn_fwd_triton(q: Tensor, k: Tensor, v: Tensor, prefix_lens: Optional[Tensor],  # noqa: UP045
                    doc_ids: Optional[Tensor], kv_lens: Optional[Tensor],  # noqa: UP045
                    causal: bool, window_left: int, window_right: int, scale: float,
                    softcap: float, dropout_p: float, seed: Optional[Tensor],  # noqa: UP045
                    alibi_slopes: Optional[Tensor] = None, kv_doc_ids: Optional[Tensor] = None  # noqa: UP045
                    ) -> tuple[Tensor, Tensor]:
    return triton_module("attention").attention_forward(q, k, v, prefix_lens, doc_ids, kv_lens, causal,
                                                        window_left, window_right, scale, softcap, dropout_p, seed,
                                                        alibi_slopes, kv_doc_ids)


@attn_fwd_triton.register_fake
def _(q, k, v, prefix_lens, doc_ids, kv_lens, causal, window_left, window_right, scale, softcap, dropout_p, seed,
      alibi_slopes=None, kv_doc_ids=None):
    B, Hq, Sq, D = q.shape
    return q.new_empty((B, Hq, Sq, D)), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@torch.library.custom_op("lmobj::attn_bwd_triton", mutates_args=())
def attn_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    prefix_lens: Optional[Tensor], doc_ids: Optional[Tensor],  # noqa: UP045
                    kv_lens: Optional[Tensor],  # noqa: UP045
                    causal: bool, window_left: int, window_right: int, scale: float, softcap: float,
                    dropout_p: float, seed: Optional[Tensor], alibi_slopes: Optional[Tensor] = None,  # noqa: UP045
                    kv_doc_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:  # noqa: UP045
    return triton_module("attention").attention_backward(grad_out, q, k, v, out, lse, prefix_lens, doc_ids,
                                                         kv_lens, causal, window_left, window_right, scale, softcap,
                                                         dropout_p, seed, alibi_slopes, kv_doc_ids)


@attn_bwd_triton.register_fake
def _(grad_out, q, k, v, out, lse, prefix_lens, doc_ids, kv_lens, causal, window_left, window_right, scale, softcap,
      dropout_p, seed, alibi_slopes=None, kv_doc_ids=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    (q, k, v, prefix_lens, doc_ids, kv_lens, causal, window_left, window_right, scale, softcap, dropout_p, seed,
     alibi_slopes, kv_doc_ids) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, prefix_lens, doc_ids, kv_lens, seed, alibi_slopes, kv_doc_ids)
    ctx.causal, ctx.window, ctx.scale, ctx.softcap = causal, (window_left, window_right), scale, softcap
    ctx.dropout_p = dropout_p


def _backward(ctx, grad_out, _grad_lse):  # lse is returned detached by the public API
    q, k, v, out, lse, prefix_lens, doc_ids, kv_lens, seed, alibi_slopes, kv_doc_ids = ctx.saved_tensors
    dq, dk, dv = attn_bwd_triton(grad_out.contiguous(), q, k, v, out, lse, prefix_lens, doc_ids, kv_lens,
                                 ctx.causal, *ctx.window, ctx.scale, ctx.softcap, ctx.dropout_p, seed, alibi_slopes,
                                 kv_doc_ids)
    return dq, dk, dv, *([None] * 12)


attn_fwd_triton.register_autograd(_backward, setup_context=_setup)
