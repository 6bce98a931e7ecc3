"""Corruption family (ALGORITHMS.md, "Randomness", "T5 span corruption", "MLM masking"): exact invariants,
byte equality across backends (C++ CPU, interpreted Triton, NumPy reference; CUDA and compiled Triton on a GPU),
batch-split invariance, distributions, bad inputs, opcheck and torch.compile."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lmobj_kernels.corruption as C
from lmobj_kernels._backend import available_backends
from lmobj_kernels.reference import corruption as ref

HERE = os.path.dirname(os.path.abspath(__file__))
V = 1000  # vocabulary of the tests; sentinels are 999, 998, ...; real tokens are drawn from [2, 850)
EOS, PAD = 1, 0
CPU_BACKENDS = [b for b in ("cpu", "triton", "torch") if b in available_backends(torch.device("cpu"))]
KERNELS = [b for b in CPU_BACKENDS if b != "torch"]
needs_triton = pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton (TRITON_INTERPRET=1) not available")


def _tokens(B, S, seed=0, lo=2, hi=850):
    return torch.randint(lo, hi, (B, S), generator=torch.Generator().manual_seed(seed))


def _chi2_bound(df: int, z: float = 4.753) -> float:
    """Upper 1e-6 quantile of chi-square(df) (Wilson-Hilferty); a correct sampler fails it once in a million."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom, bins with expected < 5 pooled into their neighbour."""
    total = counts.sum()
    exp = probs * total
    obs_b, exp_b, o, e = [], [], 0.0, 0.0
    for ob, ex in zip(counts, exp):
        o, e = o + ob, e + ex
        if e >= 5:
            obs_b.append(o)
            exp_b.append(e)
            o, e = 0.0, 0.0
    if e > 0:
        obs_b[-1] += o
        exp_b[-1] += e
    obs_b, exp_b = np.array(obs_b), np.array(exp_b)
    return float(((obs_b - exp_b) ** 2 / exp_b).sum()), len(obs_b) - 1


