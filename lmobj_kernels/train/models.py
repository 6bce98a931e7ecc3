"""Three students built from the same blocks, in the spirit of nanoGPT:

- GPT: a decoder-only stack with causal attention, scored by `causal_lm_loss` (predict the next token); the prefix
  LM is the same model with a per-row bidirectional prefix (the attention's `prefix_lens`);
- BERT: an encoder stack with bidirectional attention over the unpadded keys, scored by `masked_lm_loss`;
- T5: an encoder, and a decoder with causal self-attention and cross-attention to it, scored by `seq2seq_lm_loss`.

Every model ties its LM head to the token embedding and never materialises the logits in training: the library's
fused losses (`kernels.causal_lm_loss` ...) take the final hidden states and the embedding matrix. Attention goes
through `kernels.attention`; a batch's `doc_ids` (packed documents, `--doc-mask`) keep the self-attention of
the model's input (GPT's, BERT's, T5's encoder's) inside each document, and T5's `decoder_doc_ids` keep its decoder's
self-attention inside a document and its cross attention on that document's encoder states.
Dropout (`ModelConfig.dropout`, GPT-2's, BERT's and T5's 0.1 in their papers; 0 by default here) is applied where
GPT-2 applies it: to the softmax weights (the library's fused attention dropout), to each residual branch and to the
embeddings; in training mode only.
Each model's forward takes a batch dict and returns the summed loss; `logits` is for evaluation and demos only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lmobj_kernels.train import kernels


@dataclass
class ModelConfig:
    vocab_size: int = 360
    block_size: int = 130  # the longest sequence (positions)
    n_layer: int = 2  # T5 gets n_layer in its encoder and n_layer in its decoder
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0  # attention weights, residual branches and embeddings, in training


def rope(x: Tensor) -> Tensor:
    """Rotary position embedding of (B, H, S, Dh) queries or keys: position s rotates each pair of channels."""
    S, Dh = x.shape[-2], x.shape[-1]
    inv_freq = 10000.0 ** (-torch.arange(0, Dh, 2, device=x.device, dtype=torch.float32) / Dh)
    angle = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head attention: self-attention over x (with rotary positions), or cross-attention from x to `memory`
    (no positions: T5's decoder finds what it needs by content)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)  # its p is also the attention dropout

    def forward(self, x: Tensor, memory: Tensor | None = None, *, causal=False, kv_lens=None, doc_ids=None,
                kv_doc_ids=None, prefix_lens=None, prefix_mask=None) -> Tensor:
        B, S, D = x.shape
        src = x if memory is None else memory
        heads = lambda t: t.view(B, t.shape[1], self.n_head, D // self.n_head).transpose(1, 2)  # (B, H, S, Dh)
        q, (k, v) = heads(self.q(x)), (heads(t) for t in self.kv(src).split(D, dim=-1))
        if memory is None:
            q, k = rope(q), rope(k)
        # the seed comes from the default generator, which the loop seeds per step
        y = kernels.attention(q, k, v, causal=causal, kv_lens=kv_lens, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids,
                              prefix_lens=prefix_lens, prefix_mask=prefix_mask,
                              dropout_p=self.drop.p if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, S, D)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.down = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm transformer block; with `cross=True` it also attends to an encoder's output (T5's decoder)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln_x, self.xattn = (nn.LayerNorm(cfg.d_model), Attention(cfg)) if cross else (None, None)
        self.ln2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, *, causal=False, kv_lens=None, doc_ids=None, memory=None, memory_lens=None,
                memory_doc_ids=None, prefix_lens=None, prefix_mask=None):
        x = x + self.attn(self.ln1(x), causal=causal, kv_lens=kv_lens, doc_ids=doc_ids, prefix_lens=prefix_lens,
                          prefix_mask=prefix_mask)
        if self.xattn is not None:  # with memory_doc_ids, a position reads only its own document's memory
            x = x + self.xattn(self.ln_x(x), memory, kv_lens=memory_lens,
                               doc_ids=doc_ids if memory_doc_ids is not None else None, kv_doc_ids=memory_doc_ids)
        return x + self.mlp(self.ln2(x))


class Embedding(nn.Module):
    """Token embeddings (positions come from rotary attention); `weight` is also the (tied) LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.block_size = cfg.block_size

    @property
    def weight(self) -> Tensor:
        return self.tok.weight

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.block_size:
            raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than the model's {self.block_size}")
        return self.drop(self.tok(ids))


