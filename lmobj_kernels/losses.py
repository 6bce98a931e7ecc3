"""Fused cross-entropy losses for causal LM, masked LM and seq2seq (ALGORITHMS.md, "Cross-entropy family").

Every function checks its arguments, picks a backend (`backend=` or LMOBJ_BACKEND, else the fastest measured),
and runs forward and backward as separate ops. Reductions: "none" (per row, 0 at ignored rows), "sum", "mean"
(over non-ignored rows). Unlike `F.cross_entropy`, "mean" over a batch whose every target is ignored is 0 with a
zero gradient, not NaN. The returned lse (`return_lse=True`) is detached: it carries no gradient.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

from lmobj_kernels import _loss_ops
from lmobj_kernels._backend import check_backend_name, resolve
from lmobj_kernels._checks import (
    FLOAT32_MAX,
    FLOAT32_TINY,
    INT64_MAX,
    autocast_inputs,
    check_flag,
    fits_int64,
    is_int,
    is_real,
)
from lmobj_kernels.reference import losses as ref

_REDUCTIONS = ("none", "sum", "mean")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---- argument checks: ValueError / TypeError naming the argument ----
def _check_ignore_index(ignore_index) -> None:
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not fits_int64(ignore_index):
        raise ValueError(f"ignore_index must fit int64, got {ignore_index}")


def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size=None):
    _check_ignore_index(ignore_index)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not is_real(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    # finite in float32, where the kernels compute (a cap of 1e39 is inf there, and inf * tanh(0) NaN)
    if not is_real(z_loss) or not 0.0 <= z_loss <= FLOAT32_MAX:
        raise ValueError(f"z_loss must be a float >= 0, finite in float32, got {z_loss!r}")
    if softcap is not None and (not is_real(softcap) or not FLOAT32_TINY <= softcap <= FLOAT32_MAX):
        raise ValueError(f"softcap must be None or a float > 0, a normal float32 (1.2e-38 to 3.4e38), got "
                         f"{softcap!r}")
    if chunk_size is not None and (not is_int(chunk_size) or not 1 <= chunk_size <= INT64_MAX):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def _check_hidden_scale(hidden_scale) -> None:
    if hidden_scale is not None and (not is_real(hidden_scale) or not abs(hidden_scale) <= FLOAT32_MAX):
        raise ValueError(f"hidden_scale must be a float finite in float32, got {hidden_scale!r}")


def _check_max_predictions(max_predictions) -> None:
    if max_predictions is not None and (not is_int(max_predictions) or max_predictions < 1):
        raise ValueError(f"max_predictions must be a positive int, got {max_predictions!r}")


def _check_tensor(name: str, t, dtypes=_FLOATS):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes and t.dtype != torch.float64:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_target(name: str, target, shape, device):
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must hold integer class ids (int64), got {target.dtype}")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"{name} is on {target.device} but the inputs are on {device}")


def _check_target_range(name: str, target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Targets outside [0, V) (other than ignore_index) are an error. On the CPU this reads the values; on a GPU
    (or while compiling) it is a device-side assert, so no host synchronisation. The kernels never read out of
    bounds either way: they write NaN for such a row."""
    ok = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
    if target.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok.all(), f"{name} holds a class id outside [0, {num_classes}) that is not ignore_index")
    elif not bool(ok.all()):
        bad = target[~ok][0].item()
        raise ValueError(f"{name} holds class id {bad}, outside [0, {num_classes}) and not ignore_index={ignore_index}")


