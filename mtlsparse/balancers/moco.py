"""MoCo, multi-objective gradient correction (Fernando et al., ICLR 2023).

H. D. Fernando, H. Shen, M. Liu, S. Chaudhury, K. Murugesan, T. Chen, *Mitigating Gradient
Bias in Multi-objective Learning: A Provably Convergent Approach*, ICLR 2023. MGDA's weights
computed from stochastic gradients are biased (the min-norm point of noisy gradients is not
the noisy min-norm point). MoCo tracks each task's gradient with a running estimate y_t and
takes MGDA's weights by projected gradient steps on the tracked gradients:

    y_t ← y_t − β_k (y_t − g_t)                              (g_t: this step's gradient)
    λ   ← Π_Δ(λ − γ_k (Y Yᵀ + ρ I) λ)                       (Y: rows y_t; Π_Δ: onto the simplex)
    d   = Yᵀ λ

with β_k = β / k^σβ and γ_k = γ / k^σγ at step k. On a fixed problem y_t converges to the
true gradient and λ to the min-norm weights, so d becomes MGDA's common descent direction.
Here the Gramian of the λ step is divided by its mean diagonal, so γ is a step in units of
the mean squared tracked-gradient norm (the paper's γ_k is γ / mean‖y‖² in raw units).
The task-specific parameters (heads) step along λ_t ∇_ψ L_t with this step's gradient (the
paper tracks the whole model's gradient; tracking only the shared part keeps the state at
m × P_shared). The bounding projection of y onto a ball of the gradients' Lipschitz radius,
which the analysis assumes, is not applied (the radius is unknown in practice).
y (m × P), λ and the step counter are persistent buffers; under DDP y is built from the
rank-averaged gradients, so it is the same on every rank. Only `mode=params`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext
from mtlsparse.balancers.task_state import SharedGradientBalancer, check_range, decayed, simplex_step
from mtlsparse.gradients import gramian


class MoCo(SharedGradientBalancer):
    """MoCo: tracked per-task gradients y, simplex weights λ by projected steps on Y Yᵀ, d = Yᵀλ; + k0·L0.

    `beta`, `beta_sigma`: the tracking rate β_k = β / k^σ (in (0, 1]); `gamma`, `gamma_sigma`:
    the λ step γ_k = γ / k^σ (normalised Gramian); `rho`: the ridge ρ of the λ problem. `k`
    is validated but unused. The returned value (train/loss) is Σ_t λ_t L_t.
    """

    name = "moco"
    state_buffers = ("tracked",)
    _mode_reason = "tracks each task's gradient of the shared parameters across steps"

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None, beta: float = 0.5,
                 beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5, rho: float = 0.0,
                 mode: str = "params") -> None:
        super().__init__(tasks, k0, k, mode)
        self.beta = check_range("beta", beta, 0.0, 1.0, low_open=True, hint=" (the tracking rate of y)")
        self.beta_sigma = check_range("beta_sigma", beta_sigma, 0.0)
        self.gamma = check_range("gamma", gamma, 0.0, low_open=True, hint=" (the step of the task weights)")
        self.gamma_sigma = check_range("gamma_sigma", gamma_sigma, 0.0)
        self.rho = check_range("rho", rho, 0.0)
        m = len(self.tasks)
        self.register_buffer("lambdas", torch.full((m,), 1.0 / m, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        grads = self.step_gradients(list(stacked), ctx)
        with torch.no_grad():
            tracked = self.tracked
            if self.training:
                self.step += 1
                step = int(self.step)
                tracked.sub_(tracked - grads.shared_rows, alpha=decayed(self.beta, self.beta_sigma, step))
                gram = gramian(tracked)
                lambdas = simplex_step(self.lambdas, gram, float(gram.diagonal().mean()),
                                       decayed(self.gamma, self.gamma_sigma, step), self.rho)
                self.lambdas.copy_(self.same_on_every_rank(lambdas))
            weights = self.lambdas.to(stacked)
            direction = weights @ tracked
        return self.add_penalty(self.surrogate(grads, direction, weights, (weights * stacked).sum()), penalty)

    def state_summary(self) -> dict[str, float]:
        return self.weights_summary(self.lambdas)