def _init(module: nn.Module, n_layer: int) -> None:
    for name, p in module.named_parameters():
        if p.dim() >= 2:  # GPT-2: N(0, 0.02), residual projections scaled down by depth
            std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith(("proj.weight", "down.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)


class GPT(nn.Module):
    """Decoder-only: causal attention (with a batch's `prefix_lens`: bidirectional inside each row's prefix, the
    prefix LM; `prefix_mask` instead: inside each packed document's prefix); loss = next-token cross-entropy (labels
    = the inputs, shifted inside)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.emb = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        _init(self, cfg.n_layer)

    def hidden(self, ids: Tensor, doc_ids: Tensor | None = None, prefix_lens: Tensor | None = None,
               prefix_mask: Tensor | None = None) -> Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x, causal=True, doc_ids=doc_ids, prefix_lens=prefix_lens, prefix_mask=prefix_mask)
        return self.ln_f(x)

    def forward(self, batch: dict, reduction: str = "sum") -> Tensor:
        h = self.hidden(batch["input_ids"], batch.get("doc_ids"), batch.get("prefix_lens"), batch.get("prefix_mask"))
        return kernels.causal_lm_loss(h, self.emb.weight, batch["labels"], reduction=reduction)

    def logits(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(logits, targets) aligned: position t predicts token t+1."""
        h = self.hidden(batch["input_ids"], batch.get("doc_ids"), batch.get("prefix_lens"), batch.get("prefix_mask"))
        return h[:, :-1] @ self.emb.weight.T, batch["labels"][:, 1:]


class BERT(nn.Module):
    """Encoder: bidirectional attention (padding keys masked); loss only at the masked positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.emb = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        _init(self, cfg.n_layer)

    def hidden(self, ids: Tensor, lens: Tensor | None = None, doc_ids: Tensor | None = None) -> Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x, kv_lens=lens, doc_ids=doc_ids)
        return self.ln_f(x)

    def forward(self, batch: dict, reduction: str = "sum") -> Tensor:
        h = self.hidden(batch["input_ids"], batch.get("input_lens"), batch.get("doc_ids"))
        return kernels.masked_lm_loss(h, self.emb.weight, batch["labels"], reduction=reduction)

    def logits(self, batch: dict) -> tuple[Tensor, Tensor]:
        h = self.hidden(batch["input_ids"], batch.get("input_lens"), batch.get("doc_ids"))
        return h @ self.emb.weight.T, batch["labels"]


class T5(nn.Module):
    """Encoder-decoder: the encoder reads the corrupted text, the decoder writes the missing spans."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.emb = Embedding(cfg)  # shared by encoder, decoder and the LM head
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.n_layer))
        self.ln_enc, self.ln_dec = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        _init(self, 2 * cfg.n_layer)

    def encode(self, ids: Tensor, lens: Tensor | None, doc_ids: Tensor | None = None) -> Tensor:
        x = self.emb(ids)
        for block in self.encoder:
            x = block(x, kv_lens=lens, doc_ids=doc_ids)
        return self.ln_enc(x)

    def decode(self, dec_ids: Tensor, memory: Tensor, memory_lens: Tensor | None, doc_ids: Tensor | None = None,
               memory_doc_ids: Tensor | None = None) -> Tensor:
        y = self.emb(dec_ids)
        for block in self.decoder:
            y = block(y, causal=True, doc_ids=doc_ids, memory=memory, memory_lens=memory_lens,
                      memory_doc_ids=memory_doc_ids)
        return self.ln_dec(y)

    def hidden(self, batch: dict) -> Tensor:
        memory = self.encode(batch["input_ids"], batch.get("input_lens"), batch.get("doc_ids"))
        dec_docs = batch.get("decoder_doc_ids")
        return self.decode(batch["decoder_input_ids"], memory, batch.get("input_lens"), dec_docs,
                           batch.get("doc_ids") if dec_docs is not None else None)

    def forward(self, batch: dict, reduction: str = "sum") -> Tensor:
        return kernels.seq2seq_lm_loss(self.hidden(batch), self.emb.weight, batch["labels"], reduction=reduction)

    def logits(self, batch: dict) -> tuple[Tensor, Tensor]:
        return self.hidden(batch) @ self.emb.weight.T, batch["labels"]


MODELS = {"gpt": GPT, "bert": BERT, "t5": T5}