# ---------------------------------------------------------------------------------------------------- Philox
def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10
    assert [int(v) for v in ref.philox4x32_10(0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = ref.philox4x32_10(2**64 - 1, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    assert [int(v) for v in ones] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = ref.philox4x32_10(0x299F31D0A4093822, 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert [int(v) for v in pi] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@needs_triton
def test_philox_matches_triton_randint4x():
    import triton
    import triton.language as tl

    @triton.jit
    def k(SEED, OUT, N: tl.constexpr):
        off = tl.arange(0, N)
        a, b, c, d = tl.randint4x(tl.load(SEED), off)
        tl.store(OUT + off * 4 + 0, a.to(tl.int64) & 0xFFFFFFFF)
        tl.store(OUT + off * 4 + 1, b.to(tl.int64) & 0xFFFFFFFF)
        tl.store(OUT + off * 4 + 2, c.to(tl.int64) & 0xFFFFFFFF)
        tl.store(OUT + off * 4 + 3, d.to(tl.int64) & 0xFFFFFFFF)

    for seed in (0, 12345, 2**40 + 7, 2**63 - 1):
        out = torch.empty(64 * 4, dtype=torch.int64)
        k[(1,)](torch.tensor([seed]), out, N=64)
        want = np.stack(ref.philox4x32_10(seed, np.arange(64), 0, 0, 0), axis=1).reshape(-1).astype(np.int64)
        assert np.array_equal(out.numpy(), want), seed


# ---------------------------------------------------------------------------------------------------- span math
def test_span_counts_match_t5_float32():
    n, k = ref.span_counts([190], 0.15, 3.0)
    assert (int(n[0]), int(k[0])) == (29, 10)  # T5 float32 rounding; a float64 port gives 28
    assert round(190 * 0.15) == 28
    n, k = ref.span_counts([568, 70, 2, 3, 1, 0, 10], 0.15, 3.0)
    assert n.tolist() == [85, 10, 1, 1, 0, 0, 2] and k.tolist() == [28, 3, 1, 1, 0, 0, 1]
    n, k = ref.span_counts([10], 0.9, 1.0)  # k capped at L - n
    assert (int(n[0]), int(k[0])) == (9, 1)


def test_t5_input_length():
    assert C.t5_input_length(512, 0.15, 3.0) == (568, 114)
    assert C.t5_input_length(64, 0.2, 2.0) == (70, 22)
    for il in (16, 100, 512, 1024):
        t, tl_ = C.t5_input_length(il)
        ins, tgs = ref.span_output_lengths(np.arange(t, t + 200), 0.15, 3.0)
        assert ins[0] <= il and (ins[1:] > il).all() and tgs[0] == tl_  # the largest raw length that fits


# ---------------------------------------------------------------------------------------------------- invariants
def _check_row(x_row, L, r, m, inp, lab, n_sent=100):
    """Every exact invariant of ALGORITHMS.md for one row; returns (noise span lengths, keep span lengths)."""
    x_row = x_row[:L].tolist()
    n, k = (int(v[0]) for v in ref.span_counts([L], r, m))
    sent = [V - 1 - q for q in range(n_sent)]
    sset = set(sent)
    in_len, tg_len = (L - n + k + 1, n + k + 1) if n else (L + 1, 1)
    assert inp[in_len - 1] == EOS and all(v == PAD for v in inp[in_len:])
    assert lab[tg_len - 1] == EOS and all(v == -100 for v in lab[tg_len:])
    inp, lab = inp[: in_len - 1], lab[: tg_len - 1]
    if n == 0:
        assert inp == x_row and lab == []
        return [], []
    in_s = [v for v in inp if v >= V - n_sent]
    tg_s = [v for v in lab if v >= V - n_sent]
    assert in_s == sent[:k] and tg_s == sent[:k]  # sentinel order, k spans
    assert inp[0] not in sset and lab[0] == sent[0] and lab[-1] not in sset  # starts non-noise, ends noise
    assert sum(v not in sset for v in lab) == n  # noise count
    rebuilt, pos = [], {s: i for i, s in enumerate(lab) if s in sset}  # merge targets back into inputs
    noise_lens, keep_lens, run = [], [], 0
    for v in inp:
        if v in pos:
            j = pos[v] + 1
            seg = []
            while j < len(lab) and lab[j] not in sset:
                seg.append(lab[j])
                j += 1
            assert seg, "empty noise span"
            rebuilt += seg
            noise_lens.append(len(seg))
            keep_lens.append(run)
            run = 0
        else:
            rebuilt.append(v)
            run += 1
    assert rebuilt == x_row, "targets merged into inputs do not rebuild the row"
    assert min(keep_lens) >= 1 and run == 0
    return noise_lens, keep_lens


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("r,m", [(0.15, 3.0), (0.5, 1.0), (0.3, 8.0), (0.0, 3.0)])
def test_span_invariants(backend, r, m):
    S = 61
    lens = [61, 60, 33, 7, 2, 1, 0, 19] if backend != "triton" else [61, 7, 2, 0]
    x = _tokens(len(lens), S, seed=1)
    x_before = x.clone()
    out = C.span_corrupt(x, lens, noise_density=r, mean_span_length=m, vocab_size=V, eos_id=EOS, pad_id=PAD,
                         seed=77, backend=backend)
    assert torch.equal(x, x_before), "the caller's tensor was modified"
    ins, tgs = ref.span_output_lengths(lens, r, m)
    assert out.input_lengths.tolist() == ins.tolist() and out.label_lengths.tolist() == tgs.tolist()
    assert out.input_ids.shape == (len(lens), ins.max()) and out.labels.shape == (len(lens), tgs.max())
    for b, L in enumerate(lens):
        _check_row(x[b], L, r, m, out.input_ids[b].tolist(), out.labels[b].tolist())
    assert torch.equal(out.attention_mask.bool(), out.input_ids != PAD)
    assert torch.equal(out.decoder_attention_mask.bool(), out.labels != -100)
    # decoder inputs: labels shifted right behind the start id (pad_id, as T5), pads where labels are padding
    dec = torch.cat([torch.full((len(lens), 1), PAD), out.labels[:, :-1]], 1)
    assert torch.equal(out.decoder_input_ids, torch.where(dec < 0, PAD, dec))


def test_span_fixed_length_and_dtypes():
    x = _tokens(4, 568, seed=2, hi=32000).to(torch.int32)  # T5: 32000 pieces + 100 extra ids
    out = C.span_corrupt(x, vocab_size=32100, eos_id=EOS, seed=3, decoder_start_id=5)
    assert out.input_ids.shape == (4, 512) and out.labels.shape == (4, 114)
    assert out.input_ids.dtype == torch.int64 and bool(out.attention_mask.all())
    assert out.input_ids[:, -1].eq(EOS).all() and out.decoder_input_ids[:, 0].eq(5).all()
    for row in out.input_ids.tolist():  # <extra_id_0> = 32099, <extra_id_1> = 32098, ... in order
        assert [v for v in row if v >= 32000] == list(range(32099, 32099 - 28, -1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_span_padding_never_changes(backend):
    x = _tokens(3, 40, seed=4)
    x[:, 30:] = PAD
    a = C.span_corrupt(x, [30, 30, 30], vocab_size=V, eos_id=EOS, seed=9, backend=backend)
    y = x.clone()
    y[:, 30:] = 777  # whatever sits in the padding is never read
    b = C.span_corrupt(y, [30, 30, 30], vocab_size=V, eos_id=EOS, seed=9, backend=backend)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------------------- bytes
def _span_all(x, lens, backend, **kw):
    return C.span_corrupt(x, lens, vocab_size=V, eos_id=EOS, backend=backend, **kw)


@pytest.mark.parametrize("r,m,S", [(0.15, 3.0, 97), (0.5, 2.0, 40), (0.8, 1.5, 33), (0.05, 8.0, 130)])
def test_span_bytes_equal_across_backends(r, m, S):
    lens = [S, S - 1, S // 2, 3, 1, 0]
    x = _tokens(len(lens), S, seed=5)
    outs = {b: _span_all(x, lens, b, noise_density=r, mean_span_length=m, seed=2**62 + 11, row_offset=3)
            for b in CPU_BACKENDS}
    for b in KERNELS:
        for u, v in zip(outs[b], outs["torch"]):
            assert torch.equal(u, v), b


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_span_batch_split_invariance(backend):
    lens = [50, 49, 13, 50, 2, 37, 50, 20, 45]
    x = _tokens(len(lens), 50, seed=6)
    full = _span_all(x, lens, backend, seed=42, row_offset=100)
    for cut in (1, 4, 8):
        a = _span_all(x[:cut], lens[:cut], backend, seed=42, row_offset=100)
        b = _span_all(x[cut:], lens[cut:], backend, seed=42, row_offset=100 + cut)
        for part, lo in ((a, 0), (b, cut)):
            n = part.input_ids.shape[0]
            for i in range(n):
                L_in, L_tg = int(part.input_lengths[i]), int(part.label_lengths[i])
                assert torch.equal(part.input_ids[i, :L_in], full.input_ids[lo + i, :L_in])
                assert torch.equal(part.labels[i, :L_tg], full.labels[lo + i, :L_tg])


def test_span_seeds():
    x = _tokens(4, 80, seed=7)
    a = _span_all(x, None, "cpu", seed=1)
    assert torch.equal(a.input_ids, _span_all(x, None, "cpu", seed=1).input_ids)
    assert not torch.equal(a.input_ids, _span_all(x, None, "cpu", seed=2).input_ids)
    assert torch.equal(a.input_ids, _span_all(x, None, "cpu", seed=torch.tensor([1])).input_ids)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(_span_all(x, None, "cpu", generator=g1).input_ids,
                       _span_all(x, None, "cpu", generator=g2).input_ids)
    # no seed: fresh draws from torch's default generator
    assert not torch.equal(_span_all(x, None, "cpu").input_ids, _span_all(x, None, "cpu").input_ids)


def test_negative_tensor_seeds_are_their_64_bits_everywhere():
    """An int64 seed tensor may hold any value (a CUDA graph replays whatever is written into it): a negative one
    keys Philox with its 64 bits, the same bytes on every backend, and differs from its absolute value."""
    x = _tokens(3, 60, seed=9)
    for s in (-5, -(2**63)):
        seed = torch.tensor([s])
        spans = {b: C.span_corrupt(x, vocab_size=V, eos_id=EOS, seed=seed, backend=b).input_ids for b in CPU_BACKENDS}
        masks = {b: C.mlm_mask(x, mask_id=4, vocab_size=V, seed=seed, backend=b)[0] for b in CPU_BACKENDS}
        for out in (spans, masks):
            first = out[CPU_BACKENDS[0]]
            assert all(torch.equal(first, o) for o in out.values()), s
    assert not torch.equal(spans[CPU_BACKENDS[0]],
                           C.span_corrupt(x, vocab_size=V, eos_id=EOS, seed=2**63 - 1, backend="cpu").input_ids)


# ---------------------------------------------------------------------------------------------------- statistics
def _composition_law(total: int, parts: int) -> np.ndarray:
    """P(first part = l), l = 1..total - parts + 1, of a uniform composition:
    C(total - l - 1, parts - 2) / C(total - 1, parts - 1)."""
    ls = np.arange(1, total - parts + 2)
    return np.array([math.comb(total - l - 1, parts - 2) for l in ls], dtype=float) / math.comb(total - 1, parts - 1)


def test_span_lengths_follow_composition_law():
    L, rows = 200, 3000
    n, k = (int(v[0]) for v in ref.span_counts([L], 0.15, 3.0))  # 30, 10
    out = C.span_corrupt(_tokens(rows, L, seed=8), vocab_size=V, eos_id=EOS, seed=1234, backend="cpu")
    noise_first, keep_first = [], []
    for b in range(rows):  # the first span of each row: independent across rows
        lab = out.labels[b].tolist()
        inp = out.input_ids[b].tolist()
        noise_first.append(next(i for i, v in enumerate(lab[1:]) if v >= V - 100))
        keep_first.append(next(i for i, v in enumerate(inp) if v >= V - 100))
    for lens, total in ((noise_first, n), (keep_first, L - n)):
        law = _composition_law(total, k)
        counts = np.bincount(lens, minlength=len(law) + 1)[1:]
        assert counts.sum() == rows and len(counts) == len(law)
        stat, df = _chi2(counts, law)
        assert stat < _chi2_bound(df), (stat, df)
        # the test has power: the law of a composition into k + 2 parts is rejected
        wrong = _composition_law(total, k + 2)
        wrong = np.concatenate([wrong, np.zeros(len(law) - len(wrong))])
        stat_w, df_w = _chi2(counts, (wrong + 1e-12) / (wrong + 1e-12).sum())
        assert stat_w > _chi2_bound(df_w)


def test_mlm_80_10_10_split_and_selection_rate():
    B, S, p = 64, 512, 0.15
    x = _tokens(B, S, seed=9, lo=10, hi=V)
    inp, lab = C.mlm_mask(x, mask_id=3, vocab_size=V, mask_prob=p, seed=99, backend="cpu")
    sel = lab != -100
    N, ns = x.numel(), int(sel.sum())
    assert abs(ns - p * N) < 6 * math.sqrt(N * p * (1 - p))
    assert torch.equal(lab[sel], x[sel])
    masked = int((inp[sel] == 3).sum())
    changed = int(((inp[sel] != 3) & (inp[sel] != x[sel])).sum())
    for cnt, q in ((masked, 0.8), (changed, 0.1 * (1 - 1 / V))):
        assert abs(cnt - q * ns) < 6 * math.sqrt(ns * q * (1 - q)), (cnt, q * ns)
    assert torch.equal(inp[~sel], x[~sel])
    # random ids are uniform over the range
    inp2, lab2 = C.mlm_mask(x, mask_id=3, vocab_size=V, mask_prob=1.0, mask_replace_prob=0.0,
                            random_replace_prob=1.0, random_range=(100, 110), seed=5, backend="cpu")
    counts = torch.bincount(inp2.reshape(-1) - 100, minlength=10).numpy()
    assert counts.sum() == N
    stat, df = _chi2(counts, np.full(10, 0.1))
    assert stat < _chi2_bound(df)


# ---------------------------------------------------------------------------------------------------- MLM
def _words(B, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, S, generator=g) < 0.4
    starts[:, 0] = True
    return torch.cumsum(starts.long(), 1) - 1


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("words", [False, True])
def test_mlm_bytes_and_invariants(exact, words):
    B, S = (5, 70) if "triton" in KERNELS else (12, 70)
    x = _tokens(B, S, seed=10, lo=5, hi=V)
    x[:, -9:] = PAD
    x[:, 0] = 4  # a special id ([CLS])
    w = _words(B, S, seed=1) if words else None
    if w is not None:
        w[:, 0] = -1
    x_before = x.clone()
    kw = dict(mask_id=3, vocab_size=V, mask_prob=0.3, special_ids=[4], pad_id=PAD, exact=exact, word_ids=w,
              seed=31337, row_offset=5)
    outs = {b: C.mlm_mask(x, backend=b, **kw) for b in CPU_BACKENDS}
    assert torch.equal(x, x_before)
    for b in KERNELS:
        for u, v in zip(outs[b], outs["torch"]):
            assert torch.equal(u, v), b
    inp, lab = outs[CPU_BACKENDS[0]]
    sel = lab != -100
    assert not sel[:, -9:].any() and not sel[:, 0].any()  # padding and special ids never selected
    assert torch.equal(inp[:, -9:], x[:, -9:]) and torch.equal(inp[:, 0], x[:, 0])
    assert torch.equal(lab[sel], x[sel]) and torch.equal(inp[~sel], x[~sel])
    for b in range(B):
        elig = (x[b] != PAD) & (x[b] != 4)
        if w is None:
            units = int(elig.sum())
            chosen = int(sel[b].sum())
        else:
            ids = w[b][elig]
            for wid in ids.unique():  # a word is selected as a unit
                s = sel[b][elig][ids == wid]
                assert s.all() or not s.any()
            units = len(ids.unique())
            chosen = len(w[b][sel[b]].unique())
        if exact:
            assert chosen == ref.mlm_exact_count(units, ref.rate_bits(0.3)) == min(max(1, round(0.3 * units)), units)


# Rows of seed 1 whose 1100 selection keys (kStreamMLMSelect) tie at the cut of the exact count at p = 0.15 (the
# 165th and 166th smallest are equal: about 1 row in 4 million; found by brute force): the tie rule decides them.
TIE_ROWS = (12130187, 14199176)


def test_mlm_exact_ties_at_the_cut_take_the_lower_slot():
    """Equal keys at the threshold go to the lower position, on every backend alike (the CUDA kernel's tie
    branch, which random rows practically never reach, runs on these rows in tests/test_cuda_emulated.py)."""
    S = 1100
    x = _tokens(2, S, seed=3, lo=5, hi=V)
    kw = dict(mask_id=3, vocab_size=V, mask_prob=0.15, exact=True, seed=1)
    for row in TIE_ROWS:
        keys = ref.row_draws(1, row, ref.STREAM_MLM_SELECT, S).astype(np.int64)
        order = np.sort(keys)
        assert order[164] == order[165]  # the tie this test is about
        tied = np.flatnonzero(keys == order[164])
        outs = {b: C.mlm_mask(x[:1], row_offset=row, backend=b, **kw) for b in CPU_BACKENDS}
        for b in CPU_BACKENDS:
            for u, v in zip(outs[b], outs["torch"]):
                assert torch.equal(u, v), b
        sel = outs["torch"][1][0] != -100
        assert int(sel.sum()) == 165 and bool(sel[int(tied.min())]) and not bool(sel[int(tied.max())])


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_mlm_exact_count_rounds_half_to_even(backend):
    """exact=True selects max(1, round(p * eligible)) of the float64 product, rounded as BERT rounds:
    at p = 0.15 the rows of 10, 30, 50, 70 eligible tokens sit on a tie (1.5, 4.5, ...) that float64 resolves to
    even (2, 4, 8, 10) where an exact rational product (1.4999...) would not."""
    sizes = [10, 30, 50, 70, 7, 13, 1, 0]
    S = max(sizes) + 2
    x = torch.full((len(sizes), S), PAD, dtype=torch.int64)
    for r, n in enumerate(sizes):
        x[r, :n] = torch.arange(10, 10 + n)
    _, lab = C.mlm_mask(x, mask_id=3, vocab_size=V, pad_id=PAD, mask_prob=0.15, exact=True, seed=4,
                        backend=backend)
    got = (lab != -100).sum(1).tolist()
    assert got == [min(max(1, round(n * 0.15)), n) for n in sizes] == [2, 4, 8, 10, 1, 2, 1, 0]


def test_mlm_batch_split_and_seed():
    x = _tokens(10, 64, seed=11)
    kw = dict(mask_id=3, vocab_size=V, seed=8, backend="cpu")
    full = C.mlm_mask(x, **kw, row_offset=0)
    a = C.mlm_mask(x[:3], **kw, row_offset=0)
    b = C.mlm_mask(x[3:], **kw, row_offset=3)
    assert torch.equal(torch.cat([a[0], b[0]]), full[0]) and torch.equal(torch.cat([a[1], b[1]]), full[1])
    other = C.mlm_mask(x, mask_id=3, vocab_size=V, seed=9, backend="cpu")
    assert not torch.equal(other[1], full[1])


def test_span_small_vocabulary_and_float_types():
    """A vocabulary under T5's 100 extra ids caps the default sentinels instead of refusing; NumPy floats are
    floats; a density that is 0 in float32 is no noise on every backend and in the sized outputs."""
    x = _tokens(2, 30, seed=3, hi=40)
    out = C.span_corrupt(x, vocab_size=50, eos_id=EOS, seed=1)
    assert bool((out.input_ids >= 40).any())  # sentinels 49, 48, ... are used
    a = C.span_corrupt(x, vocab_size=V, eos_id=EOS, seed=1, noise_density=np.float32(0.15))
    b = C.span_corrupt(x, vocab_size=V, eos_id=EOS, seed=1, noise_density=0.15)
    assert torch.equal(a.input_ids, b.input_ids)
    outs = [C.span_corrupt(x, [30, 20], vocab_size=V, eos_id=EOS, seed=1, noise_density=1e-46, backend=be)
            for be in CPU_BACKENDS]
    for o in outs:
        assert o.labels[:, 0].tolist() == [EOS, EOS] and o.label_lengths.tolist() == [1, 1]
        assert torch.equal(o.labels, outs[0].labels) and torch.equal(o.input_ids, outs[0].input_ids)
    empty = C.span_corrupt(torch.zeros((0, 5), dtype=torch.long), [], vocab_size=V, eos_id=EOS, seed=1)
    assert empty.input_ids.shape[0] == 0
    with pytest.raises(ValueError, match="2\\^24"):
        C.t5_input_length(512, 0.9999999)
    with pytest.raises(ValueError, match="noise_density"):  # below 1 in float64, 1 in float32
        C.t5_input_length(512, 0.99999999)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layouts_pytorch_calls_contiguous(backend):
    """(B, 1) ids from a transpose (strides (1, B)) and NumPy's empty (0, S) arrays (strides (0, 0)) are
    contiguous to PyTorch, so .contiguous() keeps their strides: the ops take them (the C++ check refused)."""
    col = torch.tensor([[11, 12, 13, 14]]).t()
    assert col.stride() == (1, 4)
    for fn in (lambda x, **k: C.span_corrupt(x, vocab_size=V, eos_id=EOS, seed=2, backend=backend, **k).labels,
               lambda x, **k: C.mlm_mask(x, mask_id=3, vocab_size=V, seed=2, backend=backend, **k)[0]):
        assert torch.equal(fn(col), fn(col.contiguous().clone()))
        empty = torch.from_numpy(np.zeros((0, 31), dtype=np.int64))
        assert fn(empty).shape[0] == 0
    words = torch.tensor([[0, 0, 1, 1]]).t()
    got = C.mlm_mask(col, mask_id=3, vocab_size=V, seed=2, word_ids=words, backend=backend)
    exp = C.mlm_mask(col, mask_id=3, vocab_size=V, seed=2, word_ids=words.clone(memory_format=torch.contiguous_format),
                     backend=backend)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


def test_default_sentinels_never_take_eos_or_pad():
    """Default sentinels count down from vocab_size - 1: those a batch uses must not reach eos_id or pad_id
    (labels would hold eos mid-row, and an embedding with padding_idx would never learn that sentinel)."""
    x = _tokens(2, 40, seed=4, hi=30)
    with pytest.raises(ValueError, match="eos_id=999"):
        C.span_corrupt(x, vocab_size=V, eos_id=V - 1, seed=1)
    with pytest.raises(ValueError, match="pad_id=998"):
        C.span_corrupt(x, vocab_size=V, eos_id=EOS, pad_id=V - 2, seed=1)
    # a small vocabulary: 0.5 noise in spans of 1 needs 20 sentinels per row, 49 down to 30 (tokens below 30)
    with pytest.raises(ValueError, match="eos_id=31"):
        C.span_corrupt(x, vocab_size=50, eos_id=31, noise_density=0.5, mean_span_length=1.0, seed=1)
    out = C.span_corrupt(x, vocab_size=50, eos_id=29, noise_density=0.5, mean_span_length=1.0, seed=1)
    assert int(out.labels[out.labels >= 0].min()) >= 2
    with pytest.raises(ValueError, match="pad_id"):
        C.span_corrupt(x, vocab_size=V, eos_id=EOS, sentinel_ids=[500, PAD], seed=1)


def test_mlm_degenerate():
    x = torch.full((2, 5), PAD)
    inp, lab = C.mlm_mask(x, mask_id=3, vocab_size=V, pad_id=PAD, exact=True, seed=1)
    assert torch.equal(inp, x) and bool((lab == -100).all())
    inp, lab = C.mlm_mask(torch.zeros((3, 0), dtype=torch.long), mask_id=3, vocab_size=V, seed=1)
    assert inp.shape == (3, 0)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,exc,name", [
    (dict(lengths=[41, 3]), ValueError, "lengths"),
    (dict(lengths=[-1, 3]), ValueError, "lengths"),
    (dict(lengths=[1.5, 3]), TypeError, "lengths"),
    (dict(lengths=[3]), ValueError, "lengths"),
    (dict(noise_density=1.0), ValueError, "noise_density"),
    (dict(noise_density=-0.1), ValueError, "noise_density"),
    (dict(mean_span_length=0.5), ValueError, "mean_span_length"),
    (dict(max_sentinels=1), ValueError, "max_sentinels"),
    (dict(sentinel_ids=[999]), ValueError, "sentinel_ids"),
    (dict(sentinel_ids=[1000]), ValueError, "sentinel_ids"),
    (dict(vocab_size=None), ValueError, "vocab_size"),
    (dict(eos_id=-1), ValueError, "eos_id"),
    (dict(seed=-5), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(backend="nope"), ValueError, "backend"),
    (dict(pad_id=-100), ValueError, "pad_id"),
    (dict(pad_id=V), ValueError, "pad_id"),
    (dict(sentinel_ids=[5, 6, 5]), ValueError, "distinct"),
    (dict(sentinel_ids=[5, EOS]), ValueError, "eos_id"),
    (dict(vocab_size=2**64), ValueError, "vocab_size"),  # past int64: named, not a failure in the op
])
def test_span_bad_input(kw, exc, name):
    x = _tokens(2, 40, seed=12)
    args = dict(vocab_size=V, eos_id=EOS, seed=1)
    args.update(kw)
    lengths = args.pop("lengths", None)
    with pytest.raises(exc, match=name):
        C.span_corrupt(x, lengths, **args)


def test_span_bad_ids_and_opt_in():
    x = _tokens(2, 40, seed=12)
    with pytest.raises(TypeError, match="input_ids"):
        C.span_corrupt(x.float(), vocab_size=V, eos_id=EOS)
    with pytest.raises(ValueError, match="input_ids"):
        C.span_corrupt(x[0], vocab_size=V, eos_id=EOS)
    for bad in (-3, V):
        y = x.clone()
        y[1, 5] = bad
        with pytest.raises(ValueError, match="input_ids"):
            C.span_corrupt(y, vocab_size=V, eos_id=EOS)
    y = x.clone()
    y[1, 30:] = -100  # beyond the row's length: never read, not an error
    C.span_corrupt(y, [40, 30], vocab_size=V, eos_id=EOS, seed=1)
    # 568 tokens need 28 spans: an error with 10 sentinels, fine once the caller opts in to more
    z = _tokens(1, 568)
    with pytest.raises(ValueError, match="max_sentinels"):
        C.span_corrupt(z, vocab_size=V, eos_id=EOS, max_sentinels=10)
    z = _tokens(1, 568, hi=500)
    out = C.span_corrupt(z, vocab_size=V, eos_id=EOS, noise_density=0.5, mean_span_length=1.0, max_sentinels=300)
    assert sorted(v for v in out.input_ids[0].tolist() if v >= 500) == list(range(V - 284, V))  # 284 spans


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kw,name", [(dict(noise_density=0.99999999), "noise_density"),
                                     (dict(mean_span_length=1e39), "mean_span_length"),
                                     (dict(sentinel_ids={900, 901}), "sentinel_ids")])
def test_span_refuses_what_float32_or_order_cannot_hold(backend, kw, name):
    """Valid float64 values can leave the range in float32, where the kernels compute (0.99999999 is 1, 1e39
    inf): a ValueError naming the argument on every backend (the kernels raised RuntimeError, the reference ran).
    Sentinels are used in order, so a set (no order) is refused."""
    x = _tokens(2, 40, seed=12)
    with pytest.raises(TypeError if "sentinel" in name else ValueError, match=name):
        C.span_corrupt(x, vocab_size=V, eos_id=EOS, seed=1, backend=backend, **kw)
    if "sentinel" not in name:
        with pytest.raises(ValueError, match=name):
            C.t5_input_length(64, **kw)


def test_t5_input_length_checks_every_call():
    """The cache sits after the checks: True passed for a mean span of 1.0 once 1.0 was cached (True == 1.0)."""
    assert C.t5_input_length(64, 0.15, 1.0) == C.t5_input_length(64, 0.15, 1.0)
    with pytest.raises(TypeError, match="mean_span_length"):
        C.t5_input_length(64, 0.15, True)


@pytest.mark.parametrize("backend", KERNELS)
def test_span_ops_refuse_what_the_api_refuses(backend):
    """Direct op calls: a mean span below 1 asks for more spans than noise tokens (the CPU kernel would write cuts
    past its buffer, Triton read scratch never written); a density of 1 in float32 leaves no kept token."""
    x = _tokens(2, 40)
    op = torch.ops.lmobj.span_corrupt if backend == "cpu" else torch.ops.lmobj.span_corrupt_triton
    lens = torch.tensor([40, 30])
    sent = torch.arange(999, 899, -1)
    for r, m in ((0.5, 0.5), (0.99999999, 3.0), (-0.1, 3.0), (0.15, float("nan")), (0.15, float("inf"))):
        with pytest.raises(RuntimeError, match="noise_density|mean_span_length"):
            op(x, lens, torch.tensor([1]), 0, r, m, sent, EOS, PAD, -100, 80, 80)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(mask_id=V), ValueError, "mask_id"),
    (dict(mask_prob=1.5), ValueError, "mask_prob"),
    (dict(mask_replace_prob=0.95), ValueError, "random_replace_prob"),
    (dict(special_ids=[1.0]), TypeError, "special_ids"),
    (dict(special_ids=[V]), ValueError, "special_ids"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(random_range=(5, 5)), ValueError, "random_range"),
    (dict(exact=1), TypeError, "exact"),
    (dict(word_ids=torch.zeros(2, 3, dtype=torch.long)), ValueError, "word_ids"),
    (dict(word_ids=torch.zeros(2, 40)), TypeError, "word_ids"),
    (dict(ignore_index=2**63), ValueError, "ignore_index"),
])
def test_mlm_bad_input(kw, exc, name):
    args = dict(mask_id=3, vocab_size=V, seed=1)
    args.update(kw)
    with pytest.raises(exc, match=name):
        C.mlm_mask(_tokens(2, 40), **args)


