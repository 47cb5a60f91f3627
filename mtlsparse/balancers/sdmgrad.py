"""SDMGrad, stochastic direction-oriented multi-objective gradient descent (Xiao et al., NeurIPS 2023).

P. Xiao, H. Ban, K. Ji, *Direction-oriented Multi-objective Learning: Simple and Provable
Stochastic Algorithms*, NeurIPS 2023 (arXiv:2305.18409). The common descent direction is
kept near a target direction g_0 = Σ_t w̃_t g_t (the gradient of a weighted average loss):

    w* = argmin_{w ∈ Δ} ½ ‖G (w + λ w̃)‖²,      d = G (w* + λ w̃) / (1 + λ)

(G: the m task gradients as columns). λ = 0 gives MGDA's min-norm direction, λ → ∞ the target
g_0; in between, d moves from the min-norm direction towards g_0 as λ grows. SDMGrad solves
for w by projected SGD, warm-started from the previous step, with the unbiased estimate
G_ξᵀ G_ξ' (w + λ w̃) of the gradient from two independent samples ξ, ξ', and steps along
d from a third sample ζ.

One training step sees one batch, so (as in `modo`) the samples are consecutive batches: the
step on batch k moves along G_k (w + λ w̃)/(1 + λ) with w from batches k−1 and k−2, then runs
`n_iter` projected steps on w with the cross matrix J_k J_{k−1}ᵀ (the previous Jacobian is a
buffer). The inner step is `lr` / L with L the largest |eigenvalue| of the (symmetrised) cross
matrix, so `lr` does not depend on the gradients' magnitude or the number of tasks (the
authors' code normalises the matrix by the squared mean gradient norm and steps 5 with
momentum 0.5, which oscillates instead of converging when the optimum is inside the simplex). w̃ is the
top-level preference `k` (default uniform: g_0 is the mean gradient). The update is over the
whole model, so task-specific parameters step along c_t ∇_ψ L_t with c = (w + λ w̃)/(1 + λ).
w, the previous Jacobian (m × P) and a flag are persistent buffers, the same on every DDP
rank (rank-averaged gradients). Only `mode=params`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext
from mtlsparse.balancers.minmax import project_simplex
from mtlsparse.balancers.task_state import (
    SharedGradientBalancer,
    check_count,
    check_range,
    cross_gramian,
)


def sdmgrad_inner(w: Tensor, matrix: Tensor, target: Tensor, lam: float, lr: float, momentum: float,
                  n_iter: int) -> Tensor:
    """`n_iter` projected (heavy-ball) steps on w ∈ Δ for ½‖G(w + λ w̃)‖², with M ≈ GᵀG (float64).

    The step is lr / L, L the largest |eigenvalue| of M's symmetric part (the curvature of the
    problem), so lr ∈ (0, 2) converges on an exact Gramian whatever the number of tasks and the
    gradients' scale; w is returned unchanged when M is zero.
    """
    curvature = float(torch.linalg.eigvalsh(0.5 * (matrix + matrix.T)).abs().max())
    if not curvature > 0:
        return w
    velocity = torch.zeros_like(w)
    for _ in range(n_iter):
        velocity = momentum * velocity + matrix @ (w + lam * target)
        w = project_simplex(w - lr / curvature * velocity)
    return w


class SDMGrad(SharedGradientBalancer):
    """SDMGrad: d = G(w + λ w̃)/(1 + λ), w by projected SGD on the cross matrix of consecutive batches; + k0·L0.

    `lambda_` is λ ≥ 0 (the paper's regulariser; 0.3 in the authors' experiments), `lr` the
    inner step on the normalised matrix, `momentum` the inner heavy-ball momentum (0: the
    paper's projected SGD), `n_iter` the inner steps per training step. The returned value
    (train/loss) is Σ_t c_t L_t with c = (w + λ w̃)/(1 + λ).
    """

    name = "sdmgrad"
    state_buffers = ("previous",)
    _mode_reason = "pairs each step's task gradients of the shared parameters with the previous step's"

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 lambda_: float = 0.3, lr: float = 1.0, momentum: float = 0.0, n_iter: int = 20,
                 mode: str = "params") -> None:
        super().__init__(tasks, k0, k, mode)
        self.lambda_ = check_range("lambda_", lambda_, 0.0, hint=" (0: MGDA; larger: closer to the mean gradient)")
        self.lr = check_range("lr", lr, 0.0, 2.0, low_open=True, high_open=True,
                              hint=" (the inner step in units of 1/curvature)")
        self.momentum = check_range("momentum", momentum, 0.0, 1.0, high_open=True)
        self.n_iter = check_count("n_iter", n_iter, 1)
        m = len(self.tasks)
        self.register_buffer("w", torch.full((m,), 1.0 / m, dtype=torch.float64))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))

    def coefficients(self) -> Tensor:
        """c = (w + λ w̃) / (1 + λ): d = Σ_t c_t g_t (float64)."""
        return (self.w + self.lambda_ * self.k.double()) / (1 + self.lambda_)

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        grads = self.step_gradients(list(stacked), ctx)
        coefficients = self.coefficients().to(stacked)  # from earlier batches only: independent of this one
        with torch.no_grad():
            direction = coefficients @ grads.shared_rows
            if self.training:
                rows, previous = grads.shared_rows, self.previous
                if bool(self.has_previous):
                    w = sdmgrad_inner(self.w, cross_gramian(rows, previous), self.k.double(), self.lambda_, self.lr,
                                      self.momentum, self.n_iter)
                    self.w.copy_(self.same_on_every_rank(w))
                previous.copy_(rows)
                self.has_previous.fill_(True)
        value = (coefficients * stacked).sum()
        return self.add_penalty(self.surrogate(grads, direction, coefficients, value), penalty)

    def state_summary(self) -> dict[str, float]:
        return self.weights_summary(self.coefficients())