def _reduce(rows: Tensor, count: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / count.clamp(min=1).to(total.dtype)


def _float_or_float64_backend(backend: str, *tensors: Tensor) -> str:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        if backend not in ("auto", "torch"):
            raise TypeError(f"float64 inputs run only on the torch backend, not {backend!r}")
        return "torch"
    return backend


# ---- cross-entropy over given logits ----
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Drop-in for `F.cross_entropy` on (N, V) or (B, S, V) logits with class-index targets of shape
    `logits.shape[:-1]`: the classes are the last dimension (F.cross_entropy's (N, V, d...) layout is
    `logits.movedim(1, -1)` here).

    loss_row = (1-e)(lse - z_y) + e(lse - mean z) + a lse^2 after an optional soft cap z <- c tanh(z/c)
    (e = label_smoothing, a = z_loss, c = softcap). Accumulates in float32; the gradient has the logits' dtype.
    With `return_lse`, also returns the per-row log-sum-exp (float32, detached), shaped like `target`.
    """
    _check_tensor("logits", logits)
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    ignore_index = int(ignore_index)  # a NumPy int too; the ops take Python ints
    check_flag("return_lse", return_lse)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, V) or (B, S, V), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one class (last dimension is 0)")
    if (logits.dim() >= 3 and isinstance(target, Tensor) and tuple(target.shape) != tuple(logits.shape[:-1])
            and tuple(target.shape) == (logits.shape[0], *logits.shape[2:])):
        raise ValueError(f"logits of shape {tuple(logits.shape)} with target {tuple(target.shape)} look like "
                         "F.cross_entropy's (N, V, d...) layout; here the classes are the last dimension: pass "
                         "logits.movedim(1, -1)")
    _check_target("target", target, logits.shape[:-1], logits.device)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    tgt = target.reshape(-1).to(torch.int64)
    _check_target_range("target", tgt, V, ignore_index)
    name = resolve(_float_or_float64_backend(backend, logits), logits.device, "cross_entropy")
    if name == "torch":
        rows, lse = ref.cross_entropy_rows(flat, tgt, ignore_index, label_smoothing, z_loss, softcap)
    else:
        if flat.stride(-1) != 1 or flat.stride(0) < V:  # the kernels read rows stride(0) apart: no overlap
            flat = flat.contiguous()
        fwd = _loss_ops.row_ops(name)[0]
        rows, lse = fwd(flat, tgt.contiguous(), 0, 0, ignore_index, float(label_smoothing), float(z_loss),
                        float(softcap or 0.0))
    loss = _reduce(rows, (tgt != ignore_index).sum(), reduction)
    if reduction == "none":
        loss = loss.reshape(target.shape).to(logits.dtype if logits.dtype == torch.float64 else torch.float32)
    if return_lse:
        return loss, lse.detach().reshape(target.shape)
    return loss


# ---- linear + cross-entropy without materialising the logits ----
# Bytes of logits one chunk may hold. Each chunk's dW update reads and writes the whole float32 (V, D) accumulator
# (a matmul with K = rows of the chunk), so very small chunks are bound by that traffic; 1 GiB runs Llama-3's head
# at 8192 tokens in 2 chunks on a GPU. On the CPU memory depends on MKL too: its sgemm allocates a hidden buffer of
# ~M x V floats for M <= 96 rows and a fixed 31 MB for M >= 192, none in between (measured with MKL_DISABLE_FAST_MM=1
# and per-call RSS high-water marks; with MKL's default buffer cache those buffers stay resident). `_default_chunk`
# makes the chunks equal so the last one is not a small one, and on the CPU a multiple of 16 rows: the C++ kernels
# take each chunk's logits as the (V, rows) product W @ h^T (`_loss_ops._chunks`), whose lines MKL writes ~15%
# faster 64-byte aligned (N=4096, D=768, V=50257, fp32, this 2-core machine: 114 rows 6.7 s, 112 rows 5.75 s,
# 96 rows 5.8 s). 20 MiB is 96 such rows there, 2 MB under PyTorch's chunked peak (112 rows is 1.6 MB over it).
# Smaller `chunk_size` trades time for memory.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 20 << 20}
CPU_CHUNK_ALIGN = 16


# low_memory=True: no float32 weight-gradient accumulator; the extra memory is bounded by these bytes: a logits chunk
# of at most this size (rows, for the loss, lse and dh), then blocks of vocabulary rows whose float32 logits for
# every token take a third of it (for dW, each block written once in the weight's dtype). The price is one more
# logits matmul (4 instead of 3).
LOW_MEMORY_BYTES = {"cuda": 96 << 20, "cpu": 16 << 20}


def _default_chunk(n: int, v: int, elt: int, device: torch.device, low_memory: bool = False, d: int = 0) -> int:
    """Rows per chunk: as many as fit CHUNK_BYTES (LOW_MEMORY_BYTES) of logits, 64 at least, then evened out over
    the chunks that takes (4000 rows at 114: chunks of 112 and a last one of 80, not of 114 and a last one of 10)
    unless that would go under 64 rows (115 rows stay 114 + 1, not 58 + 57: small chunks run slower matmuls). On
    the CPU, with more than one chunk, both are multiples of CPU_CHUNK_ALIGN rows (200 rows of GPT-2's vocabulary:
    96 fit, evened out to 67, rounded up to 80: chunks of 80, 80 and 40).

    bfloat16 on a GPU: all rows in one chunk when the whole logits cost no more memory than chunking would,
    since one chunk writes dW directly in the weight's dtype (`_loss_ops._direct_dw`) while several need a float32
    accumulator (4 V D bytes) and its copy. Llama-3's head at 8192 tokens: 2.10 GB logits + 1.05 GB dW against
    2.10 GB accumulator + a 1.07 GB chunk, so one chunk (and ~6 GB less memory traffic); Gemma-2's (V = 256000)
    stays chunked. d: the hidden width when that direct dW is computed (`_loss_ops._direct_dw`), else 0 (no grad,
    float16 or float32, the CPU: chunks stay small)."""
    table = LOW_MEMORY_BYTES if low_memory else CHUNK_BYTES
    budget = table.get(device.type, table["cpu"])
    rows = max(1, min(n, max(64, budget // max(1, v * elt))))
    align = CPU_CHUNK_ALIGN if device.type == "cpu" and rows < n else 1
    rows = max(align, rows // align * align)
    even = -(-n // -(-n // rows)) if n else rows
    even = min(rows, -(-even // align) * align)  # rounded up to the alignment, never past the budget's rows
    chunk = even if even >= min(64, rows) else rows
    if not low_memory and d > 0 and chunk < n:
        # against the chunk actually used (evening out can halve it), not the budget
        whole, dw = n * v * elt, v * d * elt
        if whole + dw <= 4 * v * d + max(chunk * v * elt, dw):
            return n
    return chunk


def _vocab_block(n: int, v: int, device: torch.device) -> int:
    """Vocabulary rows per dW block of low_memory=True: float32 logits of every token in a third of the budget,
    a multiple of 128 (aligned GEMM operands) when there is room."""
    budget = LOW_MEMORY_BYTES.get(device.type, LOW_MEMORY_BYTES["cpu"]) // 3
    cols = budget // max(1, 4 * n)
    cols = cols // 128 * 128 if cols >= 128 else max(16, cols)
    return max(1, min(v, cols))


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    shift: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    low_memory: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of z = hidden @ weight.T (+ bias) without materialising the (N, V) logits.

    hidden: (..., D); weight: (V, D) (the LM head / tied embedding); target: hidden.shape[:-1].
    shift=True scores position t against target t+1 along the second-to-last axis of hidden (causal LM; the last
    position of each sequence is ignored) without copying the labels. The rows run in chunks of `chunk_size`
    (default: a logits chunk of at most 1 GiB on a GPU, 20 MiB on the CPU: CHUNK_BYTES), which bounds the extra
    memory: the chunk's logits plus a float32 accumulator for the weight gradient. With a scalar reduction
    the gradients are computed during the forward (no second pass over the logits) and scaled in backward.
    low_memory=True drops the accumulator and bounds the extra memory to about 96 MiB on a GPU (16 MiB on the CPU;
    `LOW_MEMORY_BYTES`): the weight gradient is computed by blocks of the vocabulary from recomputed logits, each
    block written once in the weight's dtype; it costs one more logits matmul (about 4/3 of the time).
    """
    return _linear_ce(hidden, weight, target, "target", bias, shift, ignore_index, reduction, label_smoothing, z_loss,
                      softcap, chunk_size, low_memory, return_lse, backend)


def _linear_ce(hidden, weight, target, target_name, bias, shift, ignore_index, reduction, label_smoothing, z_loss,
               softcap, chunk_size, low_memory, return_lse, backend, rows_bound=None):
    """`linear_cross_entropy`, its errors naming the targets `target_name` (the user's argument: `labels` for the
    LM losses). rows_bound: the row count the chunk sizes are chosen for when the true one is data-dependent
    (masked_lm_loss under torch.compile: choosing from it would guard on the data)."""
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size)
    ignore_index, chunk_size = int(ignore_index), None if chunk_size is None else int(chunk_size)
    for flag, value in (("low_memory", low_memory), ("shift", shift), ("return_lse", return_lse)):
        check_flag(flag, value)
    if hidden.dim() < 1 or (shift and hidden.dim() < 2):
        raise ValueError(f"hidden must be (..., D){' with a sequence axis for shift=True' if shift else ''}, "
                         f"got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, D), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has width {weight.shape[1]} but hidden has D = {hidden.shape[-1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V = 0)")
    if weight.shape[1] == 0:
        raise ValueError("hidden and weight must have a width D >= 1, got D = 0")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.device != hidden.device:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) on {hidden.device}")
    hidden, weight, bias = autocast_inputs(hidden.device.type, hidden, weight, bias)  # like F.linear
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden, weight and bias must share one dtype, got {hidden.dtype}, {weight.dtype}"
                        f"{', ' + str(bias.dtype) if bias is not None else ''}")
    _check_target(target_name, target, hidden.shape[:-1], hidden.device)
    V, D = weight.shape
    seq = hidden.shape[-2] if shift else 0
    h = hidden.reshape(-1, D)
    t64 = target.to(torch.int64)  # compared in its own dtype, a uint8 target would see ignore_index -100 as 156
    tgt = t64.reshape(-1).contiguous()
    _check_target_range(target_name, tgt, V, ignore_index)
    count = ((t64[..., 1:] if shift else t64) != ignore_index).sum()
    name = resolve(_float_or_float64_backend(backend, hidden, weight), hidden.device, "linear_cross_entropy")
    cap = float(softcap or 0.0)
    if name == "torch":
        t = ref.shift_targets(t64, ignore_index).reshape(-1) if shift else tgt
        rows, lse = ref.linear_cross_entropy_rows(h, weight, t, bias, ignore_index, label_smoothing, z_loss, softcap)
        loss = _reduce(rows, count, reduction)
    else:
        h = h.contiguous()
        # one chunk pays off only when it writes dW directly (`_loss_ops._chunks`); else it costs memory
        direct = torch.is_grad_enabled() and weight.requires_grad and _loss_ops._direct_dw(weight.dtype, h.device)
        n_policy = h.shape[0] if rows_bound is None else rows_bound
        chunk = chunk_size or _default_chunk(n_policy, V, h.element_size(), h.device, low_memory,
                                             D if direct else 0)
        vocab_block = _vocab_block(n_policy, V, h.device) if low_memory else 0
        args = (seq, ignore_index, float(label_smoothing), float(z_loss), cap, chunk, vocab_block, name)
        if reduction == "none" or not torch.is_grad_enabled():
            rows, lse = _loss_ops.linear_ce_rows(h, weight, bias, tgt, *args)
            loss = _reduce(rows, count, reduction)
        else:
            need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
            total, lse, *_ = _loss_ops.linear_ce_sum(h, weight, bias, tgt, *args, *need)
            loss = total if reduction == "sum" else total / count.clamp(min=1).to(total.dtype)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if return_lse:
        return loss, lse.detach().reshape(target.shape)
    return loss