def test_mlm_bad_ids():
    with pytest.raises(TypeError, match="input_ids"):
        C.mlm_mask(_tokens(2, 40).double(), mask_id=3, vocab_size=V)
    x = _tokens(2, 40)
    x[0, 0] = -1
    with pytest.raises(ValueError, match="input_ids"):
        C.mlm_mask(x, mask_id=3, vocab_size=V)


# ---------------------------------------------------------------------------------------------------- collators
def test_span_collator_hf_inputs():
    col = C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, input_length=64, seed=3)
    ex = [{"input_ids": list(range(10, 80))}, {"input_ids": list(range(10, 50))}]
    b1 = col(ex)
    assert set(b1) == {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask"}
    assert b1["input_ids"].shape[1] == 64 and int(b1["attention_mask"][0].sum()) == 64  # raw 70 -> 64 inputs
    _check_row(torch.arange(10, 80), 70, 0.15, 3.0, b1["input_ids"][0].tolist(), b1["labels"][0].tolist())
    b2 = col([list(range(10, 80)), list(range(10, 50))])
    assert not torch.equal(b1["input_ids"], b2["input_ids"])  # the stream moves on between batches
    col2 = C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, input_length=64, seed=3)
    assert torch.equal(col2(ex)["input_ids"], b1["input_ids"])  # and is reproducible


