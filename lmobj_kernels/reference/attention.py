"""Reference attention with the masks of ALGORITHMS.md ("Attention masks").

Plain PyTorch, computed in float32 (or float64 for float64 inputs: the tests' truth), differentiable by autograd.
It materialises the (B, Hq, Sq, Sk) scores: for checking, not for speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmobj_kernels.reference.corruption import STREAM_ATTN_DROPOUT, philox4x32_10_torch

_DROPOUT_CHUNK = 1 << 20  # Philox temporaries are int64: the keep mask is drawn ~this many blocks at a time


class SoftCap(torch.autograd.Function):
    """c * tanh(s / c), differentiated as sech^2(s / c) = 4w / (1 + w)^2 with w = exp(-2|s / c|): autograd's own
    chain through `c * tanh(s / c)` multiplies the gradient by c first (inf for c ~ 1e38 in float32, then NaN), and
    1 - tanh^2 cancels once the scores saturate (40% off at |s / c| ~ 6 in float32)."""

    @staticmethod
    def forward(ctx, s: Tensor, c: float) -> Tensor:
        y = s / c
        ctx.save_for_backward(y)
        return c * torch.tanh(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        w = torch.exp(-2 * y.abs())
        return grad * (4 * w / (1 + w) ** 2), None


def attention_mask(
    batch: int,
    sq: int,
    sk: int,
    *,
    causal: bool = False,
    prefix_lens: Tensor | None = None,
    doc_ids: Tensor | None = None,
    kv_lens: Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    kv_doc_ids: Tensor | None = None,
    prefix_mask: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Boolean (B, Sq, Sk): True where query i may attend to key j. All of these must hold:
    j < kv_lens[b]; doc_ids[b, i] == kv_doc_ids[b, j] (kv_doc_ids None: doc_ids[b, j], self-attention);
    causal: j <= i or j < prefix_lens[b], or with prefix_mask (B, S) (t5x's decoder_causal_attention, per token):
    j <= i or both i and j are flagged; window (left, right): i - left <= j <= i + right (None: that side
    unbounded)."""
    if kv_doc_ids is not None and doc_ids is None:
        raise ValueError("kv_doc_ids (the keys' documents) needs doc_ids (the queries' documents)")
    i = torch.arange(sq, device=device).view(1, sq, 1)
    j = torch.arange(sk, device=device).view(1, 1, sk)
    allowed = torch.ones(batch, sq, sk, dtype=torch.bool, device=device)
    # in place on the fresh mask: one (B, Sq, Sk) temporary at a time (the torch backend builds this every call)
    if kv_lens is not None:
        allowed &= j < kv_lens.to(device).view(batch, 1, 1)
    if doc_ids is not None:
        keys = doc_ids if kv_doc_ids is None else kv_doc_ids
        allowed &= doc_ids.view(batch, sq, 1) == keys.view(batch, 1, sk)
    if causal:
        rule = j <= i
        if prefix_lens is not None:
            rule = rule | (j < prefix_lens.to(device).view(batch, 1, 1))
        if prefix_mask is not None:
            pm = prefix_mask.to(device=device, dtype=torch.bool)
            rule = rule | (pm.view(batch, sq, 1) & pm.view(batch, 1, sk))
        allowed &= rule
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
    return allowed


