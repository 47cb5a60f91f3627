"""Proximal operators of the sparsity penalties, applied in place to weights.

Plain prox: the Euclidean prox of τ‖·‖ (soft thresholding). Adam-metric prox: the
prox in the diagonal metric D = √v̂ + eps that Adam's step uses (Yun et al., ProxGen),
so the shrinkage matches the preconditioned step; the scaled shrinkage is found by
Newton's method on the group's secular equation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mtlsparse.sparsity.layers import group_norms, group_shape


def soft_threshold_(weight: Tensor, tau: float | Tensor) -> Tensor:
    """In-place prox of τ‖w‖₁: w ← sign(w)·max(|w| − τ, 0)."""
    return weight.copy_(torch.sign(weight) * torch.clamp(weight.abs() - tau, min=0))


def group_prox_(weight: Tensor, tau: float | Tensor) -> Tensor:
    """In-place prox of τ Σ_g ‖W_g‖₂ over input-channel groups.

    Groups with ‖W_g‖ ≤ τ become exactly zero; others are scaled by 1 − τ/‖W_g‖.
    """
    norms = group_norms(weight)
    scale = torch.clamp(1 - tau / norms.clamp_min(torch.finfo(weight.dtype).tiny), min=0)
    return weight.mul_(scale.view(group_shape(weight)))


def group_prox_metric_(weight: Tensor, tau: float, metric: Tensor, newton_steps: int = 30,
                       tol: float | None = None) -> Tensor:
    """In-place prox of τ Σ_g ‖W_g‖₂ in the diagonal metric D (same shape as weight).

    Solves argmin_w ½ (w − z)ᵀ D (w − z) + τ‖w‖ per group. A group is zero iff
    ‖D⊙z‖ ≤ τ; otherwise w_i = z_i · s / (s + τ/D_i) where s = ‖w‖ solves
    ‖x(s)‖ = 1 with x_i(s) = z_i / (s + τ/D_i). Newton runs on 1/‖x(s)‖ − 1, which is
    concave and nearly linear (exactly linear when D is uniform), so it converges
    monotonically from s = 0 in a few steps, as in Moré–Sorensen's trust-region solver.
    It stops once a step is below `tol` relative to s (default: 4× the dtype's epsilon,
    the precision float32 weights can hold).
    """
    tol = 4 * torch.finfo(weight.dtype).eps if tol is None else tol
    active = (group_norms(metric * weight) > tau).nonzero().flatten()
    # Newton only on the surviving groups (after a few steps of training most are zero)
    z, offset = weight.index_select(1, active), tau / metric.index_select(1, active)
    shape = group_shape(z)
    dims = [d for d in range(z.dim()) if d != 1]
    s = z.new_zeros(len(active))
    for _ in range(newton_steps):
        denom = s.view(shape) + offset
        x_sq = (z / denom) ** 2
        x_norm = x_sq.sum(dim=dims).sqrt().clamp_min(torch.finfo(z.dtype).tiny)
        step = (1 / x_norm - 1) / ((x_sq / denom).sum(dim=dims) / x_norm**3)
        s = (s - step).clamp_min(0)
        if not len(s) or step.abs().max() <= tol * (1 + s.abs().max()):
            break
    shrunk = z * (s.view(shape) / (s.view(shape) + offset))
    return weight.zero_().index_copy_(1, active, shrunk)