class _Same(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": list(range(10, 74))}


def test_collators_seed_workers_and_epochs_differently():
    """Workers differ from each other, epochs from each other (fresh workers each epoch must not replay the same
    masks: the worker's own seed, drawn per epoch, is mixed in), and a loader with the same seeded generator
    reproduces the run."""
    for col in (C.MLMCollator(mask_id=3, vocab_size=V, seed=11), C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V,
                                                                                            seed=11)):
        def epochs(n, gen_seed, col=col):
            dl = torch.utils.data.DataLoader(_Same(), batch_size=4, num_workers=2, collate_fn=col,
                                             generator=torch.Generator().manual_seed(gen_seed))
            return [[b["labels"] for b in dl] for _ in range(n)]

        (b0, b1), (c0, c1) = epochs(2, 5)
        assert not torch.equal(b0, b1)  # two workers, same rows, different masks
        assert not torch.equal(b0, c0) and not torch.equal(b1, c1)  # the next epoch differs
        (d0, d1), _ = epochs(2, 5)
        assert torch.equal(d0, b0) and torch.equal(d1, b1)  # same seeds: the same run
    out = next(iter(torch.utils.data.DataLoader(_Same(), batch_size=4, num_workers=1,
                                                collate_fn=C.MLMCollator(mask_id=3, vocab_size=V))))
    assert out["input_ids"].shape == (4, 64) and set(out) == {"input_ids", "attention_mask", "labels"}


