"""Triton kernels of the corruption family (ALGORITHMS.md, "Randomness", "T5 span corruption", "MLM masking").

Same bytes as the C++ kernels and lmobj_kernels/reference/corruption.py for the same seed: Philox4x32-10 via
tl.philox with counter (block, global row low, global row high, stream). One program per row, the whole row in
one block of BLOCK lanes (rows up to a few thousand tokens).

Cuts of a random composition are the `want` slots with the smallest (key, slot) pairs: a 32-step binary search
finds the threshold key T, then slots with key < T, plus the first `want - #(key < T)` slots with key == T.
Runs compiled on a GPU and under TRITON_INTERPRET=1 on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_data_device

# tl.constexpr: compiled Triton (3.6 on the GPU machines) refuses plain globals inside @jit; the interpreter took them
STREAM_SPAN_NOISE, STREAM_SPAN_KEEP, STREAM_MLM_SELECT, STREAM_MLM_WORD, STREAM_MLM_REPLACE = (
    tl.constexpr(1), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4), tl.constexpr(5))


@triton.jit
def _philox_block(seed, blk, g, stream):
    """The four uint32 words of Philox block `blk` (vector) of global row g (int64 scalar) in `stream`."""
    c0 = blk.to(tl.uint32)
    z = c0 * 0
    lo = (g & 0xFFFFFFFF).to(tl.uint32)
    hi = ((g >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return tl.philox(seed, c0, z + lo, z + hi, z + stream)


@triton.jit
def _slot_keys(seed, g, stream, j):
    """Draw j (vector) of a row's stream as int64 in [0, 2^32): word j % 4 of block j // 4."""
    r0, r1, r2, r3 = _philox_block(seed, j >> 2, g, stream)
    w = j & 3
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return r.to(tl.int64)


@triton.jit
def _select_smallest(keys, valid, want):
    """Flags of the `want` valid lanes with the smallest (key, lane) pairs (keys int64 in [0, 2^32))."""
    k = tl.where(valid, keys, 1 << 32)
    want = tl.maximum(want, 0)
    lo = want.to(tl.int64) * 0
    hi = lo + 0xFFFFFFFF
    for _ in range(32):  # smallest T with #(k <= T) >= want
        mid = (lo + hi) >> 1
        go_left = tl.sum((k <= mid).to(tl.int32), axis=0) >= want
        hi = tl.where(go_left, mid, hi)
        lo = tl.where(go_left, lo, mid + 1)
    lt = k < lo
    need = want - tl.sum(lt.to(tl.int32), axis=0)
    eq = (k == lo).to(tl.int32)
    rank = tl.cumsum(eq, axis=0) - eq
    # want = 0 selects nothing as it is (lo = 0, keys >= 0: no lt, need = 0). No `& (want > 0)`: Triton 3.9's
    # interpreter broadcasts that scalar compare as int32 data, and its store refuses such a mask.
    return lt | ((eq == 1) & (rank < need))


@triton.jit
def _round_half_even(x):
    """round half to even of a float32 x >= 0, by comparison (no subtraction an FMA could fuse)."""
    t = x.to(tl.int64)
    h = t.to(tl.float32) + 0.5
    return tl.where((x > h) | ((x == h) & ((t & 1) == 1)), t + 1, t)


