"""Fused attention for every objective's mask (ALGORITHMS.md, "Attention masks").

`attention(q, k, v, ...)` has the layout of `F.scaled_dot_product_attention`: q (B, Hq, Sq, D), k and v
(B, Hkv, Sk, D), Hq a multiple of Hkv (grouped-query attention). Masks, freely combined:
- causal (GPT); `prefix_lens` (B,) with causal=True: prefix-LM (T5/UL2 decoder-only: bidirectional inside the
  prefix, causal after it); `prefix_mask` (B, S) instead: prefix tokens flagged one by one (t5x's
  decoder_causal_attention), so each packed document can have its own prefix;
- `kv_lens` (B,): key padding (BERT); non-causal with Sq != Sk: cross attention (encoder-decoder);
- `doc_ids` (B, S) ints: packed documents, a query attends only to keys of its own document (build them with
  `doc_ids_from_cu_seqlens` or `doc_ids_from_eos`); with `kv_doc_ids` (B, Sk) too, packed cross attention: the
  queries' documents (B, Sq) against the keys' (a packed encoder-decoder);
- `window=(left, right)`: sliding-window (local) attention, query i sees keys i - left .. i + right (None: that
  side unbounded), as FlashAttention's `window_size`; with causal=True, `(w - 1, None)` is Mistral's window of w;
- `softcap=c`: Gemma 2's soft-capped scores, c * tanh(s / c) of the scaled scores s (FlashAttention's `softcap`);
- `alibi_slopes` (Hq,) or (B, Hq): ALiBi's linear position bias (BLOOM, MPT), -slope * |i + Sk - Sq - j| added
  to the scores, as FlashAttention's `alibi_slopes` (`alibi_slopes(n_heads)` gives the paper's slopes);
- `dropout_p=p`: attention dropout (BERT's and T5's 0.1) on the softmax weights, drawn from a counter-based
  Philox stream (`reference.attention.dropout_keep`): the same seed drops the same weights on every backend, and
  the backward regenerates them instead of storing a mask.
A query row with no allowed key returns zeros (and lse = -inf) with zero gradients, never NaN (as SDPA did).
`attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k=None, ...)` takes FlashAttention's varlen layout instead:
(total, H, D) rows of concatenated sequences and their boundaries.

Backends: `triton` (GPU, or interpreted with TRITON_INTERPRET=1) skips the blocks the mask empties, forward and
backward; `torch` serves every mask on any device through `F.scaled_dot_product_attention` with an explicit
boolean mask (or `is_causal` when that is the whole mask). `auto` uses Triton on CUDA tensors, torch elsewhere.
The Triton backward is deterministic (no atomics); on a GPU the torch backend's SDPA backward may accumulate with
atomics, and `deterministic=True` makes it compute the plain way (scores materialised) instead.
Keys past kv_lens are never read: padding may hold anything, NaN included.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmobj_kernels import _attention_ops  # noqa: F401  (registers lmobj::attn_*_triton)
from lmobj_kernels._backend import check_backend_name, resolve, why_unavailable
from lmobj_kernels._checks import FLOAT32_MAX, FLOAT32_TINY, autocast_inputs, check_flag, fits_int64, is_int, is_real
from lmobj_kernels.corruption import check_seed, seed_tensor
from lmobj_kernels.reference import attention as ref

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


# ---- argument checks: ValueError / TypeError naming the argument ----
def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, S, D), got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {B}")
    if k.shape[-1] != D:
        raise ValueError(f"k has head dim {k.shape[-1]} but q has {D}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({k.shape[1]}) (grouped-query)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) must be in [1, {MAX_HEAD_DIM}], got {D}")


def _is_seq(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


def _as_index_tensor(name: str, x, device) -> Tensor:
    if _is_seq(x):  # (B,) lengths, or (B, S) ids as a list of lists
        rows = [list(r) if _is_seq(r) else r for r in x]
        nested = {_is_seq(r) for r in x}
        flat = [v for r in rows for v in (r if isinstance(r, list) else [r])]
        if len(nested) > 1 or not all(is_int(v) for v in flat):
            raise TypeError(f"{name} must hold ints (or lists of ints), got {x!r}"[:200])  # 3.5 would become 3
        if len({len(r) for r in rows if isinstance(r, list)}) > 1:
            raise ValueError(f"{name}'s rows must have one length, got {sorted({len(r) for r in rows})}")
        if not all(fits_int64(v) for v in flat):
            raise ValueError(f"{name} holds an int past int64, got {x!r}"[:200])
        x = torch.tensor(rows, dtype=torch.int64, device=device)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor (or a sequence of ints), got {type(x).__name__}")
    if x.dtype not in _INTS:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    return x


def _check_range(name: str, x: Tensor, high: int, what: str, low: int = 0) -> None:
    """low <= x <= high. On the CPU this reads the values; on a GPU (or while compiling) it is a device-side
    assert, so no host synchronisation."""
    x = x.to(torch.int64)  # a Python bound compared in uint8 / int8 / int16 would wrap (300 as uint8 is 44)
    ok = (x >= low) & (x <= high)
    if x.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok.all(), f"{name} holds a value outside [{low}, {high}] ({what})")
    elif x.numel() and not bool(ok.all()):
        bad = int(x[~ok][0])
        raise ValueError(f"{name} holds {bad}, outside [{low}, {high}] ({what})")


def _check_prefix_mask(q, causal, prefix_lens, prefix_mask) -> Tensor | None:
    """prefix_mask as a bool (B, S) tensor on q's device (t5x's decoder_causal_attention: the prefix tokens)."""
    if prefix_mask is None:
        return None
    if not causal:
        raise ValueError("prefix_mask needs causal=True (prefix-LM: bidirectional among the prefix tokens, causal "
                         "elsewhere)")
    if prefix_lens is not None:
        raise ValueError("give prefix_lens (one prefix per row) or prefix_mask (per token), not both")
    if _is_seq(prefix_mask):
        if len({len(r) if _is_seq(r) else -1 for r in prefix_mask}) > 1:
            raise ValueError("prefix_mask's rows must have one length (lists of bools, one per batch row)")
        prefix_mask = torch.as_tensor(prefix_mask, device=q.device)
    if not isinstance(prefix_mask, Tensor) or not (prefix_mask.dtype == torch.bool or prefix_mask.dtype in _INTS):
        raise TypeError(f"prefix_mask must be a bool tensor (or an integer one: nonzero flags a token), got "
                        f"{getattr(prefix_mask, 'dtype', type(prefix_mask).__name__)}")
    B, _, S, _ = q.shape
    if tuple(prefix_mask.shape) != (B, S):
        raise ValueError(f"prefix_mask must have shape (B, S) = ({B}, {S}), got {tuple(prefix_mask.shape)}")
    if prefix_mask.device != q.device:
        raise ValueError(f"prefix_mask is on {prefix_mask.device} but q is on {q.device}")
    return prefix_mask if prefix_mask.dtype == torch.bool else prefix_mask != 0


def _check_masks(q, k, causal, prefix_lens, doc_ids, kv_lens, kv_doc_ids=None):
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and Sq != Sk:
        raise ValueError(f"causal=True needs as many queries as keys, got Sq={Sq}, Sk={Sk} "
                         "(cross attention is non-causal)")
    if prefix_lens is not None:
        if not causal:
            raise ValueError("prefix_lens needs causal=True (prefix-LM: bidirectional prefix, causal after it)")
        prefix_lens = _as_index_tensor("prefix_lens", prefix_lens, q.device)
        if tuple(prefix_lens.shape) != (B,):
            raise ValueError(f"prefix_lens must have shape ({B},), got {tuple(prefix_lens.shape)}")
        _check_range("prefix_lens", prefix_lens, Sq, "a prefix length per batch row")
    if kv_lens is not None:
        kv_lens = _as_index_tensor("kv_lens", kv_lens, q.device)
        if tuple(kv_lens.shape) != (B,):
            raise ValueError(f"kv_lens must have shape ({B},), got {tuple(kv_lens.shape)}")
        _check_range("kv_lens", kv_lens, Sk, "a number of valid keys per batch row")
    if kv_doc_ids is not None:
        if doc_ids is None:
            raise ValueError("kv_doc_ids (the keys' documents) needs doc_ids (the queries' documents)")
        kv_doc_ids = _as_index_tensor("kv_doc_ids", kv_doc_ids, q.device)
        if tuple(kv_doc_ids.shape) != (B, Sk):
            raise ValueError(f"kv_doc_ids must have shape (B, Sk) = ({B}, {Sk}), got {tuple(kv_doc_ids.shape)}")
    if doc_ids is not None:
        doc_ids = _as_index_tensor("doc_ids", doc_ids, q.device)
        if kv_doc_ids is None and Sq != Sk:
            raise ValueError(f"doc_ids alone is for self-attention (Sq == Sk), got Sq={Sq}, Sk={Sk}; for packed "
                             "cross attention pass the queries' documents as doc_ids and the keys' as kv_doc_ids")
        if tuple(doc_ids.shape) != (B, Sq):
            name = "(B, S)" if kv_doc_ids is None else "(B, Sq)"
            raise ValueError(f"doc_ids must have shape {name} = ({B}, {Sq}), got {tuple(doc_ids.shape)}")
    return prefix_lens, doc_ids, kv_lens, kv_doc_ids


def _window_bounds(window) -> tuple[int | None, int | None] | None:
    """window as a checked (left, right) pair of Python ints >= 0 or None (unbounded), or None."""
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints or None, got {window!r}"[:200])
    out = []
    for side, v in zip(("left", "right"), window):
        v = _plain_int(v)
        if v is not None and not is_int(v):
            raise TypeError(f"window's {side} bound must be an int or None (unbounded), got {v!r}"[:200])
        if v is not None and v < 0:
            raise ValueError(f"window's {side} bound must be >= 0 (None is unbounded, where FlashAttention takes "
                             f"-1), got {v}")
        out.append(None if v is None else int(v))  # int(): a NumPy int would not fit the op's schema
    return out[0], out[1]


def _check_window(window, Sq: int, Sk: int) -> tuple[int | None, int | None] | None:
    """window as (left, right) for a call: a bound that reaches past the sequence is None, and (None, None) is no
    window at all; a bound needs self-attention (Sq == Sk)."""
    window = _window_bounds(window)
    if window is None or window == (None, None):
        return None
    if Sq != Sk:
        raise ValueError(f"window needs as many queries as keys (self-attention), got Sq={Sq}, Sk={Sk}")
    left, right = (None if w is None or w >= Sk else w for w in window)
    return None if left is None and right is None else (left, right)


def _check_scale(scale) -> None:
    if scale is not None and (not is_real(scale) or not abs(scale) <= FLOAT32_MAX / _LOG2E):  # Triton: * log2(e)
        raise ValueError(f"scale must be None or a float finite in float32, got {scale!r}")


def _check_softcap(softcap, scale: float) -> None:
    # the kernels compute scale / c and c * log2(e) in float32: both finite
    if softcap is not None and (not is_real(softcap) or not FLOAT32_TINY <= softcap <= FLOAT32_MAX / _LOG2E
                                or not abs(scale) / softcap <= FLOAT32_MAX):
        raise ValueError(f"softcap must be None or a float > 0 (a normal float32, scale / softcap finite), got "
                         f"{softcap!r}")


def _check_slopes_tensor(alibi_slopes, expected: str) -> None:
    """What attention() and MaskedAttention both ask of a slope tensor: a float tensor, with no gradient wanted."""
    if not isinstance(alibi_slopes, Tensor) or alibi_slopes.dtype not in _FLOATS:
        raise TypeError(f"alibi_slopes must be {expected}, got "
                        f"{alibi_slopes.dtype if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__}")
    if alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes requires grad, but no gradient is computed for the slopes (as in "
                         "FlashAttention); pass alibi_slopes.detach()")


def _check_alibi(alibi_slopes, q: Tensor, Sk: int) -> Tensor | None:
    """alibi_slopes as a detached (B, Hq) tensor in its own float dtype, or None. Values must be finite, with the
    bias -slope * distance finite in float32 after the kernels' * log2(e): read on the CPU, a device-side assert on
    a GPU or while compiling (no host synchronisation)."""
    if alibi_slopes is None:
        return None
    B, Hq = q.shape[0], q.shape[1]
    _check_slopes_tensor(alibi_slopes, f"a float tensor of shape ({Hq},) or ({B}, {Hq})")
    if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must have shape ({Hq},) or ({B}, {Hq}) (one slope per query head), got "
                         f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")
    bound = FLOAT32_MAX / _LOG2E / max(q.shape[2], Sk, 1)
    ok = (alibi_slopes.abs() <= bound).all()  # NaN fails too
    if alibi_slopes.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok, "alibi_slopes holds a slope that is not finite, or whose bias over the sequence "
                                "overflows float32")
    elif not bool(ok):
        raise ValueError(f"alibi_slopes must be finite, with |slope| * sequence length finite in float32; got "
                         f"|slope| up to {float(alibi_slopes.abs().max())}")
    return alibi_slopes.detach().expand(B, Hq)


def _check_heads(n_heads) -> int:
    n_heads = _plain_int(n_heads)
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"n_heads must be an int >= 1, got {n_heads!r}")
    return n_heads


def alibi_slopes(n_heads: int, *, device: torch.device | str = "cpu") -> Tensor:
    """ALiBi's per-head slopes (Press et al., 2022), float32 (n_heads,): for n a power of two the geometric series
    2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise the slopes of the power of two m just below n, followed by every
    other slope of 2m (the first n - m of them), as BLOOM builds them."""
    n_heads = _check_heads(n_heads)

    def series(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    m = 1 << (n_heads.bit_length() - 1)
    slopes = series(m) + series(2 * m)[0::2][: n_heads - m]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


_paper_slopes = alibi_slopes  # for the code whose argument of that name hides the function


def _check_dropout(dropout_p, name: str = "dropout_p") -> None:
    if not is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")


def _dropout_seed(seed, generator, device: torch.device) -> Tensor:
    """The int64 [1] dropout seed on `device`, without a host synchronisation: `seed` (an int in [0, 2^63) or an
    int64 tensor, copied: the backward reads it, and the caller may advance theirs in place meanwhile), a draw from
    `generator`, or else from the device's default generator (as SDPA's dropout; on a GPU this is CUDA-graph and
    torch.compile safe)."""
    if seed is None and generator is None:
        return torch.randint(0, 2**62, (1,), device=device)
    t = seed_tensor(seed, generator, device)
    return t.clone() if isinstance(seed, Tensor) else t  # one element; data_ptr() would break torch.compile


def _resolve(backend: str, q: Tensor) -> str:
    if backend in ("cpu", "cuda"):
        raise ValueError(f"backend {backend!r} has no attention kernel (yet); use 'triton', 'torch' or 'auto'")
    if q.dtype == torch.float64:
        if backend not in ("auto", "torch"):
            raise TypeError(f"float64 inputs run only on the torch backend, not {backend!r}")
        return "torch"
    name = resolve(backend, q.device, "attention")
    if name not in ("triton", "torch"):  # auto / LMOBJ_BACKEND picked a backend without attention
        name = "triton" if q.is_cuda and not why_unavailable("triton", q.device) else "torch"
    return name


# ---- the torch backend ----
def _nonempty_rows(allowed: Tensor, kv_lens: Tensor, doc_ids: Tensor | None, window) -> Tensor:
    """Which query rows of the (B, 1, Sq, Sk) mask have an allowed key, broadcastable to (B, 1, Sq, 1). Without
    documents or a window key 0 is allowed to every row of a batch row whose kv_len > 0 (causal or not, any
    prefix), so the metadata says it without a pass over the mask (a bool reduction of 4M entries took ~3 ms at
    S=2048)."""
    if doc_ids is None and window is None:
        return (kv_lens > 0).view(-1, 1, 1, 1)
    return allowed.any(-1, keepdim=True)


def _torch_attention(q, k, v, causal, prefix_lens, doc_ids, kv_lens, window, scale, softcap, return_lse,
                     plain=False, dropout_p=0.0, seed=None, alibi_slopes=None, kv_doc_ids=None, prefix_mask=None):
    """plain: the reference's computation in float32 (deterministic on a GPU, where SDPA's backward need not be);
    a softcap, which SDPA cannot apply, dropout, whose SDPA draws no other backend could repeat, and ALiBi (SDPA
    would need the same (B, H, Sq, Sk) bias materialised as a float mask) compute that way too."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    gqa = Hq != Hkv
    only_causal = (causal and prefix_lens is None and doc_ids is None and kv_lens is None and window is None
                   and prefix_mask is None)
    masks = dict(causal=causal, prefix_lens=prefix_lens, doc_ids=doc_ids, kv_lens=kv_lens, window=window,
                 kv_doc_ids=kv_doc_ids, prefix_mask=prefix_mask)
    lse = None
    if kv_lens is not None and Sk:  # padding keys hold anything: a NaN there would pass a 0 weight (0 * NaN)
        valid = (torch.arange(Sk, device=k.device) < kv_lens.view(B, 1, 1, 1).to(k.device)).view(B, 1, Sk, 1)
        zero = torch.zeros((), dtype=k.dtype, device=k.device)
        k, v = torch.where(valid, k, zero), torch.where(valid, v, zero)
    if plain or softcap is not None or dropout_p > 0 or alibi_slopes is not None:
        out, lse = ref.attention(q, k, v, scale=scale, softcap=softcap, dropout_p=dropout_p, seed=seed,
                                 alibi_slopes=alibi_slopes, **masks)
        return out, lse.detach().to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    if Sk == 0:
        # keeps the graph: zero gradients for q, and for k and v (empty, but present, as Triton returns them)
        out = q.new_zeros(q.shape) + 0 * q + 0 * (k.sum() + v.sum())
    # is_causal only with a positive scale: SDPA's CPU kernel gives NaN rows for scale <= 0 (its -inf mask is
    # scaled with the scores); the explicit mask below is right for any scale
    elif (only_causal and scale > 0) or not (causal or any(m is not None for n, m in masks.items() if n != "causal")):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    else:
        allowed = ref.attention_mask(B, Sq, Sk, device=q.device, **masks).unsqueeze(1)
        if kv_lens is None and kv_doc_ids is None:  # every query sees itself (diagonal, own document, window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
        else:  # a query may see no key: key padding, or no key of its document (cross attention)
            nonempty = _nonempty_rows(allowed, kv_lens, doc_ids, window)
            if q.device.type == "cpu" and not torch.compiler.is_compiling() and bool(nonempty.all()):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
            else:
                # SDPA makes empty rows NaN (or 0 in some versions): let them see every key, then zero them; the
                # where gives them zero gradient, so no NaN reaches q, k or v.
                allowed |= ~nonempty  # the mask is ours: in place
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
                out = torch.where(nonempty, out, torch.zeros((), dtype=out.dtype, device=out.device))
    if return_lse:
        with torch.no_grad():
            _, lse = ref.attention(q, k, v, scale=scale, **masks)
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


