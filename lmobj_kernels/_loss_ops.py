"""Op registration of the cross-entropy family (layers in the style of quack: ops -> autograd -> functional API).

- C++ ops `lmobj::ce_fwd / ce_bwd / ce_fwd_bwd_` (schemas in csrc/lmobj.cpp, CPU and CUDA kernels): fakes here.
- Triton ops `lmobj::ce_fwd_triton / ce_bwd_triton / ce_fwd_bwd_triton_`: torch.library custom ops over
  triton_kernels/cross_entropy.py.
- Chunked linear cross-entropy `lmobj::linear_ce_sum / linear_ce_rows / linear_ce_rows_bwd`: matmuls in chunks of
  rows with a row kernel of the chosen backend in between, so the (N, V) logits never exist at once.
Forward and backward are separate ops, every op has a fake, so torch.compile(fullgraph=True) traces through them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lmobj_kernels._backend import _C, triton_module
from lmobj_kernels.reference import losses as ref_losses

_C()  # loads the C++ schemas (TORCH_LIBRARY(lmobj)) before the fakes below refer to them


def _is_cols(logits: Tensor) -> bool:
    """The column layout of the CPU row kernels (`is_cols` in csrc/cpu/cross_entropy.cpp): a transposed view of a
    (V, N) buffer, in which `_chunks` computes its logits on the CPU."""
    return logits.numel() > 0 and logits.shape[1] > 1 and logits.stride(1) != 1


def _rows_fake(logits, *args):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


if _C() is not None:
    torch.library.register_fake("lmobj::ce_fwd")(_rows_fake)
    torch.library.register_fake("lmobj::ce_fwd_bwd_")(_rows_fake)

    @torch.library.register_fake("lmobj::ce_bwd")
    def _(grad_loss, logits, *args):
        if logits.device.type == "cpu" and _is_cols(logits):  # the CPU kernel answers in their column layout
            return logits.new_empty(logits.shape[::-1]).t()
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("lmobj::ce_grad_cols_")
    def _(block, *args):
        return None


# ---- Triton row ops ----
@torch.library.custom_op("lmobj::ce_fwd_triton", mutates_args=())
def ce_fwd_triton(logits: Tensor, target: Tensor, row_offset: int, shift_len: int, ignore_index: int,
                  label_smoothing: float, z_loss: float, softcap: float) -> tuple[Tensor, Tensor]:
    return triton_module("cross_entropy").ce_forward(logits, target, row_offset, shift_len, ignore_index,
                                                      label_smoothing, z_loss, softcap)


@torch.library.custom_op("lmobj::ce_fwd_bwd_triton_", mutates_args=("logits",))
def ce_fwd_bwd_triton_(logits: Tensor, target: Tensor, row_offset: int, shift_len: int, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float) -> tuple[Tensor, Tensor]:
    return triton_module("cross_entropy").ce_forward(logits, target, row_offset, shift_len, ignore_index,
                                                      label_smoothing, z_loss, softcap, grad_inplace=True)


@torch.library.custom_op("lmobj::ce_bwd_triton", mutates_args=())
def ce_bwd_triton(grad_loss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, row_offset: int, shift_len: int,
                  ignore_index: int, label_smoothing: float, z_loss: float, softcap: float) -> Tensor:
    return triton_module("cross_entropy").ce_backward(grad_loss, logits, target, lse, row_offset, shift_len,
                                                       ignore_index, label_smoothing, z_loss, softcap)


ce_fwd_triton.register_fake(_rows_fake)
ce_fwd_bwd_triton_.register_fake(_rows_fake)


@ce_bwd_triton.register_fake
def _(grad_loss, logits, *args):
    return logits.new_empty(logits.shape)


def row_ops(backend: str):
    """(forward, backward, fused forward + in-place gradient) row kernels of a backend."""
    if backend == "triton":
        return torch.ops.lmobj.ce_fwd_triton, torch.ops.lmobj.ce_bwd_triton, torch.ops.lmobj.ce_fwd_bwd_triton_
    return torch.ops.lmobj.ce_fwd, torch.ops.lmobj.ce_bwd, torch.ops.lmobj.ce_fwd_bwd_


# ---- first-order gradients only ----
class _NoSecondOrder(torch.autograd.Function):
    """The identity on a gradient, attached to the inputs it is the gradient of, whose own backward raises: a
    gradient penalty (differentiating a gradient, with create_graph=True) then fails loudly instead of getting
    zeros from a gradient the graph does not connect to its inputs (the fused losses have no second derivative)."""

    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_NO_SECOND_ORDER)


_NO_SECOND_ORDER = ("the fused losses of lmobj_kernels have no second derivative (double backward, e.g. a gradient "
                    "penalty or MAML through them); use backend='torch' for that")


def _first_order(grads: tuple, inputs: tuple) -> tuple:
    """grads as they are; under create_graph=True (grad mode on in backward), each wrapped in `_NoSecondOrder`."""
    if not torch.is_grad_enabled():
        return grads
    attach = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    return tuple(g if g is None else _NoSecondOrder.apply(g, *attach) for g in grads)


def _scale_(t: Tensor, g: Tensor) -> Tensor:
    """t *= g in place, the product in float32 for a low-precision t: a 0-dim float32 g on a GPU is cast to t's
    dtype by the elementwise kernel (only CPU scalars stay float32), and a bfloat16 1/count biases every gradient
    of the step by up to 2^-9. Chunks bound the float32 copy (64 MB)."""
    if t.dtype in (torch.float32, torch.float64):
        return t.mul_(g)
    flat = t.view(-1)
    for c in flat.split(1 << 24):
        c.copy_(c.float().mul_(g))
    return t


# ---- autograd of the row ops (cross_entropy over given logits) ----
def _ce_setup(ctx, inputs, output):
    logits, target, *opts = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.opts = opts


def _make_ce_backward(backend: str):
    def backward(ctx, grad_loss, grad_lse):  # lse is returned detached by the public API
        logits, target, lse = ctx.saved_tensors
        grad = row_ops(backend)[1](grad_loss.float().contiguous(), logits, target, lse, *ctx.opts)
        return _first_order((grad,), (logits,)) + (None,) * 7

    return backward


if _C() is not None:
    torch.library.register_autograd("lmobj::ce_fwd", _make_ce_backward("cpu"), setup_context=_ce_setup)
ce_fwd_triton.register_autograd(_make_ce_backward("triton"), setup_context=_ce_setup)


# ---- chunked linear cross-entropy ----
def _mm_f32_accumulate(acc: Tensor, a: Tensor, b: Tensor, beta: int = 1) -> None:
    """acc (float32) = beta * acc + a @ b; float32 accumulation across chunks whatever the dtype of a and b.
    beta=0 (the first chunk) writes without reading acc, which may then be uninitialised: the accumulator needs no
    zero fill and the first product no read of it (for a Llama-size head, two passes over a 2 GB buffer)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
    elif a.is_cuda and _addmm_out_dtype_works():
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)  # cuBLAS: low-precision in, float32 C
    elif a.is_cuda:
        acc.copy_(torch.mm(a, b)) if beta == 0 else acc.add_(torch.mm(a, b))
    else:  # CPU: no float32-output low-precision GEMM; a bf16 product per chunk would round every partial sum
        acc.addmm_(a.float(), b.float(), beta=beta)