@triton.jit
def _span_kernel(X, stride_x, S, LEN, SEED, SENT, n_sent, IN, W_in, TG, W_tg, SCR, row_offset, noise_density,
                 mean_span_length, eos_id, pad_id, label_pad_id, BLOCK: tl.constexpr):
    """T5 span corruption of row b = program_id(0).

    X (B, S) ids, rows stride_x apart; LEN (B,) real lengths; SEED int64 [1]; SENT (n_sent,) sentinel ids;
    IN (B, W_in) / TG (B, W_tg) outputs (contiguous); SCR (B, 2, BLOCK) int32 scratch for the run ends;
    BLOCK >= S, a power of two.
    """
    b = tl.program_id(0).to(tl.int64)
    g = row_offset + b
    seed = tl.load(SEED)
    L = tl.minimum(tl.maximum(tl.load(LEN + b), 0), S)
    # ALGORITHMS.md steps 1-3 in float32, round half to even
    noisy = (noise_density > 0.0) & (L >= 2)
    n = _round_half_even(L.to(tl.float32) * noise_density)
    n = tl.minimum(tl.maximum(n, 1), L - 1)
    k = _round_half_even(tl.math.div_rn(n.to(tl.float32), mean_span_length))
    k = tl.minimum(tl.maximum(k, 1), L - n)
    n = tl.where(noisy, n, 0)
    k = tl.where(noisy, k, 0)
    nkeep = L - n

    j = tl.arange(0, BLOCK).to(tl.int64)
    cut_n = _select_smallest(_slot_keys(seed, g, STREAM_SPAN_NOISE, j), j < n - 1, k - 1)
    cut_x = _select_smallest(_slot_keys(seed, g, STREAM_SPAN_KEEP, j), j < nkeep - 1, k - 1)
    cn = cut_n.to(tl.int64)
    cx = cut_x.to(tl.int64)
    sn = tl.cumsum(cn, axis=0) - cn  # run of noise token j
    sx = tl.cumsum(cx, axis=0) - cx  # run of non-noise token j
    scr_b = SCR + b * 2 * BLOCK  # [0, BLOCK): end of noise run q (B_q); [BLOCK, 2 BLOCK): end of keep run q (A_q)
    scr_a = scr_b + BLOCK
    tl.store(scr_b + sn, (j + 1).to(tl.int32), mask=(cut_n | (j == n - 1)) & (j < n))
    tl.store(scr_a + sx, (j + 1).to(tl.int32), mask=(cut_x | (j == nkeep - 1)) & (j < nkeep))
    tl.debug_barrier()

    x_row = X + b * stride_x
    in_row = IN + b * W_in
    tg_row = TG + b * W_tg
    is_n = j < n
    a_q = tl.load(scr_a + sn, mask=is_n, other=0).to(tl.int64)  # noise token j sits at A_q + j
    src = a_q + j
    tok = tl.load(x_row + src, mask=is_n & (src < L), other=pad_id)
    dst = j + sn + 1
    tl.store(tg_row + dst, tok, mask=is_n & (dst < W_tg))
    is_x = j < nkeep
    b_prev = tl.load(scr_b + sx - 1, mask=is_x & (sx > 0), other=0).to(tl.int64)  # keep token j: B_{q-1} + j
    src = b_prev + j
    tok = tl.load(x_row + src, mask=is_x & (src < L), other=pad_id)
    dst = j + sx
    tl.store(in_row + dst, tok, mask=is_x & (dst < W_in))
    is_q = j < k  # sentinel q: inputs at A_q + q, targets at B_{q-1} + q
    s = tl.load(SENT + tl.minimum(j, n_sent - 1), mask=is_q, other=0)
    a_q = tl.load(scr_a + j, mask=is_q, other=0).to(tl.int64)
    b_prev = tl.load(scr_b + j - 1, mask=is_q & (j > 0), other=0).to(tl.int64)
    tl.store(in_row + a_q + j, s, mask=is_q & (a_q + j < W_in))
    tl.store(tg_row + b_prev + j, s, mask=is_q & (b_prev + j < W_tg))

    in_len = tl.where(noisy, L - n + k + 1, L + 1)
    tg_len = tl.where(noisy, n + k + 1, 1)
    for off in range(0, W_in, BLOCK):
        c = off + j
        v = tl.where(c == in_len - 1, eos_id, pad_id).to(IN.dtype.element_ty)
        tl.store(in_row + c, v, mask=(c >= in_len - 1) & (c < W_in))
    for off in range(0, W_tg, BLOCK):
        c = off + j
        v = tl.where(c == tg_len - 1, eos_id, label_pad_id).to(TG.dtype.element_ty)
        tl.store(tg_row + c, v, mask=(c >= tg_len - 1) & (c < W_tg))


def _block(S: int) -> int:
    return max(16, triton.next_power_of_2(max(S, 1)))


@on_data_device
def span_corrupt(input_ids, lengths, seed, row_offset, noise_density, mean_span_length, sentinel_ids, eos_id, pad_id,
                 label_pad_id, inputs_width, targets_width):
    """Launcher with the arguments of lmobj::span_corrupt; returns (inputs, targets)."""
    B, S = input_ids.shape
    inputs = input_ids.new_empty((B, inputs_width))
    targets = input_ids.new_empty((B, targets_width))
    if B == 0:
        return inputs, targets
    BLOCK = _block(S)
    scratch = torch.empty((B, 2, BLOCK), dtype=torch.int32, device=input_ids.device)
    _span_kernel[(B,)](input_ids, input_ids.stride(0), S, lengths, seed, sentinel_ids, sentinel_ids.numel(), inputs,
                       inputs_width, targets, targets_width, scratch, row_offset, float(noise_density),
                       float(mean_span_length), eos_id, pad_id, label_pad_id, BLOCK=BLOCK,
                       num_warps=4 if BLOCK <= 1024 else 8)
    return inputs, targets


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _eligible(X_row, W_row, SPEC, n_spec, p, inb, HAS_WORDS: tl.constexpr):
    x = tl.load(X_row + p, mask=inb, other=0)
    e = inb
    for s in range(n_spec):
        e = e & (x != tl.load(SPEC + s))
    if HAS_WORDS:
        w = tl.load(W_row + p, mask=inb, other=-1)
        e = e & (w >= 0)
    else:
        w = p
    return x, w, e


