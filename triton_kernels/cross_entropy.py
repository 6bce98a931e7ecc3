"""Triton kernels of the cross-entropy family (ALGORITHMS.md, "Cross-entropy family").

One program per row: an online softmax over the row in blocks of BLOCK columns (max, sum of exp, sum of z),
then the loss and lse; the gradient pass re-reads the row and writes softmax-based gradients, in place into a
buffer the library owns (fused forward+gradient) or into a new tensor (backward with per-row weights).
Runs compiled on a GPU and under TRITON_INTERPRET=1 on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import on_data_device


@triton.jit
def _tanh(y):
    """tanh(y) = expm1(2y) / (expm1(2y) + 2) (tl has no tanh in every supported Triton), as fast_tanhf in
    csrc/common/cross_entropy_row.h: expm1 by its Taylor series to x^8 for |x| < 1/2, where exp(x) - 1 cancels
    (1 - 2 / (exp(2y) + 1) cost c * 6e-8 on a capped logit)."""
    x = 2.0 * y
    x = tl.where(x > 88.0, 88.0, x)  # exp stays finite: tanh -> 1 (not tl.minimum: it turns NaN into 88)
    p = 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    e = tl.where(tl.abs(x) < 0.5, p * x, tl.exp(x) - 1.0)
    return e / (e + 2.0)


@triton.jit
def _capped(x, softcap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        x = softcap * _tanh(x / softcap)
    return x


@triton.jit
def _row_target(T, row, shift_len, ignore_index, SHIFT: tl.constexpr):
    if SHIFT:
        last = (row % shift_len) == (shift_len - 1)
        y = tl.load(T + row + 1, mask=row % shift_len != shift_len - 1, other=ignore_index)
        y = tl.where(last, ignore_index, y)
    else:
        y = tl.load(T + row)
    return y


@triton.jit
def _row_grad_pass(X_row, G_row, V, y, m, ls, g, smoothing, z_loss, softcap, HAS_CAP: tl.constexpr,
                   BLOCK: tl.constexpr):
    """G_row[j] = g * d loss / d x_j; NaN when y is out of range, 0 when g == 0 (ignored row). The row's lse is
    m + ls, its max and log-sum (a stored lse: (lse, 0)): exp((z - m) - ls) keeps float32's accuracy at any
    magnitude of the logits, where exp(z - lse) loses the rounding of lse (csrc/common/cross_entropy_row.h)."""
    valid = (y >= 0) & (y < V)
    lse = m + ls
    coef = g * (1.0 + 2.0 * z_loss * lse)
    uni = g * smoothing / V
    hit = g * (1.0 - smoothing)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        msk = cols < V
        z = _capped(tl.load(X_row + cols, mask=msk, other=0.0).to(tl.float32), softcap, HAS_CAP)
        d = tl.exp((z - m) - ls) * coef - uni - tl.where(cols == y, hit, 0.0)
        if HAS_CAP:
            d = d * (1.0 - (z / softcap) * (z / softcap))
        d = tl.where(valid, d, float("nan"))
        d = tl.where(g == 0.0, 0.0, d)  # not exp(NaN) * 0 for an ignored row of -inf logits (lse = -inf)
        tl.store(G_row + cols, d.to(G_row.dtype.element_ty), mask=msk)


@triton.jit
def _ce_fwd_kernel(X, stride_x, T, LOSS, LSE, V, row_offset, shift_len, ignore_index, smoothing, z_loss, softcap,
                   HAS_CAP: tl.constexpr, SHIFT: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Per-row loss and lse of X (N, V; rows stride_x apart); with WRITE_GRAD the row is then overwritten with
    d(loss_row)/dx (X is then a buffer the library owns). Targets: T[row_offset + r] (SHIFT: the next one)."""
    r = tl.program_id(0).to(tl.int64)
    X_row = X + r * stride_x
    # z_y is read before anything else: with WRITE_GRAD one warp's gradient stores may reach column y while
    # another warp has yet to read it (no barrier separates the passes; the CUDA kernel has __syncthreads)
    y = _row_target(T, row_offset + r, shift_len, ignore_index, SHIFT)
    valid = (y >= 0) & (y < V)
    ignored = y == ignore_index
    z_y = _capped(tl.load(X_row + y, mask=valid, other=0.0).to(tl.float32), softcap, HAS_CAP)
    m = -float("inf")
    s = 0.0
    sz = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        msk = cols < V
        z = _capped(tl.load(X_row + cols, mask=msk, other=0.0).to(tl.float32), softcap, HAS_CAP)
        sz += tl.sum(tl.where(msk, z, 0.0), axis=0)
        z = tl.where(msk, z, -float("inf"))
        mn = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(mn == -float("inf"), 0.0, mn)  # all -inf so far: exp(-inf - -inf) would be NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = mn
    ls = tl.log(s)
    lse = m + ls
    loss = (1.0 - smoothing) * ((m - z_y) + ls) + z_loss * lse * lse  # m - z_y first: see _row_grad_pass
    # not 0 * (-inf) when -inf logits make sz -inf (F.cross_entropy's loss is finite there)
    loss = tl.where(smoothing > 0.0, loss + smoothing * ((m - sz / V) + ls), loss)
    loss = tl.where(valid, loss, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(LOSS + r, loss)
    tl.store(LSE + r, lse)
    if WRITE_GRAD:
        g = tl.where(ignored, 0.0, 1.0)
        _row_grad_pass(X_row, X_row, V, y, m, ls, g, smoothing, z_loss, softcap, HAS_CAP, BLOCK)


@triton.jit
def _ce_bwd_kernel(GL, X, stride_x, T, LSE, G, V, row_offset, shift_len, ignore_index, smoothing, z_loss, softcap,
                   HAS_CAP: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """G (N, V contiguous) = GL[r] * d loss_r / d X[r]; zeros at ignored rows."""
    r = tl.program_id(0).to(tl.int64)
    y = _row_target(T, row_offset + r, shift_len, ignore_index, SHIFT)
    g = tl.where(y == ignore_index, 0.0, tl.load(GL + r))
    _row_grad_pass(X + r * stride_x, G + r * V, V, y, tl.load(LSE + r), 0.0, g, smoothing, z_loss, softcap,
                   HAS_CAP, BLOCK)


def _config(V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps): long rows get wide blocks and more warps (memory-bound, like Liger-Kernel's CE)."""
    block = min(triton.next_power_of_2(V), 16384 if dtype == torch.float32 else 32768)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return block, warps


@on_data_device
def ce_forward(logits, target, row_offset, shift_len, ignore_index, smoothing, z_loss, softcap, grad_inplace=False):
    """(loss, lse) per row, float32; with grad_inplace the logits buffer is overwritten with the gradient."""
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N == 0:
        return loss, lse
    block, warps = _config(V, logits.dtype)
    _ce_fwd_kernel[(N,)](logits, logits.stride(0), target, loss, lse, V, row_offset, max(shift_len, 1), ignore_index,
                         smoothing, z_loss, softcap if softcap > 0 else 1.0, HAS_CAP=softcap > 0,
                         SHIFT=shift_len > 0, WRITE_GRAD=grad_inplace, BLOCK=block, num_warps=warps)
    return loss, lse


@on_data_device
def ce_backward(grad_loss, logits, target, lse, row_offset, shift_len, ignore_index, smoothing, z_loss, softcap):
    """grad_loss[r] * d loss_r / d logits, in the logits' dtype."""
    N, V = logits.shape
    out = torch.empty((N, V), device=logits.device, dtype=logits.dtype)
    if N == 0:
        return out
    block, warps = _config(V, logits.dtype)
    _ce_bwd_kernel[(N,)](grad_loss, logits, logits.stride(0), target, lse, out, V, row_offset, max(shift_len, 1),
                         ignore_index, smoothing, z_loss, softcap if softcap > 0 else 1.0, HAS_CAP=softcap > 0,
                         SHIFT=shift_len > 0, BLOCK=block, num_warps=warps)
    return out


@triton.jit
def _ce_grad_cols_kernel(X, stride_x, Y, LSE, W, col0, ncols, V, smoothing, z_loss, softcap,
                         HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    """X[r, j] <- W[r] * d loss_r / d z[r, col0 + j], in place, for a block X (N, ncols) of the logits' columns
    [col0, col0 + ncols) of a V-column row (the low-memory weight gradient). Y: each row's target (any value where
    W[r] == 0); LSE: the full rows' lse. Grid: (N, cdiv(ncols, BLOCK))."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = cols < ncols
    w = tl.load(W + r)
    lse = tl.load(LSE + r)
    y = tl.load(Y + r) - col0
    coef = w * (1.0 + 2.0 * z_loss * lse)
    uni = w * smoothing / V
    hit = w * (1.0 - smoothing)
    ptr = X + r * stride_x + cols
    z = _capped(tl.load(ptr, mask=msk, other=0.0).to(tl.float32), softcap, HAS_CAP)
    d = tl.exp(z - lse) * coef - uni - tl.where(cols == y, hit, 0.0)
    if HAS_CAP:
        d = d * (1.0 - (z / softcap) * (z / softcap))
    d = tl.where(w == 0.0, 0.0, d)  # an ignored row of -inf logits: lse = -inf, exp(NaN) * 0
    tl.store(ptr, d.to(X.dtype.element_ty), mask=msk)


@on_data_device
def ce_grad_cols_(block, y, lse, w, col0, V, smoothing, z_loss, softcap):
    """In place: block (N, ncols; rows block.stride(0) apart, unit column stride) of the logits' columns
    [col0, col0 + ncols) becomes w[r] * their gradient (float32 y as int64 targets, lse and w float32)."""
    N, ncols = block.shape
    if N == 0 or ncols == 0:
        return block
    BLOCK = min(triton.next_power_of_2(ncols), 2048)
    _ce_grad_cols_kernel[(N, triton.cdiv(ncols, BLOCK))](
        block, block.stride(0), y, lse, w, col0, ncols, V, smoothing, z_loss, softcap if softcap > 0 else 1.0,
        HAS_CAP=softcap > 0, BLOCK=BLOCK, num_warps=4 if BLOCK <= 1024 else 8)
    return block