def test_collators_refuse_what_is_not_ids():
    """Float ids are refused, not truncated to ints (5.7 -> 5); strings, pad_id=None and a too short input_length
    get errors naming the collator's own argument."""
    span = C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, seed=1)
    mlm = C.MLMCollator(mask_id=3, vocab_size=V, seed=1)
    for col in (span, mlm):
        for bad in ([[5.7, 6.2, 7.9]], [np.array([5.0, 6.0])], torch.tensor([[5.0, 6.0]]), [["a", "b"]],
                    [{"input_ids": [True, False]}]):
            with pytest.raises(TypeError, match="input_ids"):
                col(bad)
    words = C.MLMCollator(mask_id=3, vocab_size=V, whole_word=True, seed=1)
    with pytest.raises(TypeError, match="word_ids"):
        words([{"input_ids": [5, 6], "word_ids": [0.5, 1.0]}])
    assert words([{"input_ids": [5, 6], "word_ids": [None, 0]}])["input_ids"].shape == (1, 2)
    with pytest.raises(TypeError, match="pad_id"):
        C.MLMCollator(mask_id=3, vocab_size=V, pad_id=None)
    with pytest.raises(ValueError, match="input_length"):
        C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, input_length=1)


def test_collators_take_what_hugging_face_yields():
    """Pre-padded tokenizer output (padding="max_length"): the attention_mask's zeros are dropped, not corrupted;
    (1, S) tensors (return_tensors="pt"), a dict of columns and a (B, S) tensor work; missing keys say so."""
    row, pad = list(range(10, 30)), [PAD] * 12
    mlm = C.MLMCollator(mask_id=3, vocab_size=V, pad_id=PAD, seed=1)
    padded = [{"input_ids": row + pad, "attention_mask": [1] * 20 + [0] * 12}] * 2
    out = mlm(padded)
    assert out["input_ids"].shape == (2, 20) and bool((out["attention_mask"] == 1).all())
    ref_out = C.MLMCollator(mask_id=3, vocab_size=V, pad_id=PAD, seed=1)([row, row])
    assert torch.equal(out["labels"], ref_out["labels"]) and torch.equal(out["input_ids"], ref_out["input_ids"])
    span = C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, seed=2)
    a = span(padded)
    b = C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, seed=2)([row, row])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["attention_mask"][0].sum()) == len(a["input_ids"][0])  # no pad inside the corrupted row
    t = [torch.tensor([row]), torch.tensor([row])]  # (1, S) each
    assert torch.equal(C.MLMCollator(mask_id=3, vocab_size=V, seed=1)(t)["labels"], ref_out["labels"])
    cols = {"input_ids": [row, row], "attention_mask": [[1] * 20, [1] * 20]}
    assert torch.equal(C.MLMCollator(mask_id=3, vocab_size=V, seed=1)(cols)["labels"], ref_out["labels"])
    assert torch.equal(C.MLMCollator(mask_id=3, vocab_size=V, seed=1)(torch.tensor([row, row]))["labels"],
                       ref_out["labels"])
    with pytest.raises(ValueError, match="input_ids"):
        mlm({"ids": [row]})
    with pytest.raises(ValueError, match="input_ids"):
        mlm([{"ids": row}])
    with pytest.raises(ValueError, match="word_ids"):
        C.MLMCollator(mask_id=3, vocab_size=V, whole_word=True)([row])
    with pytest.raises(ValueError, match="one row"):
        mlm([torch.tensor([row, row])])


