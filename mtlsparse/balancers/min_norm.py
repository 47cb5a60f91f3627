"""Exact min-norm point of the convex hull of m task gradients, from their Gramian (MGDA's subproblem).

min_w wᵀ A w over the simplex {w ≥ 0, Σ w = 1}, A = G Gᵀ the m×m Gramian of the task
gradients (rows of G). Solved by Wolfe's minimum-norm-point algorithm (1976), an
active-set method that ends after finitely many steps at the exact optimum (up to
rounding) for every m. It works on A alone, so a singular or ill-conditioned Gramian
(duplicated, collinear or rank-deficient gradients, a Pareto-stationary point) needs no
ridge: the set it keeps is affinely independent, and each affine minimiser is a
least-squares solve. The optimum satisfies gᵢ·d ≥ ‖d‖² for every task i (d = Gᵀw), so
d never raises a task's loss to first order. Frank–Wolfe, the usual MGDA solver, is only
asymptotically exact and can return a d with gᵢ·d < 0 for some task when m ≥ 3.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: stop when every gᵢ·d ≥ (1 − RTOL)·‖d‖² up to the rounding of gᵢ·d itself (NOISE·eps·m·Σ_s |gᵢ·g_s| w_s)
RTOL, NOISE = 1e-12, 8.0
#: refinement steps of each affine-minimiser solve
REFINE = 2
EPS = float(np.finfo(np.float64).eps)


def _affine_minimiser(a: np.ndarray, support: list[int]) -> np.ndarray:
    """Coefficients μ (Σ μ = 1) of the min-norm point of the affine hull of the support's gradients.

    KKT system [[A_SS, 1], [1ᵀ, 0]] [μ; −‖y‖²] = [0; 1], with A_SS scaled to unit max diagonal so
    the border does not swamp a block of small gradients; least squares keeps it solvable when the
    support is nearly affinely dependent. Refinement matters when ‖d‖² is far below the largest
    ‖gᵢ‖² (a task with a tiny gradient): gᵢ·d then cancels, and must be accurate relative to ‖d‖².
    """
    k = len(support)
    block = a[np.ix_(support, support)]
    top = float(block.diagonal().max())
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = block / top if top > 0 else block
    kkt[:k, k] = kkt[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    for _ in range(REFINE):  # iterative refinement: small weights get relative, not absolute, accuracy
        sol = sol + np.linalg.lstsq(kkt, rhs - kkt @ sol, rcond=None)[0]
    mu = sol[:k]
    return mu / mu.sum()


def _violation(a: np.ndarray, support: list[int], lam: np.ndarray) -> tuple[np.ndarray, float]:
    """Per task, how far gᵢ·d falls below ‖d‖² beyond tolerance and rounding (> 0: not optimal); and ‖d‖²."""
    cols = a[:, support]
    a_x = cols @ lam  # gᵢ·d for every task
    norm_sq = float(lam @ a_x[support])
    noise = NOISE * EPS * len(support) * (np.abs(cols) @ lam)
    return (1 - RTOL) * norm_sq - noise - a_x, norm_sq


def _wolfe(a: np.ndarray) -> np.ndarray:
    """Wolfe's min-norm-point algorithm on a Gramian normalised to max diagonal 1."""
    m = a.shape[0]
    support = [int(np.argmin(a.diagonal()))]
    lam = np.ones(1)
    for _ in range(20 * m + 20):  # each pass strictly lowers ‖d‖²: finite; the cap guards against rounding
        violation, norm_sq = _violation(a, support, lam)
        j = int(np.argmax(violation))
        if violation[j] <= 0 or j in support:
            break
        new_support, new_lam = support + [j], np.append(lam, 0.0)
        for _ in range(len(new_support)):  # minor cycles: walk to the affine minimiser, dropping weights that hit 0
            mu = _affine_minimiser(a, new_support)
            if not np.isfinite(mu).all():
                return _expand(support, lam, m)
            if mu.min() > 0:
                new_lam = mu
                break
            falling = mu < new_lam
            ratios = np.where(falling & (mu <= 0), new_lam / np.where(falling, new_lam - mu, 1.0), np.inf)
            theta = float(ratios.min())
            if not np.isfinite(theta) or theta <= 0:  # the newcomer itself would drop: rounding stall
                return _expand(support, lam, m)
            new_lam = (1 - theta) * new_lam + theta * mu
            keep = new_lam > 0
            keep[int(np.argmin(ratios))] = False
            new_support = [s for s, k in zip(new_support, keep) if k]
            new_lam = new_lam[keep] / new_lam[keep].sum()
        new_norm_sq = float(new_lam @ a[np.ix_(new_support, new_support)] @ new_lam)
        if new_norm_sq > norm_sq * (1 + 4 * m * EPS):  # worse beyond rounding: keep the last iterate
            break
        support, lam = new_support, new_lam
    return _expand(support, lam, m)


def _expand(support: list[int], lam: np.ndarray, m: int) -> np.ndarray:
    """The full weight vector: λ on the support, 0 elsewhere, clipped and renormalised onto the simplex."""
    w = np.zeros(m)
    w[support] = np.clip(lam, 0.0, None)
    return w / w.sum()


def simplex_min_norm(gram: np.ndarray) -> np.ndarray:
    """Simplex weights w minimising wᵀ A w for a Gramian A of m task gradients (float64, exact).

    All-zero gradients give uniform weights (every w is optimal); a non-finite Gramian gives
    NaN weights, so the caller's non-finite loss check reports it with its context.
    """
    a = np.asarray(gram, dtype=np.float64)
    m = a.shape[0]
    if not np.isfinite(a).all():
        return np.full(m, np.nan)
    scale = float(a.diagonal().max()) if m else 0.0
    if m <= 1 or scale <= 0:
        return np.full(m, 1.0 / max(m, 1))
    return _wolfe((a + a.T) / (2 * scale))


def min_norm_weights_of_gram(gram: Tensor) -> Tensor:
    """`simplex_min_norm` for a torch Gramian: float64 weights on the CPU."""
    return torch.from_numpy(simplex_min_norm(gram.detach().double().cpu().numpy()))

