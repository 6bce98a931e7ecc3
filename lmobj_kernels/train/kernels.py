"""The one place where the trainer meets the library's attention and corruption ops.

`attention`, `mlm_mask` and `span_corrupt` are the library's ops when they are importable (issues 3 and 4), else the
small plain-PyTorch stand-ins below, with the same signatures (correct, not fast). `SOURCE` says which is in use.
The trainer only ever calls `attention`, the three losses, `mlm_corrupt` and `t5_corrupt` from this module.
`use_baseline()` swaps them for what people use today (PyTorch's own SDPA, F.cross_entropy over materialised
logits, corruption on the CPU before the copy), for `lmobj train --baseline` tokens/s comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmobj_kernels.losses import causal_lm_loss, masked_lm_loss, seq2seq_lm_loss  # noqa: F401 (the models call these)

try:  # issue 4
    from lmobj_kernels.attention import attention  # type: ignore[import-not-found]

    _ATTN = "lmobj_kernels.attention"
except ImportError:
    attention = None
    _ATTN = "fallback (F.scaled_dot_product_attention + boolean mask)"

try:  # issue 3
    from lmobj_kernels.corruption import mlm_mask, span_corrupt  # type: ignore[import-not-found]

    _CORR = "lmobj_kernels.span_corrupt / mlm_mask"
except ImportError:
    mlm_mask = span_corrupt = None
    _CORR = "fallback (plain PyTorch)"

SOURCE = {"attention": _ATTN, "corruption": _CORR, "losses": "lmobj_kernels (fused linear cross-entropy)"}


# ---- attention stand-in: ALGORITHMS.md "Attention masks" ----
def _attention_fallback(q, k, v, *, causal=False, prefix_lens=None, doc_ids=None, kv_lens=None, scale=None,
                        backend="auto"):
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    if q.shape[1] != k.shape[1]:  # grouped-query: repeat k, v heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if prefix_lens is None and doc_ids is None and kv_lens is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    j = torch.arange(Sk, device=q.device)
    allowed = torch.ones(B, Sq, Sk, dtype=torch.bool, device=q.device)
    if kv_lens is not None:
        allowed = allowed & (j[None, None, :] < kv_lens.to(q.device)[:, None, None])
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if causal:
        i = torch.arange(Sq, device=q.device)
        c = j[None, :] <= i[:, None]
        if prefix_lens is not None:
            c = c[None] | (j[None, None, :] < prefix_lens.to(q.device)[:, None, None])
        allowed = allowed & c
    has_key = allowed.any(-1, keepdim=True)  # rows with no allowed key output zeros, never NaN
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(allowed | ~has_key)[:, None], scale=scale)
    return out * has_key[:, None].to(out.dtype)


if attention is None:
    attention = _attention_fallback


# ---- corruption stand-ins: ALGORITHMS.md "MLM masking" and "T5 span corruption" ----
def _mlm_mask_fallback(input_ids, *, mask_id, vocab_size, mask_prob=0.15, mask_replace_prob=0.8,
                       random_replace_prob=0.1, special_ids=(), pad_id=None, exact=False, word_ids=None,
                       ignore_index=-100, seed=None, generator=None, backend="auto"):
    g = generator or torch.Generator(input_ids.device).manual_seed(int(seed if seed is not None else torch.seed()))
    eligible = torch.ones_like(input_ids, dtype=torch.bool)
    for s in tuple(special_ids) + ((pad_id,) if pad_id is not None else ()):
        eligible &= input_ids != s
    u = torch.rand(input_ids.shape, generator=g, device=input_ids.device)
    selected = eligible & (u < mask_prob)
    r = torch.rand(input_ids.shape, generator=g, device=input_ids.device)
    rand_ids = torch.randint(0, vocab_size, input_ids.shape, generator=g, device=input_ids.device)
    inputs = torch.where(selected & (r < mask_replace_prob), torch.full_like(input_ids, mask_id), input_ids)
    use_rand = selected & (r >= mask_replace_prob) & (r < mask_replace_prob + random_replace_prob)
    inputs = torch.where(use_rand, rand_ids, inputs)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, ignore_index))
    return inputs, labels


def _composition(total: int, parts: int, g: torch.Generator) -> list[int]:
    """A uniformly random composition of `total` into `parts` positive integers."""
    cuts = sorted(torch.randperm(total - 1, generator=g)[: parts - 1].tolist()) if parts > 1 else []
    edges = [0] + [c + 1 for c in cuts] + [total]
    return [b - a for a, b in zip(edges, edges[1:])]


def _span_corrupt_fallback(input_ids, lengths=None, *, noise_density=0.15, mean_span_length=3.0, vocab_size=None,
                           sentinel_ids=None, max_sentinels=None, eos_id, pad_id=0, decoder_start_id=None, seed=None,
                           generator=None, backend="auto"):
    """Returns (enc_ids, enc_lens, targets, target_lens, dec_ids), padded with pad_id."""
    g = generator or torch.Generator().manual_seed(int(seed if seed is not None else torch.seed()))
    B, S = input_ids.shape
    lens = [S] * B if lengths is None else [int(x) for x in lengths]
    sent = list(sentinel_ids) if sentinel_ids is not None else [vocab_size - 1 - i for i in range(max_sentinels or 100)]
    rows_in, rows_tgt = [], []
    for b in range(B):
        toks = input_ids[b, : lens[b]].tolist()
        L = len(toks)
        L2 = max(L, 2)
        f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # T5 rounds in float32 (half to even)
        n = int(torch.round(f32(L2) * f32(noise_density)))
        n = min(max(n, 1), L2 - 1)
        k = max(int(torch.round(f32(n) / f32(mean_span_length))), 1)
        k = min(k, L2 - n)
        if k > len(sent):
            raise ValueError(f"row {b} needs {k} sentinels, more than the {len(sent)} given")
        noise, keep = _composition(n, k, g), _composition(L2 - n, k, g)
        mask = []
        for a, c in zip(keep, noise):
            mask += [False] * a + [True] * c
        mask = mask[:L]
        inp, tgt, prev = [], [], False
        span = -1
        for t, m in zip(toks, mask):
            if m and not prev:
                span += 1
                inp.append(sent[span])
                tgt.append(sent[span])
            (tgt if m else inp).append(t)
            prev = m
        rows_in.append(inp + [eos_id])
        rows_tgt.append(tgt + [eos_id])
    dev = input_ids.device

    def pad(rows):
        out = torch.full((B, max(len(r) for r in rows)), pad_id, dtype=input_ids.dtype)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        return out.to(dev), torch.tensor([len(r) for r in rows], device=dev)

    enc, enc_lens = pad(rows_in)
    tgt, tgt_lens = pad(rows_tgt)
    start = pad_id if decoder_start_id is None else decoder_start_id
    dec = torch.cat([torch.full_like(tgt[:, :1], start), tgt[:, :-1]], 1)
    dec = torch.where(torch.arange(dec.shape[1], device=dev)[None] < tgt_lens[:, None], dec, pad_id)
    return enc, enc_lens, tgt, tgt_lens, dec


# ---- the baseline: the same model with PyTorch's own pieces ----
def _plain_loss(shift: bool):
    def loss(hidden, weight, labels, reduction="mean"):
        if shift:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        logits = (hidden @ weight.T).float()  # materialised, as in most training code
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction=reduction)

    return loss


_SWAPPED = ("attention", "causal_lm_loss", "masked_lm_loss", "seq2seq_lm_loss")
_LIBRARY = {n: globals()[n] for n in _SWAPPED} | {"SOURCE": dict(SOURCE)}


def use_baseline(on: bool = True) -> None:
    """on: the baseline's pieces; off: back to the library's. The baseline's corruption is the same op (so both
    learn from the same bytes) run on the CPU by the loop, as a collator would, and then copied to the device."""
    if on:
        globals().update(zip(_SWAPPED, (_attention_fallback, _plain_loss(True), _plain_loss(False),
                                        _plain_loss(False))))
        SOURCE.update(attention="baseline (F.scaled_dot_product_attention)", losses="baseline (F.cross_entropy "
                      "over materialised logits)", corruption=f"baseline ({_CORR} on the CPU, then copied)")
    else:
        globals().update({n: _LIBRARY[n] for n in _SWAPPED})
        SOURCE.update(_LIBRARY["SOURCE"])


# ---- what the trainer calls ----
@dataclass
class T5Batch:
    input_ids: Tensor  # (B, Se) encoder inputs, padded
    input_lens: Tensor  # (B,)
    decoder_input_ids: Tensor  # (B, T)
    labels: Tensor  # (B, T) targets, ignore_index at padding


def mlm_corrupt(ids: Tensor, *, mask_id: int, vocab_size: int, special_ids, seed: int, mask_prob: float = 0.15,
                mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1) -> tuple[Tensor, Tensor]:
    fn = mlm_mask or _mlm_mask_fallback
    return fn(ids, mask_id=mask_id, vocab_size=vocab_size, mask_prob=mask_prob, mask_replace_prob=mask_replace_prob,
              random_replace_prob=random_replace_prob, special_ids=tuple(special_ids), seed=seed)


def t5_corrupt(ids: Tensor, *, vocab_size: int, eos_id: int, pad_id: int, decoder_start_id: int, seed: int,
               noise_density: float = 0.15, mean_span_length: float = 3.0, max_sentinels: int = 100,
               ignore_index: int = -100) -> T5Batch:
    if span_corrupt is not None:
        out = span_corrupt(ids, noise_density=noise_density, mean_span_length=mean_span_length, vocab_size=vocab_size,
                           max_sentinels=max_sentinels, eos_id=eos_id, pad_id=pad_id,
                           decoder_start_id=decoder_start_id, seed=seed)
        # The real op's return container: read it here and nowhere else (adjust these names when issue 3 lands).
        get = (lambda n: out[n]) if isinstance(out, dict) else (lambda n: getattr(out, n))
        enc, enc_lens = get("input_ids"), get("input_lengths")
        tgt, tgt_lens, dec = get("labels"), get("label_lengths"), get("decoder_input_ids")
    else:
        enc, enc_lens, tgt, tgt_lens, dec = _span_corrupt_fallback(
            ids, noise_density=noise_density, mean_span_length=mean_span_length, vocab_size=vocab_size,
            max_sentinels=max_sentinels, eos_id=eos_id, pad_id=pad_id, decoder_start_id=decoder_start_id, seed=seed)
    valid = torch.arange(tgt.shape[1], device=tgt.device)[None] < tgt_lens.to(tgt.device)[:, None]
    labels = torch.where(valid, tgt, torch.full_like(tgt, ignore_index))
    return T5Batch(enc, enc_lens, dec, labels)