def _keyword_options(fn, drop=()) -> dict:
    """The keyword-only options of a functional form and their defaults."""
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in drop}


_LINEAR_OPTIONS = _keyword_options(linear_cross_entropy)


def _labels_loss(fn_name: str, hidden, weight, labels, shift: bool, kwargs: dict, rows_bound=None):
    """`linear_cross_entropy` for the LM losses: options as there (but shift), errors naming `labels`."""
    for k in kwargs:
        if k not in _LINEAR_OPTIONS or k == "shift":
            raise TypeError(f"{fn_name}() got an unexpected keyword argument {k!r}")
    return _linear_ce(hidden, weight, labels, "labels", **{**_LINEAR_OPTIONS, **kwargs, "shift": shift},
                      rows_bound=rows_bound)


def causal_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """Next-token loss of a decoder: hidden (B, S, D), labels (B, S) = the input ids (positions to skip set to
    ignore_index). Position t is scored against labels t+1; no label copy. Options as `linear_cross_entropy`."""
    return _labels_loss("causal_lm_loss", hidden, weight, labels, True, kwargs)


def seq2seq_lm_loss(decoder_hidden: Tensor, weight: Tensor, labels: Tensor, *, hidden_scale: float | None = None,
                    **kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """Decoder loss of an encoder-decoder (T5, BART): labels (B, T) are already the targets of each position.
    `hidden_scale` multiplies the decoder states first (T5 with tied embeddings uses d_model ** -0.5)."""
    _check_hidden_scale(hidden_scale)
    if hidden_scale is not None:
        _check_tensor("decoder_hidden", decoder_hidden)  # before the product, which would make integer states float
        decoder_hidden = decoder_hidden * hidden_scale
    return _labels_loss("seq2seq_lm_loss", decoder_hidden, weight, labels, False, kwargs)


def masked_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    max_predictions: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    **kwargs,
) -> Tensor:
    """MLM loss: only positions whose label is not ignore_index go through the LM head.

    hidden (B, S, D) or (N, D); labels hidden.shape[:-1]. The masked rows are gathered, scored with the fused
    linear cross-entropy, and their gradient scattered back (zeros elsewhere). Without `max_predictions` the
    number of masked rows is read once on the host; with it (per sequence, like BERT's max_predictions_per_seq,
    i.e. a total of B * max_predictions rows) shapes are static: no host sync, CUDA-graph and torch.compile
    friendly. More masked rows than that bound is an error (a device-side assert on a GPU). Compiled without
    it, the count is a data-dependent size of the graph and the chunks are sized for every position.
    reduction "none" returns a loss per position (0 where the label is ignored).
    """
    _check_tensor("hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (B, S, D) or (N, D), got shape {tuple(hidden.shape)}")
    if kwargs.get("return_lse"):
        raise ValueError("return_lse is not supported by masked_lm_loss (the lse exists at the masked positions only); "
                         "call linear_cross_entropy on the gathered rows for it")
    if "shift" in kwargs:  # the gathered rows are not a sequence: a shift would score them against each other
        raise TypeError("masked_lm_loss takes no shift: each label is the target of its own position")
    _check_target("labels", labels, hidden.shape[:-1], hidden.device)
    _check_ignore_index(ignore_index)
    ignore_index = int(ignore_index)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    D = hidden.shape[-1]
    flat_h = hidden.reshape(-1, D)
    flat_l = labels.reshape(-1).to(torch.int64)
    mask = flat_l != ignore_index
    if max_predictions is None:
        idx = mask.nonzero().squeeze(1)
        sel_labels = flat_l.index_select(0, idx)
    else:
        _check_max_predictions(max_predictions)
        max_predictions = int(max_predictions)
        rows_per_bound = math.prod(hidden.shape[:-2]) if hidden.dim() >= 3 else 1  # sequences
        size = min(flat_l.numel(), max_predictions * rows_per_bound)
        if torch.compiler.is_compiling() or hidden.is_cuda:
            torch._assert_async(mask.sum() <= size, "masked_lm_loss: more masked positions than max_predictions")
        elif int(mask.sum()) > size:
            raise ValueError(f"labels mark {int(mask.sum())} positions, more than max_predictions allows ({size})")
        idx = torch.nonzero_static(mask, size=size, fill_value=-1).squeeze(1)
        pad = idx < 0
        idx = idx.clamp(min=0)
        sel_labels = torch.where(pad, torch.full_like(idx, ignore_index), flat_l.index_select(0, idx))
    sel = flat_h.index_select(0, idx)
    # compiled without max_predictions, the row count is data-dependent: chunks are sized for every position
    bound = flat_l.numel() if max_predictions is None and torch.compiler.is_compiling() else None
    out = _labels_loss("masked_lm_loss", sel, weight, sel_labels, False,
                       dict(kwargs, bias=bias, ignore_index=ignore_index, reduction=reduction), bound)
    if reduction != "none":
        return out
    full = out.new_zeros(flat_l.numel()).index_add(0, idx, out)
    return full.reshape(labels.shape)


