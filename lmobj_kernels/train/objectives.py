"""Objectives: which model learns, and how a batch of raw token windows becomes its training example.

An objective is a corruption function plus a model. More denoising objectives (BART noise, UL2 mixtures) plug in as
one more `Objective(..., model="t5", corrupt=...)` whose corrupt function returns the same keys as `t5_batch`.
Every tensor in a batch has the batch as its first axis, so a rank's share is a slice of the global batch.
With opts["doc_mask"] (packed documents, each ending with EOS) a batch also holds `doc_ids` (B, S) for the attention
of the model's (encoder's) input: a token attends only to tokens of its own document. T5's batch also holds
`decoder_doc_ids` (B, T): each target span belongs to the document of its sentinel in the encoder, so the decoder's
self-attention stays inside a document and its cross attention reads only that document's encoder states
(`kv_doc_ids`), as a packed T5 in seqio / t5x does with its segment ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lmobj_kernels.attention import _document_prefixes
from lmobj_kernels.train import kernels
from lmobj_kernels.train.data import ByteTokenizer


@dataclass(frozen=True)
class Objective:
    name: str
    model: str  # a key of models.MODELS
    title: str
    corrupt: Callable[[Tensor, ByteTokenizer, int, dict], dict]  # (windows, tokenizer, seed, options) -> batch
    shift: bool = False  # labels are scored against the next position (causal LM)

    def n_targets(self, batch: dict) -> int:
        labels = batch["labels"][:, 1:] if self.shift else batch["labels"]
        return int((labels != -100).sum())


def _docs(batch: dict, tok: ByteTokenizer, opts: dict) -> dict:
    if opts.get("doc_mask"):
        docs = kernels.doc_ids_from_eos(batch["input_ids"], tok.eos_id)
        if "input_lens" in batch:  # padding joins the last document: no query row is left without a key
            last = docs.gather(1, (batch["input_lens"].to(docs.device).long() - 1).clamp(min=0)[:, None])
            docs = torch.minimum(docs, last)
        batch["doc_ids"] = docs
    return batch


def clm_batch(ids: Tensor, tok: ByteTokenizer, seed: int, opts: dict) -> dict:
    return _docs({"input_ids": ids, "labels": ids}, tok, opts)


def mlm_batch(ids: Tensor, tok: ByteTokenizer, seed: int, opts: dict) -> dict:
    inputs, labels = kernels.mlm_corrupt(ids, mask_id=tok.mask_id, vocab_size=tok.vocab_size, seed=seed,
                                         special_ids=(tok.pad_id, tok.bos_id, tok.eos_id),
                                         mask_prob=opts.get("mask_prob", 0.15),
                                         # random replacements are bytes: 104 of the 360 ids are pad, BOS, EOS,
                                         # [MASK] and T5's sentinels, which BERT's text never holds
                                         random_range=(tok.offset, tok.offset + 256))
    # EOS is special: never masked, so the documents are those of the text (the mask's ids are not EOS)
    return _docs({"input_ids": inputs, "labels": labels}, tok, opts)


def _decoder_docs(batch: dict, tok: ByteTokenizer) -> dict:
    """T5 under --doc-mask: `decoder_doc_ids` (B, T), the encoder document of each target's span (span k's tokens
    follow sentinel k in the labels and replace sentinel k in the encoder input; the final EOS and the padding go
    with the last span), and decoder inputs restarted with the start id where a document's targets begin (seqio's
    packing shifts each segment's targets alone), so the first target of a document does not read the last of the
    one before."""
    enc, labels = batch["input_ids"], batch["labels"]
    sent_enc, sent_dec = tok.is_sentinel(enc), tok.is_sentinel(labels)  # elementwise on tensors
    # span k's document, by a scatter from the encoder's sentinels (no host sync): there are at most T spans, and
    # column T takes the scatter of every other position
    T = labels.shape[1]
    span_doc = torch.zeros(enc.shape[0], T + 1, dtype=batch["doc_ids"].dtype, device=enc.device)
    rank = (sent_enc.cumsum(1) - 1).clamp(min=0, max=T)  # span index of each encoder sentinel
    span_doc.scatter_(1, torch.where(sent_enc, rank, T), batch["doc_ids"])
    span = (sent_dec.cumsum(1) - 1).clamp(min=0)  # span index of each target (before the first sentinel: span 0)
    dec_docs = span_doc.gather(1, span)
    start = torch.zeros_like(sent_dec)
    start[:, 1:] = dec_docs[:, 1:] != dec_docs[:, :-1]
    dec_in = batch["decoder_input_ids"]
    batch["decoder_input_ids"] = torch.where(start, torch.full_like(dec_in, tok.bos_id), dec_in)
    batch["decoder_doc_ids"] = dec_docs
    return batch


def prefix_batch(ids: Tensor, tok: ByteTokenizer, seed: int, opts: dict) -> dict:
    """Prefix LM (T5's prefix-LM objective, UL2's S-denoiser): each row's first prefix_lens[b] tokens, drawn
    uniformly in [S/4, 3S/4], are read bidirectionally (causal attention with `prefix_lens`), and the model is scored
    on continuing them: the labels of prefix positions are ignored (a prefix position sees the tokens after it).
    Under --doc-mask each packed document has its own prefix, the row's share of its tokens (`prefix_mask`, t5x's
    decoder_causal_attention), as a packed prefix LM trains."""
    B, S = ids.shape
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(S // 4, 3 * S // 4 + 1, (B,), generator=g).to(ids.device)
    batch = _docs({"input_ids": ids}, tok, opts)
    if "doc_ids" in batch:
        in_prefix = batch["prefix_mask"] = _document_prefixes(batch["doc_ids"], prefix, S)
    else:
        in_prefix = torch.arange(S, device=ids.device) < prefix[:, None]
        batch["prefix_lens"] = prefix
    batch["labels"] = torch.where(in_prefix, -100, ids)
    return batch


def t5_batch(ids: Tensor, tok: ByteTokenizer, seed: int, opts: dict) -> dict:
    b = kernels.t5_corrupt(ids, vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           decoder_start_id=tok.bos_id, seed=seed, noise_density=opts.get("noise_density", 0.15),
                           mean_span_length=opts.get("mean_span_length", 3.0), max_sentinels=tok.n_sentinels)
    # the encoder's documents: those whose EOS survived corruption (an EOS inside a noise span joins its two
    # documents), the last one ending at the EOS span corruption appends
    batch = _docs({"input_ids": b.input_ids, "input_lens": b.input_lens, "decoder_input_ids": b.decoder_input_ids,
                   "labels": b.labels}, tok, opts)
    return _decoder_docs(batch, tok) if "doc_ids" in batch else batch


OBJECTIVES = {
    "clm": Objective("clm", "gpt", "causal LM (GPT)", clm_batch, shift=True),
    "mlm": Objective("mlm", "bert", "masked LM (BERT)", mlm_batch),
    "t5": Objective("t5", "t5", "span corruption (T5)", t5_batch),
    "prefix": Objective("prefix", "gpt", "prefix LM (UL2's S-denoiser)", prefix_batch, shift=True),
}
# what `--objective all` trains: the three objectives of the README's demo (prefix LM runs on its own)
ALL = ("clm", "mlm", "t5")