@triton.jit
def _mlm_kernel(X, stride_x, Wd, stride_w, S, SEED, SPEC, n_spec, OUT, LAB, row_offset, select_threshold,
                mask_threshold, random_threshold, random_low, random_range, mask_id, ignore_index,
                HAS_WORDS: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr):
    """BERT masking of row b = program_id(0): X (B, S) ids (rows stride_x apart), Wd (B, S) word ids (rows
    stride_w apart; -1 = no word) when HAS_WORDS, SPEC (n_spec,) ineligible ids, OUT / LAB (B, S) contiguous.
    Thresholds are probabilities times 2^32 (EXACT: select_threshold holds the float64 bits of the rate)."""
    b = tl.program_id(0).to(tl.int64)
    g = row_offset + b
    seed = tl.load(SEED)
    p = tl.arange(0, BLOCK).to(tl.int64)
    inb = p < S
    X_row = X + b * stride_x
    W_row = Wd + b * stride_w
    x, w, elig = _eligible(X_row, W_row, SPEC, n_spec, p, inb, HAS_WORDS)
    if HAS_WORDS:
        _, w_prev, e_prev = _eligible(X_row, W_row, SPEC, n_spec, p - 1, inb & (p > 0), HAS_WORDS)
        unit = elig & ~(e_prev & (w_prev == w))
        key = _slot_keys(seed, g, STREAM_MLM_WORD, p)
    else:
        unit = elig
        key = _slot_keys(seed, g, STREAM_MLM_SELECT, p)
    if EXACT:  # round_half_even of the float64 E * p, p's bits in select_threshold (span_math.h mlm_exact_count)
        want = tl.sum(unit.to(tl.int64), axis=0)
        ep = want.to(tl.float64) * select_threshold.to(tl.int64).to(tl.float64, bitcast=True)
        c = ep.to(tl.int64)
        half = c.to(tl.float64) + 0.5
        c = tl.where((ep > half) | ((ep == half) & ((c & 1) == 1)), c + 1, c)
        c = tl.minimum(tl.maximum(c, 1), want)
        chosen = _select_smallest(key, unit, c)
    else:
        chosen = unit & (key < select_threshold)
    # each eligible token takes the decision of the latest unit (its word's first token): cummax of 2p + chosen
    tag = tl.where(unit, 2 * p + chosen.to(tl.int64), -1)
    last = tl.associative_scan(tag, 0, _max_combine)
    sel = elig & (last >= 0) & ((last & 1) == 1)
    r0, r1, _, _ = _philox_block(seed, p, g, STREAM_MLM_REPLACE)
    u = r0.to(tl.int64)
    rnd = random_low + ((r1.to(tl.int64) * random_range) >> 32)
    new = tl.where(u < mask_threshold, mask_id, tl.where(u < random_threshold, rnd, x))
    out = tl.where(sel, new, x)
    lab = tl.where(sel, x, ignore_index)
    tl.store(OUT + b * S + p, out.to(OUT.dtype.element_ty), mask=inb)
    tl.store(LAB + b * S + p, lab.to(LAB.dtype.element_ty), mask=inb)


@on_data_device
def mlm_mask(input_ids, word_ids, seed, row_offset, special_ids, exact, select_threshold, mask_threshold,
             random_threshold, random_low, random_range, mask_id, ignore_index):
    """Launcher with the arguments of lmobj::mlm_mask; returns (inputs, labels)."""
    B, S = input_ids.shape
    out = input_ids.new_empty((B, S))
    labels = input_ids.new_empty((B, S))
    if B == 0 or S == 0:
        return out, labels
    words = word_ids if word_ids is not None else input_ids  # never read without HAS_WORDS
    spec = special_ids if special_ids.numel() else input_ids  # an empty CUDA tensor has a null pointer
    _mlm_kernel[(B,)](input_ids, input_ids.stride(0), words, words.stride(0), S, seed, spec,
                      special_ids.numel(), out, labels, row_offset, select_threshold, mask_threshold,
                      random_threshold, random_low, random_range, mask_id, ignore_index,
                      HAS_WORDS=word_ids is not None, EXACT=bool(exact), BLOCK=_block(S),
                      num_warps=4 if S <= 1024 else 8)
    return out, labels