def test_auto_passes_rows_too_long_for_cuda_to_triton(monkeypatch):
    """One CUDA block holds a row in shared memory: `auto` hands rows past the card's limit to Triton (the sizes
    come from span_smem / mlm_smem in csrc/cuda/corruption.cu, through _C.cuda_row_smem); an explicit backend is
    kept."""
    from lmobj_kernels._backend import _C

    if _C().cuda_row_smem("span", 1) is None:
        pytest.skip("built without CUDA: no CUDA kernels to size")
    class Props:
        shared_memory_per_block_optin = 101376  # a 99 KB card

    monkeypatch.setattr(C, "resolve", lambda backend, dev, family: "cuda" if backend == "auto" else backend)
    monkeypatch.setattr(C, "why_unavailable", lambda backend, dev: "")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props())
    monkeypatch.delenv("LMOBJ_BACKEND", raising=False)
    dev = torch.device("cuda")
    assert C._resolve("auto", dev, 5616, "span") == "cuda"  # 18 * 5616 + 272 = 101360 bytes: fits
    assert C._resolve("auto", dev, 5617, "span") == "triton"  # 101378: does not
    assert C._resolve("cuda", dev, 9000, "span") == "cuda"
    assert C._resolve("auto", dev, 100000, None) == "cuda"  # plain MLM masking keeps no row in shared memory
    assert C._resolve("auto", dev, 7222, "mlm") == "triton"  # 14 * 7222 + 272 = 101380
    assert C._resolve("auto", dev, 7221, "mlm") == "cuda"