# ---- public API ----
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    prefix_lens: Tensor | Sequence[int] | None = None,
    doc_ids: Tensor | None = None,
    kv_lens: Tensor | Sequence[int] | None = None,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    kv_doc_ids: Tensor | None = None,
    prefix_mask: Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention under the masks of ALGORITHMS.md; returns out (B, Hq, Sq, D) in q's dtype.

    q (B, Hq, Sq, D); k, v (B, Hkv, Sk, D) with Hq % Hkv == 0; head dim up to 256 (64 and 128 are the fast
    ones on a GPU). Query i attends key j when j < kv_lens[b], doc_ids[b, i] == doc_ids[b, j], and (causal only)
    j <= i or j < prefix_lens[b], and (with a window (left, right)) i - left <= j <= i + right, None meaning that
    side unbounded (causal with (w - 1, None): each query sees itself and the w - 1 keys before it). causal needs
    Sq == Sk; so do doc_ids alone and a window. kv_doc_ids (B, Sk): packed cross attention (a packed T5's
    decoder over its packed encoder, FlashAttention's cu_seqlens_q / cu_seqlens_k): doc_ids are then the queries'
    documents (B, Sq) and query i attends key j when doc_ids[b, i] == kv_doc_ids[b, j]; a query whose document has
    no key gets zeros. prefix_mask (B, S) bool (integer: nonzero), with causal=True instead of prefix_lens: a prefix
    per token, t5x's `decoder_causal_attention`: query i attends key j when j <= i or both are flagged, so with
    doc_ids each packed document has its own prefix (flag each document's leading tokens). scale defaults to
    D ** -0.5. softcap c
    (Gemma 2's attention logit soft-capping): the scaled scores s become c * tanh(s / c) before the softmax; the
    torch backend then materialises the scores (SDPA has no cap).
    alibi_slopes: ALiBi, a float tensor (Hq,) or (B, Hq) (`alibi_slopes(Hq)` gives the paper's): the bias
    -slope * |i + Sk - Sq - j| is added to the (capped) scores, FlashAttention's definition (|i - j| when Sq ==
    Sk). Sq and Sk are the tensors' lengths, padding included: in cross attention with kv_lens the last query
    faces the last padded key (as FlashAttention's flash_attn_func; its varlen form aligns to the real key count),
    so there padding is not transparent. No gradient for the slopes. Values are checked (a device-side assert on
    a GPU). The torch backend then materialises the scores.
    dropout_p: attention dropout probability in [0, 1) (as SDPA's; apply it in training only: the module form
    does). Weight (b, h, i, j) is dropped when its Philox draw says so (`reference.attention.dropout_keep`), kept
    weights are scaled by 1 / (1 - dropout_p). The draws come from `seed` (int in [0, 2^63) or int64 tensor),
    or one draw of `generator`, or else of the device's default generator: no host synchronisation (but a draw of a
    generator on another device than q's is copied over). seed and generator are checked even when dropout_p is 0.
    The same seed gives the same dropped weights on every backend; the torch backend then materialises the scores.
    Rows with no allowed key output zeros with zero gradient (SDPA returns NaN there).
    return_lse: also the log-sum-exp of each row's scaled (capped, biased) scores (B, Hq, Sq), float32 (float64 for
    float64 inputs), detached; -inf on empty rows (the torch backend computes it in a second pass that materialises the
    scores).
    deterministic: bitwise-repeatable gradients. The Triton backward always is (no atomics: dK/dV and dQ come
    from separate kernels); the torch backend on a GPU then computes plainly instead of through SDPA, whose
    memory-efficient backward accumulates dQ with atomics. On the CPU both always are.
    Under autocast q, k and v are cast to the autocast dtype first (float64 excepted), as SDPA's are.
    """
    if isinstance(q, Tensor):  # like SDPA under autocast
        q, k, v = autocast_inputs(q.device.type, q, k, v)
    _check_qkv(q, k, v)
    prefix_lens, doc_ids, kv_lens, kv_doc_ids = _check_masks(q, k, causal, prefix_lens, doc_ids, kv_lens,
                                                             kv_doc_ids)
    prefix_mask = _check_prefix_mask(q, causal, prefix_lens, prefix_mask)
    window = _check_window(window, q.shape[2], k.shape[2])
    _check_scale(scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    _check_softcap(softcap, scale)
    _check_dropout(dropout_p)
    slopes = _check_alibi(alibi_slopes, q, k.shape[2])
    for name, flag in (("return_lse", return_lse), ("deterministic", deterministic)):
        check_flag(name, flag)
    name = _resolve(backend, q)
    check_seed(seed, generator)  # whatever dropout_p is: a bad seed must not wait for the first p > 0
    seed_t = _dropout_seed(seed, generator, q.device) if dropout_p > 0 else None
    for doc_name, ids in (("doc_ids", doc_ids), ("kv_doc_ids", kv_doc_ids)):
        if name == "triton" and ids is not None and ids.dtype == torch.int64:
            _check_range(doc_name, ids, 2**31 - 1, "the triton kernels compare ids as int32", low=-(2**31))
    if name == "torch":
        out, lse = _torch_attention(q, k, v, causal, prefix_lens, doc_ids, kv_lens, window, float(scale),
                                    None if softcap is None else float(softcap), return_lse,
                                    plain=deterministic and q.is_cuda, dropout_p=float(dropout_p), seed=seed_t,
                                    alibi_slopes=slopes, kv_doc_ids=kv_doc_ids, prefix_mask=prefix_mask)
    else:
        left, right = (-1 if w is None else w for w in (window or (None, None)))  # -1: unbounded
        prefix = prefix_lens if prefix_mask is None else prefix_mask  # the op takes (B,) lengths or (B, S) flags
        out, lse = torch.ops.lmobj.attn_fwd_triton(q, k, v, prefix, doc_ids, kv_lens, causal, left, right,
                                                   float(scale), 0.0 if softcap is None else float(softcap),
                                                   float(dropout_p), seed_t,
                                                   None if slopes is None else slopes.float().contiguous(),
                                                   kv_doc_ids)
    if return_lse:
        return out, lse.detach()
    return out


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | Sequence[int],
    cu_seqlens_k: Tensor | Sequence[int] | None = None,
    *,
    causal: bool = False,
    prefix_mask: Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """`attention` in FlashAttention's varlen layout (`flash_attn_varlen_func`): the sequences of a batch
    concatenated, q (total_q, Hq, D), k and v (total_k, Hkv, D), sequence s holding rows cu_seqlens[s] to
    cu_seqlens[s + 1] - 1. Returns out (total_q, Hq, D) (contiguous, as FlashAttention's), and with return_lse
    the lse (Hq, total_q) too, FlashAttention's varlen layout of it.

    cu_seqlens_q: (n + 1,) ints from 0, non-decreasing (a tensor, or a list taken as a CPU tensor). cu_seqlens_k:
    the keys' own boundaries (cross attention: sequence s's queries attend its keys only); None is self-attention
    (k and v have q's rows). causal and a window need self-attention: a cu_seqlens_k given with them must equal
    cu_seqlens_q (checked on the CPU; a device-side assert on a GPU). Rows past the last boundary are not a
    sequence: their queries get zeros and their keys are never read. The options are `attention`'s (None for no
    window side, no softcap, the default scale: not FlashAttention's -1 and 0.0). alibi_slopes (Hq,) only, and
    with self-attention only (FlashAttention aligns each sequence's bias to its own lengths, which for cross
    attention `attention` does not). prefix_mask (total,) bool with causal=True: each sequence's prefix tokens
    (`attention`'s prefix_mask: a packed prefix LM).

    It runs `attention` on the (1, Hq, total, D) view of the rows, the sequences told apart by their doc ids, so
    the Triton kernel skips the blocks between sequences as it does for packed documents; the one copy is the
    output's, into this layout."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be (total, heads, head_dim) (FlashAttention's varlen layout), got shape "
                             f"{tuple(t.shape)}")
    cu_q = _cu_tensor("cu_seqlens_q", cu_seqlens_q, q.device)
    self_attn = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q
    cu_k = cu_q if self_attn else _cu_tensor("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's shape {tuple(cu_q.shape)} (one boundary per "
                         f"sequence), got {tuple(cu_k.shape)}")
    if self_attn and k.shape[0] != q.shape[0]:
        raise ValueError(f"without cu_seqlens_k, k must have q's {q.shape[0]} rows (self-attention), got "
                         f"{k.shape[0]}: pass cu_seqlens_k for cross attention")
    needs_self = [n for n, on in (("causal", causal is True), ("window", window is not None),
                                  ("alibi_slopes", alibi_slopes is not None)) if on]
    if needs_self and not self_attn:
        same = cu_k.to(torch.int64) == cu_q.to(torch.int64)
        if cu_q.is_cuda or torch.compiler.is_compiling():
            torch._assert_async(same.all(), f"{needs_self[0]} needs cu_seqlens_k equal to cu_seqlens_q")
        elif not bool(same.all()):
            raise ValueError(f"{needs_self[0]} needs self-attention: cu_seqlens_k must equal cu_seqlens_q (or be None)")
        self_attn = k.shape[0] == q.shape[0]
    if alibi_slopes is not None and (not self_attn or not isinstance(alibi_slopes, Tensor) or alibi_slopes.dim() != 1):
        raise ValueError("attention_varlen takes alibi_slopes (Hq,) with self-attention only (FlashAttention aligns a "
                         "cross sequence's bias to its own lengths; use attention() per sequence there)")
    to_bhsd = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731  (1, H, total, D), a view
    docs = _varlen_doc_ids("cu_seqlens_q", cu_q, q.shape[0], "q")
    kv_docs = None if self_attn else _varlen_doc_ids("cu_seqlens_k", cu_k, k.shape[0], "k")
    if prefix_mask is not None:
        if _is_seq(prefix_mask):
            prefix_mask = torch.as_tensor(prefix_mask, device=q.device)
        if isinstance(prefix_mask, Tensor) and tuple(prefix_mask.shape) != (q.shape[0],):
            raise ValueError(f"prefix_mask must be (total_q,) = ({q.shape[0]},) in the varlen layout, got shape "
                             f"{tuple(prefix_mask.shape)}")
        prefix_mask = prefix_mask[None] if isinstance(prefix_mask, Tensor) else prefix_mask  # attention() checks
    res = attention(to_bhsd(q), to_bhsd(k), to_bhsd(v), causal=causal, doc_ids=docs, kv_doc_ids=kv_docs,
                    prefix_mask=prefix_mask,
                    kv_lens=cu_k[-1:], window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                    dropout_p=dropout_p, seed=seed, generator=generator, return_lse=return_lse,
                    deterministic=deterministic, backend=backend)
    out, lse = res if return_lse else (res, None)
    out = out[0].transpose(0, 1).contiguous()
    return (out, lse[0]) if return_lse else out


def _varlen_doc_ids(name: str, cu: Tensor, rows: int, t: str) -> Tensor:
    """(1, rows) doc ids of one varlen tensor's boundaries, checked under the caller's name for them."""
    cu = cu[None].to(torch.int64)
    _check_cu(name, cu, rows, f"{t}'s {rows} rows")
    return _cu_doc_ids(cu, rows)


def _cu_tensor(name: str, cu, device) -> Tensor:
    """cu_seqlens as a 1-D integer tensor on q's device (a list becomes one)."""
    if _is_seq(cu):
        if not all(is_int(x) for x in cu):
            raise TypeError(f"{name} must be an integer tensor or a list of ints, got {cu!r}"[:200])
        cu = torch.tensor(list(cu), dtype=torch.int64, device=device)
    if not isinstance(cu, Tensor) or cu.dtype not in _INTS:
        raise TypeError(f"{name} must be an integer tensor (or a list of ints)")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be (n + 1,), the boundaries of n sequences, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    return cu


def _plain_int(v):
    """A NumPy integer or a 0-d integer tensor as a Python int (anything else as it is, for the checks)."""
    if isinstance(v, np.integer) or (isinstance(v, Tensor) and v.dim() == 0 and v.dtype in _INTS):
        return int(v)
    return v


def doc_ids_from_cu_seqlens(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """Doc ids (B, seq_len) from cumulative document lengths, as FlashAttention's varlen API takes them.

    cu_seqlens: (n + 1,) for one packed row, or (B, n + 1) per row (pad a row's tail by repeating its last value),
    starting at 0 and non-decreasing; a tensor, or a list of ints (of lists of ints), taken as a CPU tensor.
    Position t belongs to document d when cu[d] <= t < cu[d + 1]; positions past the last boundary (padding) get
    id n, a document of their own (combine with kv_lens to mask them out). Returns int32 of shape (1, seq_len) for
    a 1-D input, (B, seq_len) otherwise, on cu_seqlens' device. On the CPU the values are checked (non-decreasing,
    from 0, ending at seq_len or before); a CUDA tensor is taken as it is, without a host synchronisation."""
    if _is_seq(cu_seqlens):
        rows = [list(r) if _is_seq(r) else r for r in cu_seqlens]
        flat = [v for r in rows for v in (r if isinstance(r, list) else [r])]
        if not all(is_int(v) for v in flat) or len({isinstance(r, list) for r in rows}) > 1:
            raise TypeError(f"cu_seqlens must be a tensor or a list of ints (or of lists of ints), got {cu_seqlens!r}"
                            [:200])
        if len({len(r) for r in rows if isinstance(r, list)}) > 1:
            raise ValueError("cu_seqlens' rows must have one length (pad a row by repeating its last value)")
        if not all(fits_int64(v) for v in flat):
            raise ValueError("cu_seqlens holds an int past int64")
        cu_seqlens = torch.tensor(rows, dtype=torch.int64)
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in _INTS:
        raise TypeError("cu_seqlens must be an integer tensor (or a list of ints)")
    if cu_seqlens.dim() not in (1, 2) or cu_seqlens.shape[-1] < 1:
        raise ValueError(f"cu_seqlens must be (n + 1,) or (B, n + 1), got shape {tuple(cu_seqlens.shape)}")
    seq_len = _plain_int(seq_len)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool):
        raise TypeError(f"seq_len must be an int, got {type(seq_len).__name__} {seq_len!r}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    cu = cu_seqlens.reshape(-1, cu_seqlens.shape[-1]).to(torch.int64)
    # documents that claim more tokens than the row has: the wrong seq_len?
    _check_cu("cu_seqlens", cu, seq_len, f"seq_len={seq_len}: its documents hold more tokens than a row")
    return _cu_doc_ids(cu, seq_len)


def _check_cu(name: str, cu: Tensor, seq_len: int, past: str) -> None:
    """cu (B, n + 1) int64 boundaries from 0, non-decreasing, ending at seq_len or before. Read on the CPU only: a
    CUDA tensor is taken as it is (no host synchronisation)."""
    if cu.is_cuda or torch.compiler.is_compiling() or not cu.numel():
        return
    if bool((cu[:, 0] != 0).any()) or bool((cu[:, 1:] < cu[:, :-1]).any()):
        raise ValueError(f"{name} must start at 0 and be non-decreasing (the first document starts at position 0), "
                         f"got {cu.tolist()}"[:240])
    if bool((cu[:, -1] > seq_len).any()):
        raise ValueError(f"{name} ends at {int(cu[:, -1].max())}, past {past}")


def _cu_doc_ids(cu: Tensor, seq_len: int) -> Tensor:
    """(B, seq_len) int32 doc ids of checked boundaries cu (B, n + 1) int64."""
    pos = torch.arange(seq_len, device=cu.device).expand(cu.shape[0], seq_len).contiguous()
    return torch.searchsorted(cu[:, 1:].contiguous(), pos, right=True).to(torch.int32)


def doc_ids_from_eos(tokens: Tensor, eos_id: int) -> Tensor:
    """Doc ids (B, S) int32 of packed rows whose documents each end with an `eos_id` token: the EOS belongs to the
    document it ends, the next token starts a new one."""
    if not isinstance(tokens, Tensor) or tokens.dtype not in _INTS:
        raise TypeError("tokens must be an integer tensor")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, S), got shape {tuple(tokens.shape)}")
    eos_id = _plain_int(eos_id)
    if not isinstance(eos_id, int) or isinstance(eos_id, bool):
        raise TypeError(f"eos_id must be an int, got {type(eos_id).__name__}")
    info = torch.iinfo(tokens.dtype)
    if not info.min <= eos_id <= info.max:  # a uint8 row compared with 300 would wrap it to 44
        raise ValueError(f"eos_id {eos_id} cannot occur in {tokens.dtype} tokens")
    is_eos = (tokens == eos_id).to(torch.int32)
    return (torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos).to(torch.int32)


def doc_ids_from_position_ids(position_ids: Tensor) -> Tensor:
    """Doc ids (B, S) int32 of packed rows from their position ids, which restart at 0 where a document starts (what
    Hugging Face's `DataCollatorWithFlattening` yields, and how its FlashAttention path finds the documents); a
    row's first token starts a document whatever its position. (S,) is taken as one row."""
    if not isinstance(position_ids, Tensor) or position_ids.dtype not in _INTS:
        raise TypeError("position_ids must be an integer tensor")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (B, S) or (S,), got shape {tuple(position_ids.shape)}")
    starts = (position_ids == 0).to(torch.int32)
    starts[:, :1] = 1
    return (torch.cumsum(starts, dim=1, dtype=torch.int32) - 1).to(torch.int32)


def _document_prefixes(docs: Tensor, num: Tensor, den: int) -> Tensor:
    """(B, S) bool prefix flags (attention's prefix_mask): the first num[b] / den of each document's tokens, rounded
    up (documents: runs of equal doc ids); device ops, no host sync. The trainer's packed prefix LM, the verify rows
    and the benchmark build their per-document prefixes with it."""
    S = docs.shape[1]
    pos = torch.arange(S, device=docs.device).expand_as(docs)
    first = torch.ones_like(docs, dtype=torch.bool)
    first[:, 1:] = docs[:, 1:] != docs[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.cummax(torch.where(first, pos, 0), dim=1).values
    end = torch.flip(torch.cummin(torch.flip(torch.where(last, pos, S), [1]), dim=1).values, [1]) + 1
    return (pos - start) * den < num.to(docs.device)[:, None] * (end - start)


class MaskedAttention(nn.Module):
    """Module form of `attention`: options fixed at construction (causal, window, scale, softcap, ALiBi slopes,
    dropout, deterministic, backend), per-batch masks at call time: forward(q, k, v, prefix_lens=None, doc_ids=None,
    kv_lens=None, kv_doc_ids=None, prefix_mask=None). dropout applies in training mode only (as nn.Dropout), each
    call with a fresh seed from the device's default generator (so torch.manual_seed makes a run repeatable).
    alibi_slopes: a float tensor (H,), or True for the paper's slopes of `n_heads` heads, kept as a float32 buffer
    (it moves with .to(), stays float32 when the module is cast to bfloat16 or float16, is saved in the state dict,
    and is not trained)."""

    def __init__(self, *, causal: bool = False, window: tuple[int | None, int | None] | None = None,
                 scale: float | None = None, softcap: float | None = None, alibi_slopes: Tensor | bool | None = None,
                 n_heads: int | None = None, dropout: float = 0.0, deterministic: bool = False,
                 backend: str = "auto"):
        super().__init__()
        # checked here, not in the first forward (deep in a model's first step); scale None is D ** -0.5 <= 1
        for flag_name, flag in (("causal", causal), ("deterministic", deterministic)):
            check_flag(flag_name, flag)
        check_backend_name(backend)
        _check_scale(scale)
        _check_softcap(softcap, 1.0 if scale is None else scale)
        _check_dropout(dropout, "dropout")
        self.causal, self.window, self.scale, self.softcap = causal, _window_bounds(window), scale, softcap
        self.dropout = float(dropout)
        self.deterministic, self.backend = deterministic, backend
        if n_heads is not None:  # checked even without ALiBi, so a config that always passes it fails early if wrong
            _check_heads(n_heads)
        if alibi_slopes is True:
            if n_heads is None:
                raise ValueError("alibi_slopes=True needs n_heads (the paper's slopes depend on the head count)")
            alibi_slopes = _paper_slopes(n_heads)
        elif alibi_slopes is False:
            alibi_slopes = None
        if alibi_slopes is not None:
            _check_slopes_tensor(alibi_slopes, "True, None or a float tensor of shape (n_heads,)")
            if alibi_slopes.dim() != 1:
                raise ValueError(f"alibi_slopes must have shape (n_heads,), got {tuple(alibi_slopes.shape)}")
            if n_heads is not None and alibi_slopes.shape[0] != _check_heads(n_heads):
                raise ValueError(f"alibi_slopes has {alibi_slopes.shape[0]} slopes for n_heads {n_heads}")
            alibi_slopes = alibi_slopes.to(torch.float32, copy=True)
        self.register_buffer("alibi_slopes", alibi_slopes)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would round the slopes (bfloat16: a bias ~3 logits off at distance 2k for 112 heads);
        # FlashAttention takes float32 slopes too. Moves between devices go through.
        slopes = self.alibi_slopes
        out = super()._apply(fn, recurse)
        if slopes is not None and self.alibi_slopes.dtype != torch.float32:
            self.alibi_slopes = slopes.to(self.alibi_slopes.device)
        return out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, prefix_lens=None, doc_ids=None, kv_lens=None,
                kv_doc_ids=None, prefix_mask=None) -> Tensor:
        return attention(q, k, v, causal=self.causal, prefix_lens=prefix_lens, doc_ids=doc_ids, kv_lens=kv_lens,
                         kv_doc_ids=kv_doc_ids, prefix_mask=prefix_mask,
                         window=self.window, scale=self.scale, softcap=self.softcap, alibi_slopes=self.alibi_slopes,
                         dropout_p=self.dropout if self.training else 0.0, deterministic=self.deterministic,
                         backend=self.backend)

    def extra_repr(self) -> str:
        w = "" if self.window is None else f", window={tuple(self.window)}"
        c = "" if self.softcap is None else f", softcap={self.softcap}"
        d = f", dropout={self.dropout}" if self.dropout else ""
        a = "" if self.alibi_slopes is None else f", alibi_slopes=({self.alibi_slopes.shape[0]},)"
        det = ", deterministic=True" if self.deterministic else ""
        return f"causal={self.causal}{w}, scale={self.scale}{c}{a}{d}{det}, backend={self.backend!r}"
