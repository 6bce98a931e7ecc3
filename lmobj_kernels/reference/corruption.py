"""Plain NumPy references of the corruption family (ALGORITHMS.md, "Randomness", "T5 span corruption",
"MLM masking"): the definition every backend matches byte for byte.

Written for clarity, row by row, with a pure NumPy Philox4x32-10 and a sort where the kernels use selection.

Random draws (all backends):
- Philox4x32-10 with key = seed (low word, high word); counter (c0, c1, c2, c3) = (block, global row low 32 bits,
  global row high 32 bits, stream), global row = row_offset + local row.
- Span corruption: slot j of a composition gets key = word j % 4 of block j // 4, stream 1 (noise) or 2 (non-noise).
  The k - 1 cuts are the slots with the smallest (key, j) pairs; a cut at slot j ends a run after its item j.
- MLM: the key of token p is draw p of stream 3; the key of a word is draw p of stream 4, p its first token; a
  selected token p reads block p of stream 5: word 0 = the 80/10/10 draw u (mask when u < round(p_mask 2^32),
  random when u < round((p_mask + p_random) 2^32)), word 1 = the random id (low + w * range >> 32).
  Without `exact`, a unit is selected when its key < round(p * 2^32). With `exact`, the ops' select_threshold
  holds the float64 bits of p instead (`rate_bits`), and the units with the c smallest (key, p) pairs are selected.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

STREAM_SPAN_NOISE, STREAM_SPAN_KEEP, STREAM_MLM_SELECT, STREAM_MLM_WORD, STREAM_MLM_REPLACE = 1, 2, 3, 4, 5
STREAM_ATTN_DROPOUT = 6  # reference/attention.py's dropout: the same Philox, its own stream
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(seed: int, c0, c1, c2, c3):
    """Philox4x32-10 (Random123 / Triton's tl.philox) on arrays of 32-bit counters; returns four uint32 arrays."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    c = [np.asarray(v, dtype=np.uint64) & _M32 for v in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = np.broadcast_arrays(*c)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p2 = c0 * a, c2 * b  # exact: 32 x 32 -> 64 bits
        c0, c1, c2, c3 = (p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return tuple(v.astype(np.uint32) for v in (c0, c1, c2, c3))


_M16 = 0xFFFF


def _mul_hi_lo(c: torch.Tensor, a: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of c * a for int64 c in [0, 2^32) and a constant a < 2^32, in 16-bit halves of a
    so that no int64 product overflows (c * a itself can reach 2^64)."""
    x, y = c * (a >> 16), c * (a & _M16)  # each < 2^48
    return (x + (y >> 16)) >> 16, (((x & _M16) << 16) + y) & 0xFFFFFFFF


def philox4x32_10_torch(seed: torch.Tensor | int, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """`philox4x32_10` in torch int64 arithmetic, on any device and without a host read of the seed: the seed is
    an int (or an int64 tensor of one element, e.g. on the GPU), the counters broadcastable int64 tensors with
    values in [0, 2^32). Returns the four words as int64 tensors in [0, 2^32)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(())
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    for _ in range(10):
        h0, l0 = _mul_hi_lo(c0, 0xD2511F53)
        h2, l2 = _mul_hi_lo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = h2 ^ c1 ^ k0, l2, h0 ^ c3 ^ k1, l0
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def row_draws(seed: int, row: int, stream: int, count: int) -> np.ndarray:
    """Draws 0..count-1 of a row's stream (draw j = word j % 4 of block j // 4), as uint32."""
    blocks = np.arange((count + 3) // 4, dtype=np.uint64)
    words = philox4x32_10(seed, blocks, row & 0xFFFFFFFF, (row >> 32) & 0xFFFFFFFF, stream)
    return np.stack(words, axis=1).reshape(-1)[:count]


def span_counts(lengths, noise_density: float, mean_span_length: float):
    """(n, k) per row as int64 arrays: T5's float32 arithmetic with round-half-even (np.rint); n = 0 means the row
    is not corrupted (noise_density == 0 or fewer than 2 tokens)."""
    L = np.asarray(lengths, dtype=np.int64)
    r, m = np.float32(noise_density), np.float32(mean_span_length)
    n = np.rint(L.astype(np.float32) * r).astype(np.int64)
    n = np.minimum(np.maximum(n, 1), L - 1)
    k = np.maximum(np.rint(n.astype(np.float32) / m).astype(np.int64), 1)
    k = np.minimum(k, L - n)
    off = (L < 2) | (not noise_density > 0)
    return np.where(off, 0, n), np.where(off, 0, k)


def span_output_lengths(lengths, noise_density: float, mean_span_length: float):
    """(len(inputs), len(targets)) per row, eos included."""
    L = np.asarray(lengths, dtype=np.int64)
    n, k = span_counts(L, noise_density, mean_span_length)
    return np.where(n > 0, L - n + k + 1, L + 1), np.where(n > 0, n + k + 1, 1)


def random_composition(seed: int, row: int, stream: int, total: int, parts: int) -> np.ndarray:
    """A uniformly random composition of `total` into `parts` positive parts: cuts at the parts - 1 of the
    total - 1 slots with the smallest (key, slot) pairs."""
    slots = total - 1
    keys = row_draws(seed, row, stream, slots).astype(np.int64)
    order = np.lexsort((np.arange(slots), keys))  # by key, then by slot
    cuts = np.sort(order[: parts - 1]) + 1  # run boundaries
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(seed: int, row: int, length: int, noise_density: float, mean_span_length: float) -> np.ndarray:
    """The boolean noise mask of one row (ALGORITHMS.md steps 1-5)."""
    n, k = (int(v[0]) for v in span_counts([length], noise_density, mean_span_length))
    if n == 0:
        return np.zeros(length, dtype=bool)
    noise = random_composition(seed, row, STREAM_SPAN_NOISE, n, k)
    keep = random_composition(seed, row, STREAM_SPAN_KEEP, length - n, k)
    lens = np.stack([keep, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], k), lens)


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinels) -> list:
    """T5's noise_span_to_unique_sentinel: each run of masked tokens becomes the next sentinel."""
    out, q = [], 0
    for i, (t, m) in enumerate(zip(tokens, mask)):
        if not m:
            out.append(int(t))
        elif i == 0 or not mask[i - 1]:
            out.append(int(sentinels[q]))
            q += 1
    return out


def span_corrupt(input_ids: torch.Tensor, lengths, seed: int, row_offset: int, noise_density: float,
                 mean_span_length: float, sentinel_ids, eos_id: int, pad_id: int, label_pad_id: int,
                 inputs_width: int, targets_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) as the ops return them: padded to the given widths."""
    x = input_ids.detach().cpu().numpy()
    lens = np.asarray(lengths, dtype=np.int64)
    sent = [int(s) for s in sentinel_ids]
    B = x.shape[0]
    inputs = np.full((B, inputs_width), pad_id, dtype=np.int64)
    targets = np.full((B, targets_width), label_pad_id, dtype=np.int64)
    for b in range(B):
        L = int(lens[b])
        tok = x[b, :L]
        mask = noise_mask(seed, row_offset + b, L, noise_density, mean_span_length)
        inp = _replace_spans(tok, mask, sent) + [eos_id]
        tgt = (_replace_spans(tok, ~mask, sent) if mask.any() else []) + [eos_id]
        inputs[b, : len(inp)] = inp
        targets[b, : len(tgt)] = tgt
    return torch.from_numpy(inputs).to(input_ids.device), torch.from_numpy(targets).to(input_ids.device)


def rate_bits(p: float) -> int:
    """The IEEE-754 bits of the float64 p as an int64: how the exact MLM rate travels in the ops' int argument."""
    return struct.unpack("<q", struct.pack("<d", float(p)))[0]


def mlm_exact_count(eligible: int, rate_bits_: int) -> int:
    """round_half_even(eligible * p) of the float64 product (rounded as BERT's round(len(tokens) * masked_lm_prob)),
    p given by its bits (`rate_bits`), clamped to [1, eligible] (0 if none)."""
    if eligible <= 0:
        return 0
    p = struct.unpack("<d", struct.pack("<q", rate_bits_))[0]
    return min(max(round(float(eligible) * p), 1), eligible)  # Python's round: half to even


def mlm_mask(input_ids: torch.Tensor, word_ids, seed: int, row_offset: int, special_ids, exact: bool,
             select_threshold: int, mask_threshold: int, random_threshold: int, random_low: int, random_range: int,
             mask_id: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = input_ids.detach().cpu().numpy().astype(np.int64)
    w = None if word_ids is None else word_ids.detach().cpu().numpy().astype(np.int64)
    B, S = x.shape
    out, labels = x.copy(), np.full_like(x, ignore_index)
    special = np.asarray(list(special_ids), dtype=np.int64)
    for b in range(B):
        row = b + row_offset
        w0 = row_draws(seed, row, STREAM_MLM_SELECT, S).astype(np.int64)
        w3 = row_draws(seed, row, STREAM_MLM_WORD, S).astype(np.int64)
        w1, w2 = (v.astype(np.int64) for v in philox4x32_10(seed, np.arange(S), row & 0xFFFFFFFF, row >> 32,
                                                             STREAM_MLM_REPLACE)[:2])
        elig = ~np.isin(x[b], special)
        if w is None:
            starts = np.flatnonzero(elig)
            keys = w0[starts]
            owner = np.where(elig, np.arange(S), -1)
        else:
            elig &= w[b] >= 0
            prev_same = np.concatenate([[False], elig[:-1] & (w[b, 1:] == w[b, :-1])])
            starts = np.flatnonzero(elig & ~prev_same)
            keys = w3[starts]
            owner = np.full(S, -1)
            for s in starts:  # a word runs from its start over eligible tokens with the same id
                p = s
                while p < S and elig[p] and w[b, p] == w[b, s]:
                    owner[p] = s
                    p += 1
        if exact:
            c = mlm_exact_count(len(starts), select_threshold)
            chosen = set(starts[np.lexsort((starts, keys))[:c]].tolist())
        else:
            chosen = set(starts[keys < select_threshold].tolist())
        for p in range(S):
            if owner[p] < 0 or owner[p] not in chosen:
                continue
            labels[b, p] = x[b, p]
            if w1[p] < mask_threshold:
                out[b, p] = mask_id
            elif w1[p] < random_threshold:
                out[b, p] = random_low + ((int(w2[p]) * random_range) >> 32)
    return torch.from_numpy(out).to(input_ids.device), torch.from_numpy(labels).to(input_ids.device)