def test_mlm_collator_keeps_segments_and_honours_special_tokens_mask():
    """Sentence pairs keep their token_type_ids (BERT's segments; they were dropped, so BERT saw one segment); a
    tokenizer's special_tokens_mask (return_special_tokens_mask=True, as Hugging Face's run_mlm.py asks) keeps
    [CLS]/[SEP] from being selected, as Hugging Face's collator does, and is not returned."""
    cls_, sep = 101 % V, 102 % V
    ex = [{"input_ids": [cls_, 11, 12, sep, 13, sep], "token_type_ids": [0, 0, 0, 0, 1, 1],
           "special_tokens_mask": [1, 0, 0, 1, 0, 1]},
          {"input_ids": [cls_, 20, sep, 21, sep], "token_type_ids": [0, 0, 0, 1, 1],
           "special_tokens_mask": [1, 0, 1, 0, 1]}]
    col = C.MLMCollator(mask_id=3, vocab_size=V, pad_id=PAD, mask_prob=1.0, mask_replace_prob=1.0,
                        random_replace_prob=0.0, seed=4)
    out = col(ex)
    assert set(out) == {"input_ids", "attention_mask", "labels", "token_type_ids"}
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]]
    special = torch.tensor([[1, 0, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    ids = torch.tensor([[cls_, 11, 12, sep, 13, sep], [cls_, 20, sep, 21, sep, PAD]])
    real = out["attention_mask"].bool()
    assert torch.equal(out["input_ids"][special], ids[special])  # the specials stay
    assert bool((out["labels"][special | ~real] == -100).all())
    assert bool((out["input_ids"][~special & real] == 3).all())  # every other token masked at p = 1
    assert torch.equal(out["labels"][~special & real], ids[~special & real])
    with pytest.raises(ValueError, match="token_type_ids"):
        col([ex[0], {"input_ids": [5, 6]}])


def test_collators_show_their_options():
    assert repr(C.MLMCollator(mask_id=3, vocab_size=V, seed=1)) == (
        f"MLMCollator(mask_id=3, vocab_size={V}, mask_prob=0.15, mask_replace_prob=0.8, random_replace_prob=0.1, "
        "special_ids=(), pad_id=0, exact=False, ignore_index=-100, seed=1)")
    assert repr(C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V)).startswith(
        f"SpanCorruptionCollator(noise_density=0.15, mean_span_length=3.0, vocab_size={V}, eos_id={EOS}")


def test_collators_check_options_and_rows_early():
    """Options are checked when the collator is built (not in the first batch, inside a worker); special_ids may be
    a tensor, as mlm_mask takes it; a row's word_ids must be as long as its ids even where a longer row hides it;
    None is a word id at special tokens, never an input id."""
    with pytest.raises(ValueError, match="mask_id"):
        C.MLMCollator(mask_id=V, vocab_size=V)
    with pytest.raises(ValueError, match="mask_prob"):
        C.MLMCollator(mask_id=3, vocab_size=V, mask_prob=2.0)
    with pytest.raises(TypeError, match="whole_word"):
        C.MLMCollator(mask_id=3, vocab_size=V, whole_word=1)
    with pytest.raises(ValueError, match="noise_density"):
        C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, noise_density=1.5)
    with pytest.raises(ValueError, match="eos_id"):
        C.SpanCorruptionCollator(eos_id=V, vocab_size=V)
    with pytest.raises(ValueError, match="backend"):
        C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, backend="gpu")
    rows = [[4, 11, 12, 4], [4, 20, 21, 22, 23, 4]]
    a = C.MLMCollator(mask_id=3, vocab_size=V, special_ids=torch.tensor([4]), seed=1)(rows)
    b = C.MLMCollator(mask_id=3, vocab_size=V, special_ids=[4], seed=1)(rows)
    assert all(torch.equal(a[k], b[k]) for k in a)
    words = C.MLMCollator(mask_id=3, vocab_size=V, whole_word=True, seed=1)
    with pytest.raises(ValueError, match="word_ids"):
        words([{"input_ids": [10, 11, 12, 13], "word_ids": [0, 1]},
               {"input_ids": [10, 11, 12, 13, 14, 15], "word_ids": [0, 1, 2, 3, 4, 5]}])
    for col in (words, C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, seed=1)):
        with pytest.raises(TypeError, match="None"):
            col([{"input_ids": [5, None, 7, 8], "word_ids": [0, 1, 2, 3]}])


