"""Triton attention with the masks of ALGORITHMS.md ("Attention masks"), FlashAttention-2 style.

Forward: one program per (query block, batch x query head); an online softmax (base 2) over the key blocks the mask
leaves, writing O and the log-sum-exp (natural log, float32). Backward: delta = rowsum(dO * O), then one kernel
per key block (dK, dV; it loops over the query heads of its grouped-query group and the query blocks) and one per
query block (dQ). No atomics, so the backward is bitwise repeatable (`deterministic` is always honoured).

Masks (constexpr feature flags, so each variant compiles to lean code): causal, prefix-LM (prefix_len per batch:
bidirectional inside the prefix, causal after; or PREFIX_MASK, a prefix flag per token: flagged pairs attend both
ways, t5x's decoder_causal_attention), packed documents (doc ids per position: equal ids attend), key
padding (kv_len per batch), a sliding window (query i sees keys i - left .. i + right), grouped-query heads,
cross attention (Sq != Sk, non-causal). A softcap c turns the scaled scores s into c * tanh(s / c) (Gemma 2).
ALiBi (HAS_ALIBI) adds -slope * |i + Sk - Sq - j| to the (capped) scores, one slope per (batch, query head); the
bias is recomputed from positions in every kernel, and being additive it leaves the backward's chain unchanged.
Dropout (HAS_DROPOUT) zeroes the softmax weights whose Philox draw (`_dropout_keep`, the bits of
lmobj_kernels/reference/attention.py's `dropout_keep`) falls under the threshold and scales the rest by
1 / (1 - p); the row sums (and lse) stay those of the undropped weights. The backward draws the same bits again
(FlashAttention-2's scheme): dV = (P * Z)^T dO, dP = Z * (dO V^T), dS = P * (dP - delta), with Z the scaled keep
mask and delta = rowsum(dO * O) as without dropout.

Block skipping: each program derives the range of blocks it needs from the mask metadata: causal rows stop at the
diagonal (or at prefix_len, whichever is later), key padding stops at kv_len, and documents use per-block
[first, last) ranges precomputed from per-block min/max doc ids (`_doc_block_range`), so blocks of other documents
are never loaded; a window bounds the range on both sides. Inside the range, blocks that need no elementwise mask
(fully below the diagonal / inside the prefix, fully before kv_len, inside every row's window) run a loop without
masking; the rest apply the mask. Document ranges are exact for
packed (non-decreasing or contiguous) doc ids; arbitrary ids are still correct, they just skip fewer blocks.

A query row with no allowed key gets zeros and lse = -inf, and zero gradients: the running max is replaced by 0
for the exponent while it is -inf, and in backward an lse of -inf is read as +inf (so p = 0).
Head dims up to 256 (padded to a power of two >= 16 with masked loads). Block sizes: `_CONFIGS`, one table.
Runs compiled on a GPU and under TRITON_INTERPRET=1 on CPU tensors.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._device import on_data_device
from .cross_entropy import _tanh

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Philox stream of attention dropout (reference/corruption.py's STREAM_ATTN_DROPOUT), and the sign bit that maps
# uint32 draws onto int32 in order (tl.constexpr: compiled Triton refuses plain globals inside @jit)
STREAM_ATTN_DROPOUT = tl.constexpr(6)
_SIGN_BIT = tl.constexpr(-(2**31))

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, architecture and head-dim bucket (<= 64, <= 128, <= 256).
# BLOCK_M counts queries, BLOCK_N keys. Starting points from the published FlashAttention-2 Triton kernels and
# Triton's fused-attention tutorial (fwd 128x64; bwd dK/dV with a wide key block, dQ with a tall query block); not
# tuned on a card yet. "interp" keeps blocks small and unequal so the CPU tests cross many block boundaries.
_CONFIGS: dict[tuple[str, str, int], tuple[int, int, int, int]] = {
    ("fwd", "sm90", 64): (128, 64, 4, 3),
    ("fwd", "sm90", 128): (128, 64, 8, 3),
    ("fwd", "sm90", 256): (64, 32, 4, 2),
    ("fwd", "sm80", 64): (128, 64, 4, 3),
    ("fwd", "sm80", 128): (128, 32, 8, 2),
    ("fwd", "sm80", 256): (64, 32, 4, 1),
    ("dkdv", "sm90", 64): (32, 128, 4, 3),
    ("dkdv", "sm90", 128): (64, 128, 8, 2),
    ("dkdv", "sm90", 256): (32, 64, 8, 1),
    ("dkdv", "sm80", 64): (32, 128, 4, 2),
    ("dkdv", "sm80", 128): (64, 64, 8, 2),
    ("dkdv", "sm80", 256): (32, 64, 8, 1),
    ("dq", "sm90", 64): (128, 32, 4, 3),
    ("dq", "sm90", 128): (128, 32, 8, 2),
    ("dq", "sm90", 256): (64, 32, 8, 1),
    ("dq", "sm80", 64): (128, 32, 4, 2),
    ("dq", "sm80", 128): (64, 32, 4, 2),
    ("dq", "sm80", 256): (64, 32, 8, 1),
    ("fwd", "interp", 0): (32, 16, 4, 1),
    ("dkdv", "interp", 0): (16, 32, 4, 1),
    ("dq", "interp", 0): (32, 16, 4, 1),
}


@functools.cache
def _arch(device_index: int) -> str:
    return "sm90" if torch.cuda.get_device_capability(device_index)[0] >= 9 else "sm80"


def config(kernel: str, head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `kernel` ("fwd", "dkdv", "dq") for this head dim and device."""
    if device.type != "cuda":
        return _CONFIGS[(kernel, "interp", 0)]
    bucket = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)
    return _CONFIGS[(kernel, _arch(device.index if device.index is not None else torch.cuda.current_device()),
                     bucket)]


# The table's configs are sized for 16-bit tiles on the A100 (163 KB of shared memory per block) and H100 (227 KB).
# Cards with less (99 KB: sm86 / sm89, e.g. A10, L4, RTX 30xx / 40xx, and consumer Blackwell) and float32 tiles
# (twice the bytes) can need more than a block may have; Triton then refuses the launch (OutOfResources) before
# it runs, and `_launch_fitted` retries with fewer pipeline stages, then smaller blocks, and remembers what ran.
# `python benchmarks/triton_resources.py` shows, without a GPU, what each card ends up with.
_FITTED: dict[tuple, tuple[int, int, int, int]] = {}