@functools.cache
def _addmm_out_dtype_works() -> bool:
    """cuBLAS addmm with low-precision inputs and a float32 output, with beta=1 and with beta=0 (which must not
    read C: the probe's C holds NaN)."""
    try:
        x = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        acc = torch.zeros(2, 2, device="cuda")
        torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
        fresh = torch.full((2, 2), float("nan"), device="cuda")
        torch.addmm(fresh, x, x, beta=0, out_dtype=torch.float32, out=fresh)
        return bool(acc[0, 0] == 2) and bool((fresh == 2).all())
    except (RuntimeError, TypeError):
        return False


def _direct_dw(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a single chunk writes dW with one matmul in the weight's dtype: bfloat16 on a GPU, where cuBLAS
    accumulates in float32 and rounds once (plain PyTorch's own dW), with no float32 accumulator and no copy. On the
    CPU a low-precision matmul is emulated and slow, so the float32 path stays; float16 keeps float32 (`_chunks`).
    `losses.linear_cross_entropy` sizes its chunks by the same test."""
    return dtype == torch.bfloat16 and device.type == "cuda"


def _chunks(hidden, weight, bias, target, opts, chunk, backend, need, grad_rows=None, lse=None, vocab_block=0):
    """The loop shared by the linear ops. Modes: grad_rows None and need all False: forward only;
    grad_rows None and need: forward with in-place gradients for a sum of row losses (the fused path);
    grad_rows given: backward with per-row weights (recomputes each chunk's logits).
    vocab_block > 0 (low memory): dW is not accumulated over the row chunks but computed afterwards, block by block
    of `vocab_block` vocabulary rows, from logits recomputed for every token (`_dw_by_vocab_blocks`)."""
    n, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = need
    lean_dw = need_dw and vocab_block > 0
    need_dw = need_dw and not lean_dw
    fwd, bwd, fused = row_ops(backend)
    loss = hidden.new_empty(n, dtype=torch.float32) if grad_rows is None else None
    lse_out = hidden.new_empty(n, dtype=torch.float32) if grad_rows is None else None
    dh = hidden.new_empty((n, d)) if need_dh else hidden.new_empty(0)
    # float16 sums over rows of the loss-sum gradient overflow its range (65504) long before the mean's would:
    # in the sum op (grad_rows None) dW and db stay float32 until backward has scaled them (see linear_ce_sum)
    grad_dtype = torch.float32 if weight.dtype == torch.float16 and grad_rows is None else weight.dtype
    direct_dw = need_dw and 0 < n <= chunk and _direct_dw(weight.dtype, hidden.device)
    # Uninitialised when the first chunk writes it (beta=0 below); zeros when there is no row at all.
    dw32 = (weight.new_empty if n else weight.new_zeros)((v, d), dtype=torch.float32) if need_dw and not direct_dw \
        else None
    dw = None
    db32 = weight.new_zeros(v, dtype=torch.float32) if need_db else None
    grads = need_dh or need_dw or need_db  # in this pass (a low-memory dW only needs the rows' lse from it)
    # One logits buffer for every chunk: a fresh (chunk, V) allocation per chunk fragments the CPU heap (measured:
    # +50 MB of resident memory over 32 chunks of Llama-size rows) and costs an allocator round trip on the GPU.
    buf = hidden.new_empty(min(chunk, n) * v, dtype=torch.result_type(hidden, weight)) if n else None
    # The C++ CPU kernels take each chunk's logits in column layout, as the transpose of W @ h^T: MKL computes that
    # (V, rows) product ~1.5x faster than h @ W^T (rows, V) at ~100 rows a chunk, and dh as (W^T @ G^T)^T ~1.15x
    # faster than G @ W (N=4096, D=768, V=50257, float32, this 2-core machine); cuBLAS needs no such help.
    cols = backend == "cpu" and hidden.device.type == "cpu"
    dh_t = hidden.new_empty(d * min(chunk, n)) if cols and need_dh and n else None
    logits = g = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h = hidden[s:e]
        if cols:
            col_bias = None if bias is None else bias.unsqueeze(1)
            logits = _affine(weight, h.t(), col_bias, out=buf[: v * (e - s)].view(v, e - s)).t()
        else:
            logits = _affine(h, weight.t(), bias, out=buf[: (e - s) * v].view(e - s, v))
        if grad_rows is None:
            op = fused if grads else fwd
            loss[s:e], lse_out[s:e] = op(logits, target, s, *opts)
            g = logits  # now the gradient of the chunk's summed loss (fused), or unused
        else:
            g = bwd(grad_rows[s:e], logits, target, lse[s:e], s, *opts)
        if not grads:
            continue
        if need_dh and cols:
            dh_c = dh_t[: d * (e - s)].view(d, e - s)
            torch.mm(weight.t(), g.t(), out=dh_c)
            dh[s:e].copy_(dh_c.t())
        elif need_dh:
            torch.mm(g, weight, out=dh[s:e])
        if direct_dw:
            dw = torch.mm(g.t(), h)
        elif need_dw:
            _mm_f32_accumulate(dw32, g.t(), h, beta=0 if s == 0 else 1)
        if need_db:
            db32.add_(g.sum(0, dtype=torch.float32))
    del buf, logits, g, dh_t  # before the float32 -> weight-dtype copy of dW: the peak holds one of them, not both
    if lean_dw:
        rows_lse = lse_out if grad_rows is None else lse
        dw = _dw_by_vocab_blocks(hidden, weight, bias, target, opts, rows_lse, grad_rows, vocab_block, backend,
                                 grad_dtype)
    elif need_dw and not direct_dw:
        dw = dw32.to(grad_dtype)  # no copy when grad_dtype is float32
    elif not need_dw:
        dw = weight.new_empty(0)
    db = db32.to(grad_dtype) if need_db else weight.new_empty(0)
    return loss, lse_out, dh, dw, db


def _affine(a: Tensor, b: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """a @ b (+ bias, broadcast), into `out` when given: the logits product of every chunk and vocabulary block."""
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


def _row_targets(target: Tensor, n: int, shift_len: int, ignore_index: int) -> Tensor:
    """The target of each row as the kernels read it (row_target in csrc/common/cross_entropy_row.h): the
    reference's shift for causal LM (target holds whole sequences of shift_len, the op checks it)."""
    if shift_len <= 0:
        return target[:n]
    return ref_losses.shift_targets(target.view(-1, shift_len), ignore_index).reshape(-1)[:n]


def _dw_by_vocab_blocks(hidden, weight, bias, target, opts, lse, grad_rows, vocab_block, backend, out_dtype):
    """dW of sum_r w_r loss_r, one block of vocabulary rows at a time, each written once in out_dtype (the weight's,
    or float32 for a float16 sum, see `_chunks`; no accumulator across blocks): the block's logits are recomputed
    for every token, turned into their gradient with the row lse of the first pass (the same formula as the row
    kernels: ALGORITHMS.md, "Cross-entropy family"), and multiplied by the hidden states. w_r = grad_rows (per-row
    backward) or 1 (sum), 0 for ignored rows. The gradient of a block is one in-place kernel of the backend
    (`ce_grad_cols_`)."""
    shift_len, ignore_index, eps, zl, cap = opts
    n = hidden.shape[0]
    v = weight.shape[0]
    # contiguous (V, D) as the fake says, whatever the weight's strides (empty_like copies a transposed layout)
    dw = weight.new_empty(weight.shape, dtype=out_dtype)
    y = _row_targets(target, n, shift_len, ignore_index)
    valid = y != ignore_index
    w_rows = valid.to(torch.float32) if grad_rows is None else torch.where(valid, grad_rows.float(), 0.0)
    lse = lse.float().contiguous()  # finite for every row, ignored ones too (their weight is 0)
    y, w_rows = y.contiguous(), w_rows.contiguous()
    grad_cols = triton_module("cross_entropy").ce_grad_cols_ if backend == "triton" else torch.ops.lmobj.ce_grad_cols_
    for a in range(0, v, vocab_block):
        b = min(v, a + vocab_block)
        z = _affine(hidden, weight[a:b].t(), None if bias is None else bias[a:b])
        grad_cols(z, y, lse, w_rows, a, v, eps, zl, cap)
        if out_dtype == z.dtype:
            torch.mm(z.t(), hidden, out=dw[a:b])
        else:
            _mm_f32_accumulate(dw[a:b], z.t(), hidden, beta=0)
        del z
    return dw


@torch.library.custom_op("lmobj::linear_ce_sum", mutates_args=())
def linear_ce_sum(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, shift_len: int,
                  ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
                  vocab_block: int, backend: str, need_dh: bool, need_dw: bool, need_db: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sum of row losses (float32 scalar), lse per row, and the gradients of that sum (empty when not needed),
    computed in the same pass: each chunk's logits are turned into their gradient in place, then dh and dW
    (vocab_block > 0: dW afterwards, by vocabulary blocks). dW and db of a float16 weight are float32: the sum's
    gradient can pass float16's range where the loss's (the mean's) does not; backward scales, then casts."""
    opts = (shift_len, ignore_index, label_smoothing, z_loss, softcap)
    loss, lse, dh, dw, db = _chunks(hidden, weight, bias, target, opts, chunk_size, backend,
                                    (need_dh, need_dw, need_db and bias is not None), vocab_block=vocab_block)
    return loss.sum(), lse, dh, dw, db


@linear_ce_sum.register_fake
def _(hidden, weight, bias, target, shift_len, ignore_index, ls, zl, cap, chunk, vocab_block, backend, need_dh,
      need_dw, need_db):
    n, d = hidden.shape
    v = weight.shape[0]
    gdt = torch.float32 if weight.dtype == torch.float16 else weight.dtype
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty((n, d) if need_dh else (0,)),
            weight.new_empty((v, d), dtype=gdt) if need_dw else weight.new_empty(0),  # as the real one: unused
            weight.new_empty((v,), dtype=gdt) if need_db and bias is not None else weight.new_empty(0))


def _sum_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.w_dtype = inputs[1].dtype  # dW / db of a float16 weight come as float32 (see linear_ce_sum)
    ctx.save_for_backward(*output[2:])
    # Only the loss carries a gradient: without these, autograd would materialise zero gradients the size of the
    # saved dh and dW for the unused outputs (a dW-sized allocation in every backward).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _sum_backward(ctx, g, _g_lse, _g_dh, _g_dw, _g_db):
    if torch.is_grad_enabled():  # create_graph=True: the gradients computed in the forward connect to no input
        raise RuntimeError(_NO_SECOND_ORDER + " (with create_graph=True, the scalar reductions refuse at once)")
    if getattr(ctx, "used", False):  # checked before saved_tensors, whose version check would say less
        raise RuntimeError("the fused linear cross-entropy (reduction 'mean' or 'sum') supports one backward per "
                           "forward: it computed the gradients during the forward and scales them in place in "
                           "backward. Run the forward again, or use reduction='none' and reduce it yourself.")
    dh, dw, db = ctx.saved_tensors
    # Eager: scale in place, these buffers belong to this op alone. While tracing (torch.compile, opcheck) tensors
    # are subclasses and the functional form is used. The product is taken in float32 either way (`_scale_`).
    eager = type(dh) is torch.Tensor and not torch.compiler.is_compiling()
    ctx.used = eager
    scale = lambda t: (_scale_(t, g) if eager else (t.float() * g).to(t.dtype))  # noqa: E731
    gh = scale(dh) if ctx.needs_input_grad[0] else None
    gw = scale(dw).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
    gb = scale(db).to(ctx.w_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return (gh, gw, gb) + (None,) * 12


linear_ce_sum.register_autograd(_sum_backward, setup_context=_sum_setup)


@torch.library.custom_op("lmobj::linear_ce_rows", mutates_args=())
def linear_ce_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, shift_len: int,
                   ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
                   vocab_block: int, backend: str) -> tuple[Tensor, Tensor]:
    """Per-row loss and lse; the backward (linear_ce_rows_bwd) recomputes each chunk's logits (vocab_block: how
    the backward computes dW, see `_chunks`)."""
    opts = (shift_len, ignore_index, label_smoothing, z_loss, softcap)
    loss, lse, *_ = _chunks(hidden, weight, bias, target, opts, chunk_size, backend, (False, False, False))
    return loss, lse


@linear_ce_rows.register_fake
def _(hidden, *args):
    return _rows_fake(hidden)


@torch.library.custom_op("lmobj::linear_ce_rows_bwd", mutates_args=())
def linear_ce_rows_bwd(grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                       lse: Tensor, shift_len: int, ignore_index: int, label_smoothing: float, z_loss: float,
                       softcap: float, chunk_size: int, vocab_block: int, backend: str, need_dh: bool,
                       need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dh, dW, db of sum_r grad_rows[r] * loss_r (each empty when not needed: a frozen head costs no dW)."""
    opts = (shift_len, ignore_index, label_smoothing, z_loss, softcap)
    _, _, dh, dw, db = _chunks(hidden, weight, bias, target, opts, chunk_size, backend,
                               (need_dh, need_dw, need_db and bias is not None),
                               grad_rows=grad_rows.float().contiguous(), lse=lse, vocab_block=vocab_block)
    return dh, dw, db


@linear_ce_rows_bwd.register_fake
def _(grad_rows, hidden, weight, bias, target, lse, shift_len, ii, ls, zl, cap, chunk, vocab_block, backend,
      need_dh, need_dw, need_db):
    return (hidden.new_empty(hidden.shape if need_dh else (0,)), weight.new_empty(weight.shape if need_dw else (0,)),
            weight.new_empty((weight.shape[0],) if need_db and bias is not None else (0,)))


def _rows_setup(ctx, inputs, output):
    hidden, weight, bias, target, *opts = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.has_bias = bias is not None
    ctx.opts = opts
    ctx.save_for_backward(hidden, weight, bias, target, output[1])


def _rows_backward(ctx, grad_rows, _grad_lse):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    shift_len, ii, ls, zl, cap, chunk, vocab_block, backend = ctx.opts
    need = ctx.needs_input_grad[:3]
    dh, dw, db = linear_ce_rows_bwd(grad_rows, hidden, weight, bias, target, lse, shift_len, ii, ls, zl, cap, chunk,
                                    vocab_block, backend, need[0], need[1], need[2] and ctx.has_bias)
    grads = (dh if need[0] else None, dw if need[1] else None, db if need[2] and ctx.has_bias else None)
    return _first_order(grads, (hidden, weight, bias)) + (None,) * 9


linear_ce_rows.register_autograd(_rows_backward, setup_context=_rows_setup)