@pytest.mark.parametrize("multiple", [1, 8, 13])
def test_collators_pad_to_multiple_of(gen, multiple):
    """pad_to_multiple_of pads each output's width up to a multiple (Hugging Face's option, for tensor cores) and
    changes nothing else: the batch without it is the padded one cut back, and the tail is padding (pad_id,
    attention 0, labels ignored, token types 0)."""
    lens = torch.randint(1, 40, (5,), generator=gen).tolist()
    rows = [{"input_ids": torch.randint(5, V - 101, (n,), generator=gen).tolist(), "token_type_ids": [1] * n,
             "word_ids": [i // 2 for i in range(n)]} for n in lens]
    pad_tail = {"input_ids": PAD, "attention_mask": 0, "labels": -100, "decoder_input_ids": PAD,
                "decoder_attention_mask": 0, "token_type_ids": 0}
    for make in (lambda **kw: C.MLMCollator(mask_id=3, vocab_size=V, pad_id=PAD, whole_word=True, seed=5, **kw),
                 lambda **kw: C.MLMCollator(mask_id=3, vocab_size=V, pad_id=PAD, exact=True, seed=5, **kw),
                 lambda **kw: C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, pad_id=PAD, seed=5, **kw)):
        plain, padded = make()(rows), make(pad_to_multiple_of=multiple)(rows)
        assert set(plain) == set(padded)
        for key, x in padded.items():
            w = plain[key].shape[1]
            assert x.shape[1] % multiple == 0 and w <= x.shape[1] < w + multiple, key
            assert torch.equal(x[:, :w], plain[key]), key
            assert bool((x[:, w:] == pad_tail[key]).all()), key
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        C.MLMCollator(mask_id=3, vocab_size=V, pad_to_multiple_of=0)
    with pytest.raises(TypeError, match="pad_to_multiple_of"):
        C.SpanCorruptionCollator(eos_id=EOS, vocab_size=V, pad_to_multiple_of=8.0)
    assert "pad_to_multiple_of=8" in repr(C.MLMCollator(mask_id=3, vocab_size=V, pad_to_multiple_of=8))


def test_mlm_collator_whole_word():
    col = C.MLMCollator(mask_id=3, vocab_size=V, pad_id=PAD, special_ids=[4], whole_word=True, mask_prob=0.5,
                        seed=2)
    ex = [{"input_ids": [4, 11, 12, 13, 14, 4], "word_ids": [None, 0, 0, 1, 2, None]},
          {"input_ids": [4, 20, 21, 4], "word_ids": [None, 0, 0, None]}]
    out = col(ex)
    assert out["input_ids"].shape == (2, 6) and out["attention_mask"].tolist()[1] == [1, 1, 1, 1, 0, 0]
    lab = out["labels"]
    assert bool((lab[0, 1] == -100) == (lab[0, 2] == -100)) and bool((lab[1, 1] == -100) == (lab[1, 2] == -100))
    assert bool((lab[:, 0] == -100).all()) and bool((lab[1, 4:] == -100).all())


# ---------------------------------------------------------------------------------------------------- registration
def _span_op_args(x, lens, dev="cpu"):
    return (x, torch.tensor(lens, device=dev), torch.tensor([5], device=dev), 2, 0.15, 3.0,
            torch.arange(V - 1, V - 101, -1, device=dev), EOS, PAD, -100, 40, 12)


def _mlm_op_args(x, w, dev="cpu"):
    exact = w is not None
    select = ref.rate_bits(0.15) if exact else round(0.15 * 2**32)
    return (x, w, torch.tensor([5], device=dev), 1, torch.tensor([PAD, 4], device=dev), exact,
            select, round(0.8 * 2**32), round(0.9 * 2**32), 0, V, 3, -100)


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    span_op, mlm_op = C._corruption_ops.ops(backend)
    x = _tokens(3, 37, seed=13)
    torch.library.opcheck(span_op, _span_op_args(x, [37, 20, 1]))
    torch.library.opcheck(mlm_op, _mlm_op_args(x, None))
    torch.library.opcheck(mlm_op, _mlm_op_args(x, _words(3, 37)))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    def f(ids):
        out = C.span_corrupt(ids, vocab_size=V, eos_id=EOS, seed=21, backend="cpu")
        inp, lab = C.mlm_mask(ids, mask_id=3, vocab_size=V, pad_id=PAD, seed=21, backend="cpu")
        return out.input_ids, out.labels, out.decoder_input_ids, inp, lab

    # several lengths: the output widths are host arithmetic of S, so S must stay static (one graph per length)
    compiled = torch.compile(f, fullgraph=True, backend=compiler, dynamic=False)
    for S in (70, 80, 61):
        x = _tokens(4, S, seed=14)
        for u, v in zip(compiled(x), f(x)):
            assert torch.equal(u, v)


def test_bench_quick():
    script = os.path.join(HERE, "..", "benchmarks", "bench_corruption.py")
    r = subprocess.run([sys.executable, script, "--quick", "--no-save"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "span_corrupt" in r.stdout and "mlm_mask" in r.stdout


def test_bench_gpu_path_runs_on_the_cpu(monkeypatch):
    """The GPU benchmark's own code (its ids, its check against the CPU kernel, its peers) on the CPU kernel with
    a stand-in timer: a GPU session must not lose the corruption figures to a bug this can show."""
    sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    import bench_corruption
    import common

    monkeypatch.setattr(common, "time_gpu", lambda fn, **kw: (fn(), 1e-3)[1])
    rows = []
    bench_corruption._gpu_size(rows, 8, 568, ["cpu"], bench_corruption.hf_mlm_peer(), dev="cpu")
    assert {r["bench"] for r in rows} == {"span_corrupt", "mlm_mask"} and all(r["value"] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------------- GPU
def _span_bytes_equal_cpu(backend, S, device, repeat=5, row_offset=7):
    """`backend` on `device` against the CPU kernel, byte for byte, on rows of every length up to S."""
    lens = [S, max(S - 1, 0), S // 2, min(S, 3), min(S, 1), 0] * repeat
    x = _tokens(len(lens), S, seed=15)
    for r, m in ((0.15, 3.0), (0.5, 1.0), (0.3, 8.0)):
        # (0.5, 1.0) needs up to S/2 spans: more sentinels than T5's 100, opted in (as the first GPU run showed),
        # from a vocabulary that has them (the tests' V = 1000 refused max_sentinels = 3000)
        kw = dict(noise_density=r, mean_span_length=m, seed=123456789, row_offset=row_offset, max_sentinels=S,
                  vocab_size=max(V, S + 1000), eos_id=EOS)
        cpu = C.span_corrupt(x, lens, backend="cpu", **kw)
        other = C.span_corrupt(x.to(device), lens, backend=backend, **kw)
        for u, v in zip(cpu, other):
            assert torch.equal(u, v.cpu()), (backend, S, r, m)


@pytest.mark.parametrize("S", [1, 57, 568, 3000])
def test_gpu_span_case_runs_here(S):
    """The GPU test's own arguments, run on the CPU kernel, so that a GPU run spends no time on a broken case."""
    _span_bytes_equal_cpu("cpu", S, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 57, 568, 3000])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_span_bytes_equal_cpu(backend, S):
    if backend not in available_backends(torch.device("cuda")):
        pytest.skip(f"{backend} not available")
    _span_bytes_equal_cpu(backend, S, "cuda")


def test_gpu_long_span_case_runs_here():
    _span_bytes_equal_cpu("cpu", 8192, "cpu", repeat=1, row_offset=2**32 + 7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_long_rows_and_high_row_offsets(backend):
    """Rows of 8192 tokens (up to 4096 spans: Triton at 255 registers with spills, what `auto` hands rows too long
    for CUDA's shared memory to) and a row offset past 2^32 (the Philox counter's high word), byte for byte."""
    if backend not in available_backends(torch.device("cuda")):
        pytest.skip(f"{backend} not available")
    _span_bytes_equal_cpu(backend, 8192, "cuda", repeat=1, row_offset=2**32 + 7)
    x = _tokens(7, 8192, seed=16, lo=5, hi=V)
    w = _words(7, 8192, seed=3)
    kw = dict(mask_id=3, vocab_size=V, special_ids=[4], pad_id=PAD, exact=True, seed=98, row_offset=2**32 + 7)
    cpu = C.mlm_mask(x, word_ids=w, backend="cpu", **kw)
    gpu = C.mlm_mask(x.cuda(), word_ids=w.cuda(), backend=backend, **kw)
    for u, v in zip(cpu, gpu):
        assert torch.equal(u, v.cpu()), backend
    if backend == "triton":  # past what one CUDA block's shared memory holds: auto takes Triton
        assert C._resolve("auto", torch.device("cuda"), 16384, "span") == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("words", [False, True])
def test_gpu_mlm_bytes_equal_cpu(backend, exact, words):
    if backend not in available_backends(torch.device("cuda")):
        pytest.skip(f"{backend} not available")
    for S in (5, 512, 2100):
        x = _tokens(33, S, seed=16, lo=5, hi=V)
        x[:, -3:] = PAD
        w = _words(33, S, seed=2) if words else None
        kw = dict(mask_id=3, vocab_size=V, special_ids=[4], pad_id=PAD, exact=exact, seed=99, row_offset=2)
        cpu = C.mlm_mask(x, word_ids=w, backend="cpu", **kw)
        gpu = C.mlm_mask(x.cuda(), word_ids=None if w is None else w.cuda(), backend=backend, **kw)
        for u, v in zip(cpu, gpu):
            assert torch.equal(u, v.cpu()), (backend, S)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_fixed_length_no_sync_and_graph(backend):
    if backend not in available_backends(torch.device("cuda")):
        pytest.skip(f"{backend} not available")
    x = _tokens(64, 568, seed=17).cuda()
    seed = torch.tensor([1], device="cuda")
    f = lambda: (C.span_corrupt(x, vocab_size=32128, eos_id=EOS, seed=seed, backend=backend).input_ids,  # noqa: E731
                 C.mlm_mask(x, mask_id=3, vocab_size=32128, seed=seed, backend=backend)[1])
    f()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        f()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = f()
    g.replay()
    first = [o.clone() for o in outs]
    seed.fill_(2)
    g.replay()
    assert not torch.equal(first[0], outs[0])
    ref_out = C.span_corrupt(x.cpu(), vocab_size=32128, eos_id=EOS, seed=2, backend="cpu").input_ids
    assert torch.equal(outs[0].cpu(), ref_out)


@pytest.mark.gpu
def test_gpu_compile_triton():
    x = _tokens(8, 568, seed=18).cuda()
    f = lambda ids: C.span_corrupt(ids, vocab_size=32128, eos_id=EOS, seed=4, backend="triton").input_ids  # noqa: E731
    assert torch.equal(torch.compile(f, fullgraph=True)(x).cpu(),
                       C.span_corrupt(x.cpu(), vocab_size=32128, eos_id=EOS, seed=4, backend="cpu").input_ids)