def _smaller(cfg: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """The next config to try when `cfg` needs too much shared memory: one stage less, then the larger block
    halved (never under 16, the smallest tl.dot tile)."""
    bm, bn, warps, stages = cfg
    if stages > 1:
        return bm, bn, warps, stages - 1
    if max(bm, bn) <= 16:
        return None
    return (bm, bn // 2, warps, stages) if bn >= bm else (bm // 2, bn, warps, stages)


def _launch_fitted(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device, launch) -> None:
    """launch(BLOCK_M, BLOCK_N, num_warps, num_stages) with the table's config for `kernel`, or the largest
    smaller one this device can hold (see `_FITTED`)."""
    from triton.runtime.errors import OutOfResources

    key = (kernel, device.type, device.index, head_dim, dtype)
    cfg = _FITTED.get(key) or config(kernel, head_dim, device)
    while True:
        try:
            launch(*cfg)
        except OutOfResources:
            cfg = _smaller(cfg)
            if cfg is None:
                raise
            continue
        _FITTED[key] = cfg
        return


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in float32. UPCAST: through float32 operands (the CPU interpreter's bfloat16 dot is wrong in Triton
    3.8: it multiplies the raw bits; only used under TRITON_INTERPRET=1)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (float32 accumulator), see `_mm`."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _block_and_row(n_blocks):
    """(block, row) of this program in a 1-D grid of n_blocks blocks per row (row = b * H + h, or b), blocks
    fastest: the order of a (n_blocks, rows) grid, without CUDA's 65535 limit on grid y (B * H passes it at e.g.
    BERT's 4096 x 32 heads)."""
    pid = tl.program_id(0)
    return pid % n_blocks, (pid // n_blocks).to(tl.int64)


@triton.jit
def _and_d(rows, dmask, EVEN_D: tl.constexpr):
    """Load/store mask: `rows` alone when the head dim fills its block (a mask constant along the contiguous
    head-dim axis keeps loads vectorised), else rows & dmask."""
    if EVEN_D:
        return rows
    else:
        return rows & dmask


@triton.jit
def _scores(raw, qk_scale, cap_in, cap_l2, HAS_SOFTCAP: tl.constexpr):
    """(scores in base 2, d(capped score) / d(scaled score)) of the raw dot products: raw * scale * log2(e), or
    with a softcap c, c * tanh(raw * scale / c) * log2(e) (cap_in = scale / c, cap_l2 = c * log2(e)) and its
    derivative sech^2 = 4w / (1 + w)^2, w = exp(-2|y|) (the backward's chain factor; 1 - tanh^2 cancels once
    the scores saturate; 1.0, unused, without a cap). The forward discards the derivative (dead code there)."""
    if HAS_SOFTCAP:
        y = raw * cap_in
        w = tl.exp(-2.0 * tl.abs(y))
        return _tanh(y) * cap_l2, 4.0 * w / ((1.0 + w) * (1.0 + w))
    else:
        return raw * qk_scale, 1.0


@triton.jit
def _alibi(s, slope_l2, offs_q, offs_k, alibi_off, HAS_ALIBI: tl.constexpr):
    """s (base 2) plus ALiBi's bias -slope * |i + alibi_off - j| (slope_l2 = slope * log2(e), alibi_off = Sk - Sq);
    offs_q and offs_k are already shaped to broadcast ((M, 1) with (1, N), or (1, M) with (N, 1))."""
    if HAS_ALIBI:
        return s - slope_l2 * tl.abs(offs_q + alibi_off - offs_k).to(tl.float32)
    else:
        return s


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, drop_t):
    """(queries, keys) keep mask of attention dropout for query positions offs_m and the key block offs_n (1-D; it
    starts at a multiple of 4) of row bh = b * Hq + h: key j reads word j % 4 of Philox4x32-10 at counter
    (j // 4, i, bh, stream 6), so one Philox call serves four keys, its words interleaved back along the keys. A
    weight is kept when its draw is >= the threshold, compared as int32 (draw ^ sign bit >= drop_t =
    threshold - 2^31) to stay in 32 bits."""
    BM: tl.constexpr = offs_m.shape[0]
    BN: tl.constexpr = offs_n.shape[0]
    blk = tl.reshape(offs_n, (BN // 4, 4))
    blk = tl.max(blk, 1) >> 2  # the four keys of a group share one block
    z = (offs_m[:, None] * 0 + blk[None, :] * 0).to(tl.uint32)
    c0 = z + blk[None, :].to(tl.uint32)
    c1 = z + offs_m[:, None].to(tl.uint32)
    c2 = z + (bh & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, z + STREAM_ATTN_DROPOUT)
    # join(join(r0, r2), join(r1, r3))[m, c, x, y] is word 2x + y of group c: row-major, key 4c + 2x + y
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BM, BN))
    return (r.to(tl.int32, bitcast=True) ^ _SIGN_BIT) >= drop_t


@triton.jit
def _keys_read(offs_n, Sk, kv_len, HAS_KVLEN: tl.constexpr):
    """Which keys a block loads: those before Sk and kv_len. Padding past kv_len is never read, so it may hold
    anything (a NaN there times its zero weight would reach every row)."""
    ok = offs_n < Sk
    if HAS_KVLEN:
        ok = ok & (offs_n < kv_len)
    return ok


@triton.jit
def _allowed(qi, kj, Sk, kv_len, prefix_len, k_pf, q_doc, k_doc, win_l, win_r, CAUSAL: tl.constexpr,
             HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
             PREFIX_MASK: tl.constexpr):
    """Mask of allowed (query, key) pairs. qi / q_doc and kj / k_doc are already shaped to broadcast against each
    other ((M, 1) with (1, N), or (1, M) with (N, 1)); keys at or past Sk are never allowed. win_l / win_r: the
    window's bounds (Sk for an unbounded side, where the test always holds). PREFIX_MASK: prefix_len and k_pf are
    the queries' and the keys' prefix flags (shaped as qi and kj): flagged pairs attend both ways."""
    ok = kj < Sk
    if HAS_KVLEN:
        ok = ok & (kj < kv_len)
    if CAUSAL:
        rule = kj <= qi
        if HAS_PREFIX:
            if PREFIX_MASK:
                rule = rule | ((prefix_len != 0) & (k_pf != 0))
            else:
                rule = rule | (kj < prefix_len)
        ok = ok & rule
    if HAS_DOCS:
        ok = ok & (q_doc == k_doc)
    if HAS_WINDOW:
        ok = ok & (kj >= qi - win_l) & (kj <= qi + win_r)
    return ok


@triton.jit
def _rows_mask(offs_m, offs_n, kmask, Sk, kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r,
               CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_DOCS: tl.constexpr,
               HAS_WINDOW: tl.constexpr, PREFIX_MASK: tl.constexpr):
    """`_allowed` (M, N) of a query block's rows against key block offs_n, as the forward and dQ steps need it:
    the keys' doc ids (and prefix flags) read from DOC_row (PFX_row); the rows' own come in q_doc and prefix_len."""
    k_doc = offs_n
    if HAS_DOCS:
        k_doc = tl.load(DOC_row + offs_n, mask=kmask, other=-1)
    if HAS_PREFIX and PREFIX_MASK:
        k_pf = tl.load(PFX_row + offs_n, mask=offs_n < Sk, other=0)
        ok = _allowed(offs_m[:, None], offs_n[None, :], Sk, kv_len, prefix_len[:, None], k_pf[None, :],
                      q_doc[:, None], k_doc[None, :], win_l, win_r, CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS,
                      HAS_WINDOW, PREFIX_MASK)
    else:
        ok = _allowed(offs_m[:, None], offs_n[None, :], Sk, kv_len, prefix_len, prefix_len, q_doc[:, None],
                      k_doc[None, :], win_l, win_r, CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW, PREFIX_MASK)
    return ok


@triton.jit
def _key_range(b, pid_m, start_m, Sq, Sk, kv_len, prefix_len, DOC_RANGE, n_outer, win_l, win_r,
               CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PREFIX_MASK: tl.constexpr):
    """Key range of queries [start_m, start_m + BLOCK_M) as (lo, c_lo, c_hi, hi): key blocks in [c_lo, c_hi) need
    no elementwise mask, those in [lo, c_lo) and [c_hi, hi) do. Keys outside [lo, hi) are masked for every row of
    the block and never loaded. PREFIX_MASK: prefix_len is the end of the row's last prefix flag when a row of the
    block is flagged (else 0): the keys past the diagonal that flagged rows may see, none of them for every row."""
    lo = 0
    hi = tl.minimum(Sk, kv_len)
    full = hi  # keys < full are allowed for every row of the block by the positional rules
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(tl.minimum(start_m + BLOCK_M, Sq), prefix_len))
        if PREFIX_MASK:
            full = tl.minimum(full, start_m + 1)
        else:
            full = tl.minimum(full, tl.maximum(start_m + 1, prefix_len))
    c_lo = lo
    c_hi = (full // BLOCK_N) * BLOCK_N
    if HAS_DOCS:
        rng = DOC_RANGE + (b * n_outer + pid_m) * 4
        lo = tl.load(rng) * BLOCK_N
        hi = tl.minimum(hi, tl.load(rng + 1) * BLOCK_N)
        c_lo = tl.load(rng + 2) * BLOCK_N  # blocks of the same single document as the whole query block
        c_hi = tl.minimum(c_hi, tl.load(rng + 3) * BLOCK_N)
    if HAS_WINDOW:  # keys of rows start_m .. last lie in [start_m - win_l, last + win_r]
        last = tl.minimum(start_m + BLOCK_M, Sq) - 1
        first = tl.maximum(start_m - win_l, 0)
        lo = tl.maximum(lo, (first // BLOCK_N) * BLOCK_N)
        hi = tl.where(hi > first, tl.minimum(hi, last + win_r + 1), lo)  # e.g. a window past kv_len: nothing
        c_lo = tl.maximum(c_lo, tl.cdiv(tl.maximum(last - win_l, 0), BLOCK_N) * BLOCK_N)  # in every row's window
        c_hi = tl.minimum(c_hi, ((start_m + win_r + 1) // BLOCK_N) * BLOCK_N)
    hi = tl.maximum(hi, lo)
    c_lo = tl.minimum(tl.maximum(c_lo, lo), hi)
    c_hi = tl.minimum(tl.maximum(c_hi, c_lo), hi)
    return lo, c_lo, c_hi, hi


@triton.jit
def _mask_meta(b, offs, omask, Sk, PREFIX, KVLEN, DOC, stride_doc, doc_pad, HAS_PREFIX: tl.constexpr,
               HAS_KVLEN: tl.constexpr, HAS_DOCS: tl.constexpr, PREFIX_MASK: tl.constexpr, stride_pfx):
    """Batch row b's mask metadata as every kernel reads it: kv_len (Sk without KVLEN), prefix_len (0 without
    PREFIX; with PREFIX_MASK the prefix flags at positions offs, 0 past the end), its DOC row, and the doc ids at
    positions offs (the positions themselves without DOC; doc_pad past the end: -2 for queries and -1 for keys, so
    padding never shares a document)."""
    kv_len = Sk
    if HAS_KVLEN:
        kv_len = tl.load(KVLEN + b)
    prefix_len = 0
    if HAS_PREFIX:
        if PREFIX_MASK:
            prefix_len = tl.load(PREFIX + b * stride_pfx + 2 + offs, mask=omask, other=0)
        else:
            prefix_len = tl.load(PREFIX + b)
    DOC_row = DOC + b * stride_doc
    doc = offs
    if HAS_DOCS:
        doc = tl.load(DOC_row + offs, mask=omask, other=doc_pad)
    return kv_len, prefix_len, DOC_row, doc


@triton.jit
def _query_block(pid_m, bh, Hq, group, Sq, Sk, PREFIX, KVLEN, DOC, DOC_RANGE, stride_doc, n_qblocks, win_l, win_r,
                 stride_pfx, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr,
                 HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, PREFIX_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """What the forward and dQ kernels know of query block pid_m of (batch, head) bh: batch b, head h, kv head hk,
    its rows and their mask, the row's mask metadata (prefix_len: the rows' prefix flags with PREFIX_MASK) and the
    key blocks [lo, hi) it needs ([c_lo, c_hi): the blocks that need no element mask, see `_key_range`)."""
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rmask = offs_m < Sq
    kv_len, prefix_len, DOC_row, q_doc = _mask_meta(b, offs_m, rmask, Sk, PREFIX, KVLEN, DOC, stride_doc, -2,
                                                    HAS_PREFIX, HAS_KVLEN, HAS_DOCS, PREFIX_MASK, stride_pfx)
    reach = prefix_len  # keys past the diagonal the block's rows may see: up to the row's last prefix flag
    if HAS_PREFIX and PREFIX_MASK:
        reach = tl.where(tl.max(prefix_len, 0) != 0, tl.load(PREFIX + b * stride_pfx + 1), 0)
    lo, c_lo, c_hi, hi = _key_range(b, pid_m, start_m, Sq, Sk, kv_len, reach, DOC_RANGE, n_qblocks, win_l,
                                    win_r, CAUSAL, HAS_DOCS, HAS_WINDOW, BLOCK_M, BLOCK_N, PREFIX_MASK)
    return b, h, hk, offs_m, rmask, kv_len, prefix_len, DOC_row, q_doc, lo, c_lo, c_hi, hi


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K_base, V_base, stride_ks, stride_vs, start_n, offs_m, offs_n0, offs_d, D, Sk, kv_len,
              prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r, qk_scale, cap_in, cap_l2, seed, bh, drop_t, slope_l2,
              alibi_off, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr,
              HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              HAS_ALIBI: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              EVEN_D: tl.constexpr, PREFIX_MASK: tl.constexpr):
    """One key block of the online softmax (base 2): returns the updated (acc, m_i, l_i); with dropout acc sums
    only the kept weights (unscaled: the caller scales once at the end), l_i all of them."""
    offs_n = start_n + offs_n0
    kmask = _keys_read(offs_n, Sk, kv_len, HAS_KVLEN)
    dmask = offs_d < D
    kT = tl.load(K_base + offs_n[None, :] * stride_ks + offs_d[:, None],
                 mask=_and_d(kmask[None, :], dmask[:, None], EVEN_D), other=0.0)
    s, _ = _scores(_mm(q, kT, PREC, UPCAST), qk_scale, cap_in, cap_l2, HAS_SOFTCAP)
    s = _alibi(s, slope_l2, offs_m[:, None], offs_n[None, :], alibi_off, HAS_ALIBI)
    if MASK:
        ok = _rows_mask(offs_m, offs_n, kmask, Sk, kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r,
                        CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW, PREFIX_MASK)
        s = tl.where(ok, s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing allowed yet: exp2(-inf - 0) = 0
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V_base + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=_and_d(kmask[:, None], dmask[None, :], EVEN_D), other=0.0)
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(seed, bh, offs_m, offs_n, drop_t), p, 0.0)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PREC, UPCAST)
    return acc, m_new, l_i


# one compiled kernel for every sequence length and window
@triton.jit(do_not_specialize=["Sq", "Sk", "n_qblocks", "win_l", "win_r", "drop_t"])
def _attn_fwd_kernel(Q, K, V, O, LSE, PREFIX, KVLEN, DOC, KDOC, DOC_RANGE, SEED, ALIBI, stride_qb, stride_qh,
                     stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
                     stride_os, stride_doc, stride_kdoc, stride_pfx, Hq, Sq, Sk, D, group, qk_scale, n_qblocks, win_l,
                     win_r, cap_in, cap_l2, drop_t,
                     keep_scale, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr,
                     HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, PREFIX_MASK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                     UPCAST: tl.constexpr, EVEN_D: tl.constexpr):
    """O[b, h, i] = softmax over allowed keys j of (q_i . k_j * scale, capped to c * tanh(. / c) with a softcap)
    times v_j; LSE[b, h, i] (natural log).

    Q (B, Hq, Sq, D), K and V (B, Hkv, Sk, D), O like Q (last dim contiguous, other strides given); LSE (B, Hq, Sq)
    contiguous float32. PREFIX / KVLEN: int32 (B,) (read only when their flag is set; with PREFIX_MASK, PREFIX is
    int32 (B, 2 + S) rows stride_pfx apart: the first prefix flag's position (S if none), the last one's + 1 (0 if
    none), then the flags); DOC: int32 (B, Sq) doc ids
    of the queries, rows stride_doc apart, KDOC (B, Sk) of the keys (DOC itself in self-attention); DOC_RANGE:
    int32 (B, n_qblocks, 4) per query block: [first, last) key block sharing
    a document with it, and [first, last) key block of the same single document as the whole query block.
    group = Hq // Hkv; qk_scale = scale * log2(e); win_l / win_r: the window (Sk for an unbounded side).
    Dropout: SEED int64 [1], drop_t = threshold - 2^31 (see `_dropout_keep`), keep_scale = 1 / (1 - p).
    ALiBi: ALIBI float32 (B, Hq) contiguous slopes. Grid: (n_qblocks * B * Hq,)."""
    pid_m, bh = _block_and_row(n_qblocks)
    b, h, hk, offs_m, rmask, kv_len, prefix_len, DOC_row, q_doc, lo, c_lo, c_hi, hi = _query_block(
        pid_m, bh, Hq, group, Sq, Sk, PREFIX, KVLEN, DOC, DOC_RANGE, stride_doc, n_qblocks, win_l, win_r, stride_pfx,
        CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW, PREFIX_MASK, BLOCK_M, BLOCK_N)
    PFX_row = PREFIX + b * stride_pfx + 2  # the prefix flags (PREFIX_MASK)
    DOC_row = KDOC + b * stride_kdoc  # the steps read the keys' documents
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=_and_d(rmask[:, None], dmask[None, :], EVEN_D), other=0.0)
    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    slope_l2 = 0.0
    if HAS_ALIBI:
        slope_l2 = tl.load(ALIBI + bh) * 1.4426950408889634
    alibi_off = Sk - Sq
    if HAS_DOCS or HAS_WINDOW:  # blocks before the own document / the window's left edge (partly allowed)
        for start_n in range(lo, c_lo, BLOCK_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K_base, V_base, stride_ks, stride_vs, start_n, offs_m,
                                      offs_n0, offs_d, D, Sk, kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r,
                                      qk_scale, cap_in, cap_l2, seed, bh, drop_t, slope_l2, alibi_off, CAUSAL,
                                      HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT,
                                      HAS_ALIBI, True, PREC, UPCAST, EVEN_D, PREFIX_MASK)
    for start_n in range(c_lo, c_hi, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K_base, V_base, stride_ks, stride_vs, start_n, offs_m,
                                  offs_n0, offs_d, D, Sk, kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r,
                                  qk_scale, cap_in, cap_l2, seed, bh, drop_t, slope_l2, alibi_off, CAUSAL, HAS_PREFIX,
                                  HAS_KVLEN, HAS_DOCS, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, False, PREC,
                                  UPCAST, EVEN_D, PREFIX_MASK)
    for start_n in range(c_hi, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K_base, V_base, stride_ks, stride_vs, start_n, offs_m,
                                  offs_n0, offs_d, D, Sk, kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r,
                                  qk_scale, cap_in, cap_l2, seed, bh, drop_t, slope_l2, alibi_off, CAUSAL, HAS_PREFIX,
                                  HAS_KVLEN, HAS_DOCS, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, True, PREC,
                                  UPCAST, EVEN_D, PREFIX_MASK)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    if HAS_DROPOUT:
        o = o * keep_scale
    lse = tl.where(empty, -float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=_and_d(rmask[:, None], dmask[None, :], EVEN_D))
    tl.store(LSE + bh * Sq + offs_m, lse, mask=rmask)


@triton.jit(do_not_specialize=["Sq", "n_qblocks"])  # one compiled kernel for every sequence length
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos,
                           Hq, Sq, D, n_qblocks, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           EVEN_D: tl.constexpr):
    """DELTA[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d] in float32 (DELTA contiguous (B, Hq, Sq)).
    Grid: (n_qblocks * B * Hq,), n_qblocks = cdiv(Sq, BLOCK_M)."""
    pid_m, bh = _block_and_row(n_qblocks)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = _and_d(offs_m[:, None] < Sq, offs_d[None, :] < D, EVEN_D)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=msk,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=msk,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _dkdv_step(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, stride_qs, stride_dos, start_m, offs_m0, offs_n,
               offs_d, D, Sq, Sk, kv_len, prefix_len, k_doc, DOC_row, PFX_row, win_l, win_r, qk_scale, cap_in, cap_l2,
               seed, bhq, drop_t, keep_scale, slope_l2, alibi_off, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
               HAS_KVLEN: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr, EVEN_D: tl.constexpr, PREFIX_MASK: tl.constexpr):
    """One query block's contribution to dK (unscaled) and dV of a key block, in transposed (key, query) form;
    bhq = b * Hq + h of the query head. With dropout dV sums the kept weights unscaled (the caller scales)."""
    offs_m = start_m + offs_m0
    rmask = offs_m < Sq
    dmask = offs_d < D
    q = tl.load(Q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=_and_d(rmask[:, None], dmask[None, :], EVEN_D), other=0.0)
    do = tl.load(DO_base + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=_and_d(rmask[:, None], dmask[None, :], EVEN_D), other=0.0)
    lse = tl.load(LSE_row + offs_m, mask=rmask, other=float("inf"))
    lse = tl.where(lse == -float("inf"), float("inf"), lse) * 1.4426950408889634  # empty rows: p = 0
    delta = tl.load(DELTA_row + offs_m, mask=rmask, other=0.0)
    sT, dcapT = _scores(_mm(k, tl.trans(q), PREC, UPCAST), qk_scale, cap_in, cap_l2, HAS_SOFTCAP)
    sT = _alibi(sT, slope_l2, offs_m[None, :], offs_n[:, None], alibi_off, HAS_ALIBI)
    pT = tl.exp2(sT - lse[None, :])
    if MASK:
        q_doc = offs_m
        if HAS_DOCS:
            q_doc = tl.load(DOC_row + offs_m, mask=rmask, other=-2)
        if HAS_PREFIX and PREFIX_MASK:  # prefix_len: the keys' flags; the queries' are read here
            q_pf = tl.load(PFX_row + offs_m, mask=rmask, other=0)
            ok = _allowed(offs_m[None, :], offs_n[:, None], Sk, kv_len, q_pf[None, :], prefix_len[:, None],
                          q_doc[None, :], k_doc[:, None], win_l, win_r, CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS,
                          HAS_WINDOW, PREFIX_MASK)
        else:
            ok = _allowed(offs_m[None, :], offs_n[:, None], Sk, kv_len, prefix_len, prefix_len, q_doc[None, :],
                          k_doc[:, None], win_l, win_r, CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW,
                          PREFIX_MASK)
        pT = tl.where(ok, pT, 0.0)
    dpT = _mm(v, tl.trans(do), PREC, UPCAST)
    if HAS_DROPOUT:
        keepT = tl.trans(_dropout_keep(seed, bhq, offs_m, offs_n, drop_t))
        dv = _mma(tl.where(keepT, pT, 0.0).to(do.dtype), do, dv, PREC, UPCAST)
        dpT = tl.where(keepT, dpT * keep_scale, 0.0)
    else:
        dv = _mma(pT.to(do.dtype), do, dv, PREC, UPCAST)
    dsT = pT * (dpT - delta[None, :])
    if HAS_SOFTCAP:
        dsT = dsT * dcapT
    dk = _mma(dsT.to(q.dtype), q, dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _query_range(b, pid_n, start_n, Sq, Sk, kv_len, prefix_len, DOC_RANGE, n_outer, win_l, win_r,
                 CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PREFIX_MASK: tl.constexpr):
    """Query range of keys [start_n, start_n + BLOCK_N) as (lo, c_lo, c_hi, hi), the transpose of `_key_range`:
    query blocks in [c_lo, c_hi) need no elementwise mask, those in [lo, c_lo) and [c_hi, hi) do; queries outside
    [lo, hi) see none of these keys and are never loaded. PREFIX_MASK: prefix_len is the row's first prefix flag
    when a key of the block is flagged (else Sq): the first query that may see them from before the diagonal."""
    end_n = start_n + BLOCK_N
    lo = 0
    hi = tl.where(start_n < kv_len, Sq, 0)
    c_lo = tl.where(end_n <= tl.minimum(Sk, kv_len), 0, Sq)
    if CAUSAL:
        diag = tl.cdiv(end_n - 1, BLOCK_M) * BLOCK_M
        if PREFIX_MASK:
            lo = (tl.minimum(start_n, prefix_len) // BLOCK_M) * BLOCK_M
            c_lo = tl.maximum(c_lo, diag)
        else:
            in_prefix = start_n < prefix_len
            lo = tl.where(in_prefix, 0, (start_n // BLOCK_M) * BLOCK_M)
            c_lo = tl.maximum(c_lo, tl.where(end_n <= prefix_len, 0, diag))
    c_hi = hi
    if HAS_DOCS:
        rng = DOC_RANGE + (b * n_outer + pid_n) * 4
        lo = tl.maximum(lo, tl.load(rng) * BLOCK_M)
        hi = tl.minimum(hi, tl.load(rng + 1) * BLOCK_M)
        c_lo = tl.maximum(c_lo, tl.load(rng + 2) * BLOCK_M)  # query blocks of this key block's single document
        c_hi = tl.minimum(c_hi, tl.load(rng + 3) * BLOCK_M)
    if HAS_WINDOW:  # queries that see keys start_n .. end_n - 1 lie in [start_n - win_r, end_n - 1 + win_l]
        first = tl.maximum(start_n - win_r, 0)
        lo = tl.maximum(lo, (first // BLOCK_M) * BLOCK_M)
        last_key = tl.minimum(end_n, tl.minimum(Sk, kv_len)) - 1
        hi = tl.where(hi > first, tl.minimum(hi, last_key + win_l + 1), lo)
        c_lo = tl.maximum(c_lo, tl.cdiv(tl.maximum(end_n - 1 - win_r, 0), BLOCK_M) * BLOCK_M)  # see every key
        c_hi = tl.minimum(c_hi, ((start_n + win_l + 1) // BLOCK_M) * BLOCK_M)
    hi = tl.maximum(hi, lo)
    c_lo = tl.minimum(tl.maximum(c_lo, lo), hi)
    c_hi = tl.minimum(tl.maximum(c_hi, c_lo), hi)
    return lo, c_lo, c_hi, hi


# one compiled kernel for every sequence length and window
@triton.jit(do_not_specialize=["Sq", "Sk", "n_kblocks", "win_l", "win_r", "drop_t"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PREFIX, KVLEN, DOC, KDOC, DOC_RANGE, SEED, ALIBI,
                          stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
                          stride_vs, stride_dob, stride_doh, stride_dos, stride_doc, stride_kdoc, stride_pfx, Hq, Hkv,
                          Sq, Sk, D, group, sm_scale,
                          qk_scale, n_kblocks, win_l, win_r, cap_in, cap_l2, drop_t, keep_scale, CAUSAL: tl.constexpr,
                          HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_DOCS: tl.constexpr,
                          HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          HAS_ALIBI: tl.constexpr, PREFIX_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr):
    """dK, dV (B, Hkv, Sk, D) contiguous, for one key block and kv head, summed over the `group` query heads that
    share it and over the query blocks the mask leaves (a causal key block starts at its diagonal unless it lies in
    the prefix; a block past kv_len has nothing; documents: DOC_RANGE (B, n_kblocks, 4), see `_doc_block_range`;
    see `_query_range`). LSE, DELTA: (B, Hq, Sq) float32 contiguous. Grid: (n_kblocks * B * Hkv,)."""
    pid_n, bh = _block_and_row(n_kblocks)
    b = bh // Hkv
    hk = bh % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kmask = offs_n < Sk
    kv_len, prefix_len, _, k_doc = _mask_meta(b, offs_n, kmask, Sk, PREFIX, KVLEN, KDOC, stride_kdoc, -1,
                                              HAS_PREFIX, HAS_KVLEN, HAS_DOCS, PREFIX_MASK, stride_pfx)
    DOC_row = DOC + b * stride_doc  # the steps read the queries' documents
    PFX_row = PREFIX + b * stride_pfx + 2  # and their prefix flags (PREFIX_MASK)
    reach = prefix_len  # the first query that may see these keys from before the diagonal: the first prefix flag
    if HAS_PREFIX and PREFIX_MASK:
        reach = tl.where(tl.max(prefix_len, 0) != 0, tl.load(PREFIX + b * stride_pfx), Sq)
    rd = _keys_read(offs_n, Sk, kv_len, HAS_KVLEN)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=_and_d(rd[:, None], dmask[None, :], EVEN_D), other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=_and_d(rd[:, None], dmask[None, :], EVEN_D), other=0.0)
    lo, c_lo, c_hi, hi = _query_range(b, pid_n, start_n, Sq, Sk, kv_len, reach, DOC_RANGE, n_kblocks, win_l,
                                      win_r, CAUSAL, HAS_DOCS, HAS_WINDOW, BLOCK_M, BLOCK_N, PREFIX_MASK)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    for g in range(0, group):
        h = hk * group + g
        Q_base = Q + b * stride_qb + h * stride_qh
        DO_base = DO + b * stride_dob + h * stride_doh
        LSE_row = LSE + (b * Hq + h) * Sq
        DELTA_row = DELTA + (b * Hq + h) * Sq
        bhq = b * Hq + h
        slope_l2 = 0.0
        if HAS_ALIBI:
            slope_l2 = tl.load(ALIBI + bhq) * 1.4426950408889634
        alibi_off = Sk - Sq
        for start_m in range(lo, c_lo, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, stride_qs, stride_dos, start_m,
                                offs_m0, offs_n, offs_d, D, Sq, Sk, kv_len, prefix_len, k_doc, DOC_row, PFX_row,
                                win_l, win_r, qk_scale, cap_in, cap_l2, seed, bhq, drop_t, keep_scale, slope_l2,
                                alibi_off, CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW, HAS_SOFTCAP,
                                HAS_DROPOUT, HAS_ALIBI, True, PREC, UPCAST, EVEN_D, PREFIX_MASK)
        for start_m in range(c_lo, c_hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, stride_qs, stride_dos, start_m,
                                offs_m0, offs_n, offs_d, D, Sq, Sk, kv_len, prefix_len, k_doc, DOC_row, PFX_row,
                                win_l, win_r, qk_scale, cap_in, cap_l2, seed, bhq, drop_t, keep_scale, slope_l2,
                                alibi_off, CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW, HAS_SOFTCAP,
                                HAS_DROPOUT, HAS_ALIBI, False, PREC, UPCAST, EVEN_D, PREFIX_MASK)
        if HAS_DOCS or HAS_WINDOW:  # query blocks after the key block's own document / past the window
            for start_m in range(c_hi, hi, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, Q_base, DO_base, LSE_row, DELTA_row, stride_qs, stride_dos, start_m,
                                    offs_m0, offs_n, offs_d, D, Sq, Sk, kv_len, prefix_len, k_doc, DOC_row, PFX_row,
                                    win_l, win_r, qk_scale, cap_in, cap_l2, seed, bhq, drop_t, keep_scale, slope_l2,
                                    alibi_off, CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW, HAS_SOFTCAP,
                                    HAS_DROPOUT, HAS_ALIBI, True, PREC, UPCAST, EVEN_D, PREFIX_MASK)
    out = bh * Sk * D + offs_n[:, None] * D + offs_d[None, :]
    omask = _and_d(kmask[:, None], dmask[None, :], EVEN_D)
    if HAS_DROPOUT:
        dv = dv * keep_scale
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=omask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=omask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, K_base, V_base, stride_ks, stride_vs, start_n, offs_m, offs_n0, offs_d, D, Sk,
             kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r, qk_scale, cap_in, cap_l2, seed, bh, drop_t,
             keep_scale, slope_l2, alibi_off, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr,
             HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
             HAS_ALIBI: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             EVEN_D: tl.constexpr, PREFIX_MASK: tl.constexpr):
    """One key block's contribution to dQ (unscaled) of a query block."""
    offs_n = start_n + offs_n0
    kmask = _keys_read(offs_n, Sk, kv_len, HAS_KVLEN)
    dmask = offs_d < D
    kT = tl.load(K_base + offs_n[None, :] * stride_ks + offs_d[:, None],
                 mask=_and_d(kmask[None, :], dmask[:, None], EVEN_D), other=0.0)
    vT = tl.load(V_base + offs_n[None, :] * stride_vs + offs_d[:, None],
                 mask=_and_d(kmask[None, :], dmask[:, None], EVEN_D), other=0.0)
    s, dcap = _scores(_mm(q, kT, PREC, UPCAST), qk_scale, cap_in, cap_l2, HAS_SOFTCAP)
    s = _alibi(s, slope_l2, offs_m[:, None], offs_n[None, :], alibi_off, HAS_ALIBI)
    p = tl.exp2(s - lse[:, None])
    if MASK:
        ok = _rows_mask(offs_m, offs_n, kmask, Sk, kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r,
                        CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW, PREFIX_MASK)
        p = tl.where(ok, p, 0.0)
    dp = _mm(do, vT, PREC, UPCAST)
    if HAS_DROPOUT:
        dp = tl.where(_dropout_keep(seed, bh, offs_m, offs_n, drop_t), dp * keep_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * dcap
    dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, PREC, UPCAST)
    return dq


# one compiled kernel for every sequence length and window
@triton.jit(do_not_specialize=["Sq", "Sk", "n_qblocks", "win_l", "win_r", "drop_t"])
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PREFIX, KVLEN, DOC, KDOC, DOC_RANGE, SEED, ALIBI, stride_qb,
                        stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                        stride_dob, stride_doh, stride_dos, stride_doc, stride_kdoc, stride_pfx, Hq, Sq, Sk, D, group,
                        sm_scale, qk_scale,
                        n_qblocks, win_l, win_r, cap_in, cap_l2, drop_t, keep_scale, CAUSAL: tl.constexpr,
                        HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_DOCS: tl.constexpr,
                        HAS_WINDOW: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr,
                        PREFIX_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr):
    """dQ (B, Hq, Sq, D) contiguous for one query block: the same key range as the forward
    (DOC_RANGE (B, n_qblocks, 4), see `_doc_block_range`). Grid: (n_qblocks * B * Hq,)."""
    pid_m, bh = _block_and_row(n_qblocks)
    b, h, hk, offs_m, rmask, kv_len, prefix_len, DOC_row, q_doc, lo, c_lo, c_hi, hi = _query_block(
        pid_m, bh, Hq, group, Sq, Sk, PREFIX, KVLEN, DOC, DOC_RANGE, stride_doc, n_qblocks, win_l, win_r, stride_pfx,
        CAUSAL, HAS_PREFIX, HAS_KVLEN, HAS_DOCS, HAS_WINDOW, PREFIX_MASK, BLOCK_M, BLOCK_N)
    PFX_row = PREFIX + b * stride_pfx + 2  # the prefix flags (PREFIX_MASK)
    DOC_row = KDOC + b * stride_kdoc  # the steps read the keys' documents
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=_and_d(rmask[:, None], dmask[None, :], EVEN_D), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=_and_d(rmask[:, None], dmask[None, :], EVEN_D), other=0.0)
    lse = tl.load(LSE + bh * Sq + offs_m, mask=rmask, other=float("inf"))
    lse = tl.where(lse == -float("inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Sq + offs_m, mask=rmask, other=0.0)
    K_base = K + b * stride_kb + hk * stride_kh
    V_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    slope_l2 = 0.0
    if HAS_ALIBI:
        slope_l2 = tl.load(ALIBI + bh) * 1.4426950408889634
    alibi_off = Sk - Sq
    if HAS_DOCS or HAS_WINDOW:
        for start_n in range(lo, c_lo, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, K_base, V_base, stride_ks, stride_vs, start_n, offs_m, offs_n0,
                          offs_d, D, Sk, kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r, qk_scale, cap_in,
                          cap_l2, seed, bh, drop_t, keep_scale, slope_l2, alibi_off, CAUSAL, HAS_PREFIX, HAS_KVLEN,
                          HAS_DOCS, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, True, PREC, UPCAST, EVEN_D,
                          PREFIX_MASK)
    for start_n in range(c_lo, c_hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K_base, V_base, stride_ks, stride_vs, start_n, offs_m, offs_n0,
                      offs_d, D, Sk, kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r, qk_scale, cap_in,
                      cap_l2, seed, bh, drop_t, keep_scale, slope_l2, alibi_off, CAUSAL, HAS_PREFIX, HAS_KVLEN,
                      HAS_DOCS, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, False, PREC, UPCAST, EVEN_D,
                      PREFIX_MASK)
    for start_n in range(c_hi, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K_base, V_base, stride_ks, stride_vs, start_n, offs_m, offs_n0,
                      offs_d, D, Sk, kv_len, prefix_len, q_doc, DOC_row, PFX_row, win_l, win_r, qk_scale, cap_in,
                      cap_l2, seed, bh, drop_t, keep_scale, slope_l2, alibi_off, CAUSAL, HAS_PREFIX, HAS_KVLEN,
                      HAS_DOCS, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT, HAS_ALIBI, True, PREC, UPCAST, EVEN_D,
                      PREFIX_MASK)
    tl.store(DQ + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=_and_d(rmask[:, None], dmask[None, :], EVEN_D))


# ---- host side ----
@triton.jit(do_not_specialize=["S_outer", "S_inner", "n_inner", "n_outer"])
def _doc_range_kernel(ODOC, IDOC, RNG, KVLEN, S_outer, S_inner, stride_odoc, stride_idoc, n_outer, n_inner,
                      OUTER: tl.constexpr, INNER: tl.constexpr, CHUNK: tl.constexpr, HAS_KVLEN: tl.constexpr,
                      KEYS_OUTER: tl.constexpr):
    """RNG[b, o] = (first, last, s_first, s_last) for block o of OUTER positions of row b (see `_doc_block_range`);
    ODOC / IDOC: int32 rows of S_outer / S_inner contiguous ids of the outer and inner positions (one tensor in
    self-attention), stride_odoc / stride_idoc apart. Keys (the outer positions if KEYS_OUTER, else the inner
    ones) at or past KVLEN[b] share no document: they are never attended. Grid: (n_outer * B,). The inner blocks
    are scanned CHUNK at a time as a (CHUNK, INNER) tile."""
    o, b = _block_and_row(n_outer)
    orow = ODOC + b * stride_odoc
    row = IDOC + b * stride_idoc
    big = 2147483647
    outer_end = S_outer
    inner_end = S_inner
    if HAS_KVLEN:
        if KEYS_OUTER:
            outer_end = tl.minimum(S_outer, tl.load(KVLEN + b))
        else:
            inner_end = tl.minimum(S_inner, tl.load(KVLEN + b))
    offs = o * OUTER + tl.arange(0, OUTER)
    ids = tl.load(orow + offs, mask=offs < S_outer, other=0)
    omin = tl.min(tl.where(offs < outer_end, ids, big), 0)
    omax = tl.max(tl.where(offs < outer_end, ids, -big - 1), 0)
    single = omin == omax
    first = n_inner
    last = 0
    s_first = n_inner
    s_last = 0
    s_count = 0
    for j0 in range(0, n_inner, CHUNK):
        blk = j0 + tl.arange(0, CHUNK)
        pos = blk[:, None] * INNER + tl.arange(0, INNER)[None, :]
        inside = pos < inner_end
        x = tl.load(row + pos, mask=inside, other=0)
        imin = tl.min(tl.where(inside, x, big), 1)
        imax = tl.max(tl.where(inside, x, -big - 1), 1)
        valid = blk < n_inner
        meet = valid & (imin <= omax) & (imax >= omin)
        same = valid & single & (imin == imax) & (imin == omin)
        first = tl.minimum(first, tl.min(tl.where(meet, blk, n_inner), 0))
        last = tl.maximum(last, tl.max(tl.where(meet, blk + 1, 0), 0))
        s_first = tl.minimum(s_first, tl.min(tl.where(same, blk, n_inner), 0))
        s_last = tl.maximum(s_last, tl.max(tl.where(same, blk + 1, 0), 0))
        s_count += tl.sum(same.to(tl.int32), 0)
    any_meet = last > 0
    contiguous = (s_count > 0) & (s_count == s_last - s_first)
    out = RNG + (b * n_outer + o) * 4
    tl.store(out, tl.where(any_meet, first, 0))
    tl.store(out + 1, last)
    tl.store(out + 2, tl.where(contiguous, s_first, 0))
    tl.store(out + 3, tl.where(contiguous, s_last, 0))


def _doc_block_range(doc: torch.Tensor, outer: int, inner: int, kv_lens: torch.Tensor | None = None,
                     keys_outer: bool = False, inner_doc: torch.Tensor | None = None) -> torch.Tensor:
    """int32 (B, cdiv(S, outer), 4): for each block of `outer` positions (of `doc`), [first, last) of the blocks of
    `inner` positions (of `inner_doc`: the other sequence of a cross attention; None: `doc` too) whose doc-id range
    meets its own (the loop range: blocks outside never share a document), then
    [first, last) of the blocks that lie in the same single document as the whole outer block (no elementwise mask
    needed there; empty unless those blocks are contiguous, e.g. arbitrary unsorted ids). With `kv_lens` (int32
    (B,)) keys past a row's kv_len count in no document (the outer axis is the keys if `keys_outer`), so the
    padding's own document loads nothing. One kernel launch per
    call and no device sync: this runs on every forward and twice per backward, so a chain of small torch ops here
    (56 of them) cost more host time than the attention kernel of a short document mask."""
    inner_doc = doc if inner_doc is None else inner_doc
    B, S = doc.shape
    Si = inner_doc.shape[1]
    n_outer, n_inner = triton.cdiv(S, outer), triton.cdiv(Si, inner)
    rng = torch.empty((B, n_outer, 4), dtype=torch.int32, device=doc.device)
    _doc_range_kernel[(n_outer * B,)](doc, inner_doc, rng, kv_lens if kv_lens is not None else rng, S, Si,
                                      doc.stride(0), inner_doc.stride(0), n_outer, n_inner, OUTER=outer, INNER=inner,
                                      CHUNK=max(1, 1024 // inner), HAS_KVLEN=kv_lens is not None,
                                      KEYS_OUTER=keys_outer, num_warps=4)
    return rng


def _prefix_arg(prefix: torch.Tensor) -> torch.Tensor:
    """The kernels' PREFIX: prefix lengths (B,) as int32, or prefix flags (B, S) as int32 (B, 2 + S) rows of
    [first flag's position (S if none), last flag's position + 1 (0 if none), flags...] (PREFIX_MASK)."""
    if prefix.dim() == 1:
        return prefix.to(torch.int32).contiguous()
    flags = prefix.to(torch.int32)
    S = flags.shape[1]  # > 0: the launchers return before an empty sequence
    anyf = flags.amax(dim=1, keepdim=True) != 0
    first = torch.where(anyf, flags.argmax(dim=1, keepdim=True), S)
    last = torch.where(anyf, S - flags.flip(1).argmax(dim=1, keepdim=True), 0)
    return torch.cat([first.to(torch.int32), last.to(torch.int32), flags], dim=1).contiguous()


def _meta(q, prefix_lens, kv_lens, doc_ids, kv_doc_ids=None):
    """int32 contiguous (prefix, kv_len, query docs, key docs), a dummy for each that is None (the key docs are
    the query docs' tensor in self-attention). prefix_lens (B, S) are prefix flags (see `_prefix_arg`)."""
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    prefix = _prefix_arg(prefix_lens) if prefix_lens is not None else dummy
    kvl = kv_lens.to(torch.int32).contiguous() if kv_lens is not None else dummy
    doc = doc_ids.to(torch.int32).contiguous() if doc_ids is not None else dummy.view(1, 1)
    kdoc = kv_doc_ids.to(torch.int32).contiguous() if kv_doc_ids is not None else doc
    return prefix, kvl, doc, kdoc


def _prec(dtype: torch.dtype) -> str:
    # float32 inputs: full-precision dots (no TF32), to match plain float32 PyTorch.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(q: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and q.device.type != "cuda"  # see `_mm`


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along the head dim; contiguous when a sequence offset (position * stride(2), int32 in
    the kernels) could pass 2^31, e.g. a (B, S, H, D) view at 128k tokens x 128 heads x D 128."""
    if t.stride(-1) == 1 and t.shape[2] * t.stride(2) < 2**31:
        return t
    return t.contiguous()


def _window(window_left: int, window_right: int, Sk: int) -> tuple[bool, int, int]:
    """(HAS_WINDOW, win_l, win_r) for the kernels: -1 (unbounded) and bounds past the sequence become Sk, a bound
    the mask test always passes (and that stays far from int32's limit)."""
    wl, wr = (Sk if w < 0 else min(w, Sk) for w in (window_left, window_right))
    return wl < Sk or wr < Sk, wl, wr


def _dropout(dropout_p: float, seed, dummy: torch.Tensor) -> tuple[bool, torch.Tensor, int, float]:
    """(HAS_DROPOUT, SEED, drop_t, keep_scale) for the kernels: the threshold round(p * 2^32) (capped below 2^32,
    as reference/attention.py's `dropout_threshold`) shifted by -2^31 into int32; a p <= 0 is none."""
    if dropout_p <= 0:
        return False, dummy, 0, 1.0
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor")
    return True, seed, min(round(dropout_p * 2**32), 2**32 - 1) - 2**31, 1.0 / (1.0 - dropout_p)


def _alibi_arg(alibi_slopes, dummy: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """(HAS_ALIBI, ALIBI) for the kernels: the slopes, float32 (B, Hq) contiguous as the op takes them (the public
    attention() converts them once, for the forward and the backward)."""
    if alibi_slopes is None:
        return False, dummy
    return True, alibi_slopes


def _softcap(softcap: float, scale: float) -> tuple[bool, float, float]:
    """(HAS_SOFTCAP, cap_in, cap_l2) for the kernels: scores c * tanh(raw * scale / c), in base 2; a cap <= 0 is
    none."""
    if softcap <= 0:
        return False, 0.0, 0.0
    return True, scale / softcap, softcap * LOG2E


@on_data_device
def attention_forward(q, k, v, prefix_lens, doc_ids, kv_lens, causal: bool, window_left: int, window_right: int,
                      scale: float, softcap: float = 0.0, dropout_p: float = 0.0, seed=None, alibi_slopes=None,
                      kv_doc_ids=None):
    """(out (B, Hq, Sq, D) like q, lse (B, Hq, Sq) float32)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = torch.empty((B, Hq, Sq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or Sk == 0:
        return out.zero_(), lse.fill_(-math.inf)
    prefix, kvl, doc, kdoc = _meta(q, prefix_lens, kv_lens, doc_ids, kv_doc_ids)
    has_window, wl, wr = _window(window_left, window_right, Sk)
    has_cap, cap_in, cap_l2 = _softcap(softcap, scale)
    has_drop, seed_t, drop_t, keep_scale = _dropout(dropout_p, seed, prefix)
    has_alibi, slopes = _alibi_arg(alibi_slopes, lse)
    block_d = max(16, triton.next_power_of_2(D))
    kv_len_arg = kvl if kv_lens is not None else None

    def launch(bm, bn, warps, stages):
        n_qb = triton.cdiv(Sq, bm)
        rng = _doc_block_range(doc, bm, bn, kv_len_arg, inner_doc=kdoc) if doc_ids is not None else prefix
        _attn_fwd_kernel[(n_qb * B * Hq,)](
            q, k, v, out, lse, prefix, kvl, doc, kdoc, rng, seed_t, slopes,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), doc.stride(0),
            kdoc.stride(0), prefix.stride(0),
            Hq, Sq, Sk, D, Hq // Hkv, scale * LOG2E, n_qb, wl, wr, cap_in, cap_l2, drop_t, keep_scale,
            CAUSAL=causal, HAS_PREFIX=prefix_lens is not None, HAS_KVLEN=kv_lens is not None,
            HAS_DOCS=doc_ids is not None, HAS_WINDOW=has_window, HAS_SOFTCAP=has_cap, HAS_DROPOUT=has_drop,
            HAS_ALIBI=has_alibi, PREFIX_MASK=prefix.dim() == 2, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_D=block_d, PREC=_prec(q.dtype), UPCAST=_upcast(q), EVEN_D=block_d == D,
            num_warps=warps, num_stages=stages)

    _launch_fitted("fwd", D, q.dtype, q.device, launch)
    return out, lse


@on_data_device
def attention_backward(do, q, k, v, out, lse, prefix_lens, doc_ids, kv_lens, causal: bool, window_left: int,
                       window_right: int, scale: float, softcap: float = 0.0, dropout_p: float = 0.0, seed=None,
                       alibi_slopes=None, kv_doc_ids=None):
    """(dq, dk, dv), each contiguous in its input's dtype. Deterministic: no atomics."""
    do, q, k, v, out = (_last_dim_contiguous(t) for t in (do, q, k, v, out))
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dq = torch.empty((B, Hq, Sq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hkv, Sk, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, Sk, D), device=q.device, dtype=v.dtype)
    if dq.numel() == 0 or Sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    block_d = max(16, triton.next_power_of_2(D))
    has_window, wl, wr = _window(window_left, window_right, Sk)
    has_cap, cap_in, cap_l2 = _softcap(softcap, scale)
    prefix, kvl, doc, kdoc = _meta(q, prefix_lens, kv_lens, doc_ids, kv_doc_ids)
    has_drop, seed_t, drop_t, keep_scale = _dropout(dropout_p, seed, prefix)
    has_alibi, slopes = _alibi_arg(alibi_slopes, lse)
    flags = dict(CAUSAL=causal, HAS_PREFIX=prefix_lens is not None, HAS_KVLEN=kv_lens is not None,
                 HAS_DOCS=doc_ids is not None, HAS_WINDOW=has_window, HAS_SOFTCAP=has_cap, HAS_DROPOUT=has_drop,
                 HAS_ALIBI=has_alibi, PREFIX_MASK=prefix.dim() == 2, BLOCK_D=block_d, PREC=_prec(q.dtype),
                 UPCAST=_upcast(q), EVEN_D=block_d == D)
    kv_len_arg = kvl if kv_lens is not None else None
    group = Hq // Hkv

    delta = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    bm_d = 64 if block_d <= 128 else 32
    n_db = triton.cdiv(Sq, bm_d)
    _attn_bwd_delta_kernel[(n_db * B * Hq,)](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Sq, D, n_db, BLOCK_M=bm_d, BLOCK_D=block_d, EVEN_D=block_d == D)

    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), doc.stride(0),
               kdoc.stride(0), prefix.stride(0))
    def launch_dkdv(bm, bn, warps, stages):
        n_kb = triton.cdiv(Sk, bn)
        rng = (_doc_block_range(kdoc, bn, bm, kv_len_arg, keys_outer=True, inner_doc=doc) if doc_ids is not None
               else prefix)
        _attn_bwd_dkdv_kernel[(n_kb * B * Hkv,)](
            q, k, v, do, lse, delta, dk, dv, prefix, kvl, doc, kdoc, rng, seed_t, slopes, *strides,
            Hq, Hkv, Sq, Sk, D, group, scale, scale * LOG2E, n_kb, wl, wr, cap_in, cap_l2, drop_t, keep_scale,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **flags)

    def launch_dq(bm, bn, warps, stages):
        n_qb = triton.cdiv(Sq, bm)
        rng = _doc_block_range(doc, bm, bn, kv_len_arg, inner_doc=kdoc) if doc_ids is not None else prefix
        _attn_bwd_dq_kernel[(n_qb * B * Hq,)](
            q, k, v, do, lse, delta, dq, prefix, kvl, doc, kdoc, rng, seed_t, slopes, *strides,
            Hq, Sq, Sk, D, group, scale, scale * LOG2E, n_qb, wl, wr, cap_in, cap_l2, drop_t, keep_scale,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **flags)

    _launch_fitted("dkdv", D, q.dtype, q.device, launch_dkdv)
    _launch_fitted("dq", D, q.dtype, q.device, launch_dq)
    return dq, dk, dv