# ---- modules ----


def _check_module_options(options: dict) -> None:
    """The checks the functional form makes of its options, at construction rather than at the first forward."""
    _check_options(options["ignore_index"], options["reduction"], options["label_smoothing"], options["z_loss"],
                   options["softcap"], options.get("chunk_size"))
    for flag in ("low_memory", "return_lse"):
        if flag in options:
            check_flag(flag, options[flag])
    _check_hidden_scale(options.get("hidden_scale"))
    _check_max_predictions(options.get("max_predictions"))
    check_backend_name(options["backend"])


class _LossModule(nn.Module):
    """A functional form with its options fixed at construction: checked then, kept as attributes (as
    `torch.nn.CrossEntropyLoss` keeps `ignore_index`, `reduction`, ...) and shown by repr."""

    OPTIONS: dict = {}  # option -> default, per subclass

    def __init__(self, **options):
        super().__init__()
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; it takes "
                            f"{sorted(self.OPTIONS)}")
        merged = {**self.OPTIONS, **options}
        _check_module_options(merged)
        for k, v in merged.items():
            setattr(self, k, v)

    def _options(self) -> dict:
        return {k: getattr(self, k) for k in self.OPTIONS}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k, d in self.OPTIONS.items() if getattr(self, k) != d)


class CrossEntropyLoss(_LossModule):
    """Module form of `cross_entropy`: forward(logits, target)."""

    OPTIONS = _keyword_options(cross_entropy)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(logits, target, **self._options())


