"""Reference cross-entropy family, straight from ALGORITHMS.md ("Cross-entropy family").

Computed in float32, or float64 when the inputs are float64 (the tests' truth). Differentiable by autograd.
"""

from __future__ import annotations

import torch


def shift_targets(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(B, S) labels -> the label of the next position, ignore_index at the last one (causal LM)."""
    pad = torch.full_like(target[..., :1], ignore_index)
    return torch.cat([target[..., 1:], pad], dim=-1)


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (0 at ignored rows) and log-sum-exp of (N, V) logits against (N,) targets."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    valid = target != ignore_index
    if z.requires_grad:  # ignored rows get no gradient path: an all -inf row's softmax is NaN, and 0 * NaN = NaN
        z = torch.where(valid.unsqueeze(-1), z, z.detach())
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    # lse = m + ls, kept apart as log_softmax does: (m - z_y) + ls and the softmax of its gradient keep float32's
    # accuracy at any magnitude of the logits, where lse - z_y loses the rounding of lse (csrc/common/
    # cross_entropy_row.h); m is a constant shift (no gradient), -inf rows shifted by 0
    m = z.detach().amax(dim=-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    ls = torch.logsumexp(z - m.unsqueeze(-1), dim=-1)
    lse = m + ls
    safe = torch.where(valid, target, torch.zeros_like(target))
    z_y = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    e = label_smoothing
    loss = (1 - e) * ((m - z_y) + ls) + z_loss * lse * lse
    if e > 0:  # not 0 * (-inf) for -inf logits (F.cross_entropy gives a finite loss there)
        loss = loss + e * ((m - z.mean(dim=-1)) + ls)
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def reduce_rows(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """none: per row; sum; mean over non-ignored rows (0, not NaN, when every row is ignored)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def linear_cross_entropy_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and lse of z = hidden @ weight.T (+ bias), hidden (N, D), target (N,): logits materialised."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return cross_entropy_rows(logits, target, ignore_index, label_smoothing, z_loss, softcap)
