"""Objectives: which model learns, and how a batch of raw token windows becomes its training example.

An objective is a corruption function plus a model. More denoising objectives (BART noise, UL2 mixtures) plug in as
one more `Objective(..., model="t5", corrupt=...)` whose corrupt function returns the same keys as `t5_batch`.
Every tensor in a batch has the batch as its first axis, so a rank's share is a slice of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

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


def clm_batch(ids: Tensor, tok: ByteTokenizer, seed: int, opts: dict) -> dict:
    return {"input_ids": ids, "labels": ids}


def mlm_batch(ids: Tensor, tok: ByteTokenizer, seed: int, opts: dict) -> dict:
    inputs, labels = kernels.mlm_corrupt(ids, mask_id=tok.mask_id, vocab_size=tok.vocab_size, seed=seed,
                                         special_ids=(tok.pad_id, tok.bos_id, tok.eos_id),
                                         mask_prob=opts.get("mask_prob", 0.15),
                                         # random replacements are bytes: 104 of the 360 ids are pad, BOS, EOS,
                                         # [MASK] and T5's sentinels, which BERT's text never holds
                                         random_range=(tok.offset, tok.offset + 256))
    return {"input_ids": inputs, "labels": labels}


def t5_batch(ids: Tensor, tok: ByteTokenizer, seed: int, opts: dict) -> dict:
    b = kernels.t5_corrupt(ids, vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           decoder_start_id=tok.bos_id, seed=seed, noise_density=opts.get("noise_density", 0.15),
                           mean_span_length=opts.get("mean_span_length", 3.0), max_sentinels=tok.n_sentinels)
    return {"input_ids": b.input_ids, "input_lens": b.input_lens, "decoder_input_ids": b.decoder_input_ids,
            "labels": b.labels}


OBJECTIVES = {
    "clm": Objective("clm", "gpt", "causal LM (GPT)", clm_batch, shift=True),
    "mlm": Objective("mlm", "bert", "masked LM (BERT)", mlm_batch),
    "t5": Objective("t5", "t5", "span corruption (T5)", t5_batch),
}