class LinearCrossEntropyLoss(_LossModule):
    """Module form of `linear_cross_entropy`: forward(hidden, weight, target, bias=None)."""

    fn = staticmethod(linear_cross_entropy)
    OPTIONS = _keyword_options(linear_cross_entropy, drop=("bias",))

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return type(self).fn(hidden, weight, target, bias=bias, **self._options())


class CausalLMLoss(LinearCrossEntropyLoss):
    """Module form of `causal_lm_loss`: forward(hidden, weight, labels, bias=None)."""

    fn = staticmethod(causal_lm_loss)
    OPTIONS = _keyword_options(linear_cross_entropy, drop=("bias", "shift"))


class Seq2SeqLMLoss(LinearCrossEntropyLoss):
    """Module form of `seq2seq_lm_loss`: forward(decoder_hidden, weight, labels, bias=None)."""

    fn = staticmethod(seq2seq_lm_loss)
    OPTIONS = {"hidden_scale": None, **_keyword_options(linear_cross_entropy, drop=("bias", "shift"))}


class MaskedLMLoss(LinearCrossEntropyLoss):
    """Module form of `masked_lm_loss`: forward(hidden, weight, labels, bias=None)."""

    fn = staticmethod(masked_lm_loss)
    OPTIONS = {"max_predictions": None,
               **_keyword_options(linear_cross_entropy, drop=("bias", "shift", "return_lse"))}
