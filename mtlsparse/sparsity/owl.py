"""GrOWL (group ordered weighted ℓ1) over input-channel rows: value, exact prox, per-layer cap.

G_θ(W) = Σ_i θ_i ‖w_[i]‖₂ with rows (`group_view`: W[:, i] / W[:, i, :, :]) sorted by
decreasing norm and θ non-increasing (Zhang et al. 2018; MDMTN, docs/methods/growl_mdmtn.md). Its
prox is the OWL prox of the vector of row norms followed by rescaling each row to its
new norm; the OWL prox sorts, subtracts θ, and projects onto the monotone
non-increasing cone (pool-adjacent-violators, sklearn's isotonic regression), then
clips at zero (Bogdan et al. 2015, SLOPE; Zeng & Figueiredo 2014).
"""
from __future__ import annotations

import torch
from sklearn.isotonic import isotonic_regression
from torch import Tensor

from mtlsparse.sparsity.layers import group_norms, group_shape


def spike_weights(n: int, beta1: float, beta2: float) -> Tensor:
    """GrOWL-Spike θ: θ_1 = β1 + β2, θ_i = β2 (i ≥ 2); only the largest row gets the extra β1."""
    theta = torch.full((n,), float(beta2))
    theta[0] += beta1
    return theta


def owl_value(norms: Tensor, theta: Tensor) -> Tensor:
    """Σ_i θ_i v_[i] with v sorted decreasingly (differentiable; grads flow through the sort)."""
    return (torch.sort(norms, descending=True).values * theta).sum()


def owl_prox(v: Tensor, theta: Tensor) -> Tensor:
    """Exact prox of x ↦ Σ_i θ_i x_[i] at v ≥ 0 (θ non-increasing, step folded into θ).

    Sort v decreasingly, subtract θ, project onto the non-increasing cone by PAVA,
    clip at 0, undo the sort. Equal inputs get equal outputs (PAVA pools them).
    """
    order = torch.argsort(v, descending=True)
    shifted = (v[order] - theta).detach().cpu().double().numpy()
    pooled = isotonic_regression(shifted, increasing=False).copy()  # copy: sklearn may return a reversed view
    pooled = torch.as_tensor(pooled).clamp_min(0)
    out = torch.empty_like(v)
    out[order] = pooled.to(v)
    return out


@torch.no_grad()
def growl_prox_(weight: Tensor, theta: Tensor) -> Tensor:
    """In-place prox of G_θ on `weight`'s input-channel rows: OWL prox of the norms, rows rescaled."""
    norms = group_norms(weight)
    new_norms = owl_prox(norms, theta)
    scale = torch.where(norms > 0, new_norms / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0)
    return weight.mul_(scale.view(group_shape(weight)))


@torch.no_grad()
def cap_zero_rows_(weight: Tensor, before: Tensor, max_zero: int) -> Tensor:
    """Keep at most `max_zero` zero rows: the rows with the smallest pre-prox norms stay zero,
    the other newly zeroed rows get their pre-prox values back (`before` = weight before the prox).

    Rows that were already zero before the prox stay zero even beyond the cap.
    """
    zero = torch.nonzero(group_norms(weight) == 0).flatten()
    excess = zero.numel() - max_zero
    if excess <= 0:
        return weight
    largest_first = torch.argsort(group_norms(before)[zero], descending=True, stable=True)
    restore = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
    restore[zero[largest_first[:excess]]] = True
    return weight.copy_(torch.where(restore.view(group_shape(weight)), before, weight))
