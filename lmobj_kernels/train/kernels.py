"""The one place where the trainer meets the library's attention and corruption ops.

The trainer only ever calls `attention`, the three losses, `mlm_corrupt`, `t5_corrupt` and `doc_ids_from_eos` from
this module.
`use_baseline()` swaps them for what people use today (PyTorch's own SDPA, F.cross_entropy over materialised
logits, corruption on the CPU before the copy), for `lmobj train --baseline` tokens/s comparisons. `SOURCE` says
which is in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmobj_kernels.attention import (
    attention,  # noqa: F401 (the models call it)
    doc_ids_from_eos,  # noqa: F401 (the objectives call it)
)
from lmobj_kernels.attention import attention as _library_attention  # fixed: use_baseline rebinds `attention`
from lmobj_kernels.corruption import mlm_mask, span_corrupt
from lmobj_kernels.losses import causal_lm_loss, masked_lm_loss, seq2seq_lm_loss  # noqa: F401 (the models call these)
from lmobj_kernels.reference.attention import attention_mask as _attention_mask
from lmobj_kernels.reference.corruption import span_counts as _span_counts

_CORR = "lmobj_kernels.span_corrupt / mlm_mask"
SOURCE = {"attention": "lmobj_kernels.attention", "corruption": _CORR,
          "losses": "lmobj_kernels (fused linear cross-entropy)"}


def _sdpa_attention(q, k, v, *, causal=False, kv_lens=None, doc_ids=None, kv_doc_ids=None, prefix_lens=None,
                    prefix_mask=None, dropout_p=0.0):
    """The baseline's attention: PyTorch's SDPA with a boolean mask (the library's `torch` backend is exactly that).
    With dropout, SDPA's own (the torch backend would compute the library's draws the plain way instead); the
    trainer's masks leave no query row without a key, so SDPA's empty-row behaviour never matters."""
    if dropout_p == 0:
        return _library_attention(q, k, v, backend="torch", causal=causal, kv_lens=kv_lens, doc_ids=doc_ids,
                                  kv_doc_ids=kv_doc_ids, prefix_lens=prefix_lens, prefix_mask=prefix_mask)
    mask = None
    if any(m is not None for m in (kv_lens, doc_ids, prefix_lens, prefix_mask)):
        mask = _attention_mask(q.shape[0], q.shape[2], k.shape[2], causal=causal, kv_lens=kv_lens, doc_ids=doc_ids,
                               kv_doc_ids=kv_doc_ids, prefix_lens=prefix_lens, prefix_mask=prefix_mask,
                               device=q.device).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          dropout_p=dropout_p)


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
        globals().update(zip(_SWAPPED, (_sdpa_attention, _plain_loss(True), _plain_loss(False),
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
                mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                random_range: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    return mlm_mask(ids, mask_id=mask_id, vocab_size=vocab_size, mask_prob=mask_prob,
                    mask_replace_prob=mask_replace_prob, random_replace_prob=random_replace_prob,
                    special_ids=tuple(special_ids), seed=seed, random_range=random_range)


def t5_corrupt(ids: Tensor, *, vocab_size: int, eos_id: int, pad_id: int, decoder_start_id: int, seed: int,
               noise_density: float = 0.15, mean_span_length: float = 3.0, max_sentinels: int = 100,
               ignore_index: int = -100) -> T5Batch:
    out = span_corrupt(ids, noise_density=noise_density, mean_span_length=mean_span_length, vocab_size=vocab_size,
                       max_sentinels=max_sentinels, eos_id=eos_id, pad_id=pad_id, decoder_start_id=decoder_start_id,
                       seed=seed)
    tgt, tgt_lens = out.labels, out.label_lengths
    valid = torch.arange(tgt.shape[1], device=tgt.device)[None] < tgt_lens.to(tgt.device)[:, None]
    labels = torch.where(valid, tgt, torch.full_like(tgt, ignore_index))
    return T5Batch(out.input_ids, out.input_lengths, out.decoder_input_ids, labels)


def t5_span_count(seq_len, noise_density: float = 0.15, mean_span_length: float = 3.0):
    """How many noise spans (so sentinels) t5_corrupt gives a row of seq_len tokens: span_corrupt's own arithmetic
    (float32, round half to even). An int for an int, an array for an array of lengths."""
    k = _span_counts(np.atleast_1d(seq_len), noise_density, mean_span_length)[1]
    return int(k[0]) if np.ndim(seq_len) == 0 else k
