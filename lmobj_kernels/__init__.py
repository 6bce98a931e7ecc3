"""lmobj-kernels: fused kernels for language-model pre-training objectives (causal LM, masked LM, denoising)."""

from __future__ import annotations

__version__ = "0.1.0"

from lmobj_kernels._backend import BACKENDS, available_backends  # noqa: E402
from lmobj_kernels._build_info import build_info  # noqa: E402
from lmobj_kernels.attention import (  # noqa: E402
    MaskedAttention,
    alibi_slopes,
    attention,
    attention_varlen,
    doc_ids_from_cu_seqlens,
    doc_ids_from_eos,
    doc_ids_from_position_ids,
)
from lmobj_kernels.corruption import (  # noqa: E402
    MLMCollator,
    SpanCorruptionCollator,
    SpanCorruptionOutput,
    mlm_mask,
    span_corrupt,
    t5_input_length,
)
from lmobj_kernels.losses import (  # noqa: E402
    CausalLMLoss,
    CrossEntropyLoss,
    LinearCrossEntropyLoss,
    MaskedLMLoss,
    Seq2SeqLMLoss,
    causal_lm_loss,
    cross_entropy,
    linear_cross_entropy,
    masked_lm_loss,
    seq2seq_lm_loss,
)

__all__ = [
    "BACKENDS",
    "available_backends",
    "build_info",
    "__version__",
    "cross_entropy",
    "linear_cross_entropy",
    "causal_lm_loss",
    "seq2seq_lm_loss",
    "masked_lm_loss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "CausalLMLoss",
    "MaskedLMLoss",
    "Seq2SeqLMLoss",
    # corruption (T5 span corruption, BERT masking)
    "span_corrupt",
    "t5_input_length",
    "mlm_mask",
    "SpanCorruptionOutput",
    "SpanCorruptionCollator",
    "MLMCollator",
    "alibi_slopes",
    "attention",
    "attention_varlen",
    "doc_ids_from_cu_seqlens",
    "doc_ids_from_eos",
    "doc_ids_from_position_ids",
    "MaskedAttention",
]
