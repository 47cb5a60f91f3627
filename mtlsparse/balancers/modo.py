"""MoDo, multi-objective gradient descent with double sampling (Chen et al., NeurIPS 2023).

L. Chen, H. Fernando, Y. Ying, T. Chen, *Three-Way Trade-Off in Multi-Objective Learning:
Optimization, Generalization and Conflict-Avoidance*, NeurIPS 2023 (JMLR 2024). MoDo runs
MGDA's weight problem min_λ∈Δ ½‖∇F(x) λ‖² by one projected stochastic step per iteration,
with an unbiased estimate of its gradient ∇F(x)ᵀ∇F(x) λ from two independent samples:

    λ_{t+1} = Π_Δ(λ_t − γ (∇F_{z1}(x_t)ᵀ ∇F_{z2}(x_t) λ_t + ρ λ_t))
    x_{t+1} = x_t − α ∇F_{z3}(x_t) λ_{t+1}                 (z3 independent of z1, z2)

(∇F: the d × m Jacobian; Π_Δ: projection onto the simplex; ρ: ridge of the λ problem).

One training step sees one batch, so the independent samples are consecutive batches: the
step on batch k moves the model along J_kᵀ λ, where λ was last updated from batches k−1 and
k−2 (so it is independent of batch k, as the paper needs of z3), and then updates λ with the
cross matrix J_k J_{k−1}ᵀ of this batch and the previous one (whose Jacobian is kept in a
buffer). Relative to the paper the second sample is one step old: it is taken at x_{k−1},
not x_k (a bias of the order of one step; the paper's rate analysis does not cover it). The
paper and LibMTL instead draw two or three batches per step, which changes how much data an
epoch uses. The cross matrix is divided by mean_t ‖g_t^k‖‖g_t^{k−1}‖, so γ is a step in
units of the squared gradient norm (the paper's γ is γ / mean‖g‖² in raw units). The update
is ∇F λ over the whole model, so the task-specific parameters step along λ_t ∇_ψ L_t.
λ, the previous Jacobian (m × P) and a flag are persistent buffers; under DDP everything is
built from rank-averaged gradients, so it is the same on every rank. Only `mode=params`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext
from mtlsparse.balancers.task_state import (
    SharedGradientBalancer,
    check_range,
    cross_gramian,
    mean_norm_product,
    simplex_step,
)


class MoDo(SharedGradientBalancer):
    """MoDo: d = Jᵀλ with λ from projected steps on the cross matrix of consecutive batches' Jacobians; + k0·L0.

    `gamma` is the λ step γ (normalised cross matrix), `rho` the ridge ρ. `k` is validated but
    unused. The returned value (train/loss) is Σ_t λ_t L_t.
    """

    name = "modo"
    state_buffers = ("previous",)
    _mode_reason = "pairs each step's task gradients of the shared parameters with the previous step's"

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None, gamma: float = 0.1,
                 rho: float = 0.1, mode: str = "params") -> None:
        super().__init__(tasks, k0, k, mode)
        self.gamma = check_range("gamma", gamma, 0.0, low_open=True, hint=" (the step of the task weights)")
        self.rho = check_range("rho", rho, 0.0)
        m = len(self.tasks)
        self.register_buffer("lambdas", torch.full((m,), 1.0 / m, dtype=torch.float64))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        grads = self.step_gradients(list(stacked), ctx)
        weights = self.lambdas.to(stacked)  # from earlier batches only: independent of this one
        with torch.no_grad():
            direction = weights @ grads.shared_rows
            if self.training:
                rows, previous = grads.shared_rows, self.previous
                if bool(self.has_previous):
                    lambdas = simplex_step(self.lambdas, cross_gramian(rows, previous),
                                           mean_norm_product(rows, previous), self.gamma, self.rho)
                    self.lambdas.copy_(self.same_on_every_rank(lambdas))
                previous.copy_(rows)
                self.has_previous.fill_(True)
        return self.add_penalty(self.surrogate(grads, direction, weights, (weights * stacked).sum()), penalty)

    def state_summary(self) -> dict[str, float]:
        return self.weights_summary(self.lambdas)