def alibi_bias(slopes: Tensor, batch: int, heads: int, sq: int, sk: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Tensor:
    """(B, H, Sq, Sk) ALiBi bias -slopes[b, h] * |i + Sk - Sq - j|: FlashAttention's `alibi_slopes`, the distance
    measured with the last query aligned to the last key (so |i - j| when Sq == Sk). slopes: (H,) or (B, H)."""
    i = torch.arange(sq, device=device, dtype=torch.int64).view(sq, 1)
    j = torch.arange(sk, device=device, dtype=torch.int64).view(1, sk)
    dist = (i + (sk - sq) - j).abs().to(torch.float64 if dtype == torch.float64 else torch.float32)
    bias = -slopes.to(device=device, dtype=dist.dtype).expand(batch, heads).view(batch, heads, 1, 1) * dist
    return bias.to(dtype)


def dropout_threshold(p: float) -> int:
    """The uint32 threshold of a dropout probability p in [0, 1): an entry is dropped when its draw < it."""
    return min(round(p * 2**32), 2**32 - 1)


def dropout_keep(seed: Tensor | int, batch: int, heads: int, sq: int, sk: int, p: float,
                 device: torch.device | str = "cpu") -> Tensor:
    """Boolean (B, H, Sq, Sk): True where attention dropout keeps weight (b, h, i, j) (the definition every backend
    matches bit for bit). Draw u = word j % 4 of Philox4x32-10 (key = seed, as the corruption ops') at counter
    (j // 4, i, b * H + h, stream 6); the entry is dropped when u < round(p * 2^32). So an entry's fate depends on
    the seed and its (b, h, i, j) only, not on the sequence lengths or the masks."""
    t = dropout_threshold(p)
    B, H = batch, heads
    keep = torch.empty(B * H, sq, sk, dtype=torch.bool, device=device)
    if keep.numel() == 0:
        return keep.view(B, H, sq, sk)
    nb = (sk + 3) // 4
    blocks = torch.arange(nb, device=device).view(1, 1, nb)  # one Philox block serves 4 keys
    q_step = max(1, min(sq, _DROPOUT_CHUNK // nb))  # chunks of (rows, queries) with ~_DROPOUT_CHUNK blocks
    r_step = max(1, _DROPOUT_CHUNK // (q_step * nb))
    for r0 in range(0, B * H, r_step):
        rows = torch.arange(r0, min(r0 + r_step, B * H), device=device).view(-1, 1, 1)
        for i0 in range(0, sq, q_step):
            i = torch.arange(i0, min(i0 + q_step, sq), device=device).view(1, -1, 1)
            words = philox4x32_10_torch(seed, blocks, i, rows, STREAM_ATTN_DROPOUT)
            u = torch.stack(words, dim=-1).flatten(-2)[..., :sk]  # key j: word j % 4 of block j // 4
            keep[r0:r0 + r_step, i0:i0 + q_step] = u >= t
    return keep.view(B, H, sq, sk)


@torch.library.custom_op("lmobj::attn_dropout_keep", mutates_args=())
def _dropout_keep_op(seed: Tensor, batch: int, heads: int, sq: int, sk: int, p: float) -> Tensor:
    """`dropout_keep` as an op, so that torch.compile runs it rather than tracing the Philox rounds: with a seed
    that is a constant of the graph (an int seed) Inductor tried to fold all ten rounds and never finished."""
    return dropout_keep(seed, batch, heads, sq, sk, p, device=seed.device)


@_dropout_keep_op.register_fake
def _(seed, batch, heads, sq, sk, p):
    return seed.new_empty((batch, heads, sq, sk), dtype=torch.bool)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    prefix_lens: Tensor | None = None,
    doc_ids: Tensor | None = None,
    kv_lens: Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    seed: Tensor | int | None = None,
    alibi_slopes: Tensor | None = None,
    kv_doc_ids: Tensor | None = None,
    prefix_mask: Tensor | None = None,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Sq, D) in q's dtype, lse (B, Hq, Sq) float32/float64).

    Grouped-query attention repeats each of k's Hkv heads Hq / Hkv times. softcap c: scores c * tanh(s / c) of the
    scaled scores s. alibi_slopes (Hq,) or (B, Hq): ALiBi, -slope * |i + Sk - Sq - j| added to the (capped) scores
    of query i and key j (`alibi_bias`). dropout_p > 0 (needs `seed`): the
    softmax weights kept by `dropout_keep` are scaled by 1 / (1 - dropout_p), the others zeroed (lse is of the
    undropped scores, as FlashAttention's). A query row with no allowed key gives
    zeros and lse = -inf, and gradients of zero (never NaN). upcast=False computes in the inputs' own precision
    (the "plain PyTorch in the same precision" yardstick of DESIGN.md's low-precision rule). kv_doc_ids (B, Sk):
    the keys' documents when they are not the queries' (packed cross attention; `attention_mask`). prefix_mask
    (B, S): per-token prefix flags (`attention_mask`)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else (torch.float32 if upcast else q.dtype)
    scale = D**-0.5 if scale is None else scale
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if softcap is not None:  # Gemma 2's attention logit soft-capping
        s = SoftCap.apply(s, softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, B, Hq, Sq, Sk, dtype=ct, device=q.device)
    allowed = attention_mask(B, Sq, Sk, causal=causal, prefix_lens=prefix_lens, doc_ids=doc_ids, kv_lens=kv_lens,
                             window=window, kv_doc_ids=kv_doc_ids, prefix_mask=prefix_mask,
                             device=q.device).unsqueeze(1)
    nonempty = allowed.any(dim=-1, keepdim=True)  # (B, 1, Sq, 1)
    # Empty rows get finite scores (all allowed) and are zeroed afterwards, so no -inf - -inf reaches exp or its
    # gradient: their output and every gradient through them is exactly 0.
    s = s.masked_fill(~(allowed | ~nonempty), float("-inf"))
    p = torch.softmax(s, dim=-1) * nonempty
    lse = torch.logsumexp(s, dim=-1).masked_fill(~nonempty.squeeze(-1), float("-inf"))
    if dropout_p > 0:
        if seed is None:
            raise ValueError("dropout_p > 0 needs a seed")
        seed_t = seed if isinstance(seed, Tensor) else torch.tensor(seed, dtype=torch.int64)
        keep = _dropout_keep_op(seed_t.to(q.device), B, Hq, Sq, Sk, float(dropout_p))
        p = p * keep * (1.0 / (1.0 - dropout_p))
    out = torch.matmul(p, v.to(ct))
    return out.to(q.dtype), lse
