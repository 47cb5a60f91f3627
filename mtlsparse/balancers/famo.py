"""FAMO, Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023).

Task weights z = softmax(ξ) come from logits ξ. The model steps along
Σ_t c·z_t/ℓ_t · ∇ℓ_t with c = (Σ_t z_t/ℓ_t)⁻¹, i.e. it minimises Σ_t z_t log ℓ_t / c with z, c
held fixed, ℓ_t = L_t − L_t^min + ε. The logits then follow the decrease of the log
losses δ_t = log ℓ_t(before) − log ℓ_t(after):

    ξ ← ξ − β (∇_ξ zᵀδ + γ ξ),   ∇_ξ zᵀδ = z ⊙ (δ − zᵀδ)

so a task whose loss falls more slowly than the weighted average gains weight; γ decays
the logits towards uniform weights. One forward, one backward per step (O(1) in m).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext, Balancer
from mtlsparse.gradients import rank_mean_

UPDATES = ("adam", "sgd")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class FAMO(Balancer):
    """Σ_t z_t log ℓ_t / c (+ k0·L0) with z = softmax(ξ), ξ updated once per training step.

    δ compares each step's (rank-averaged) losses with the previous step's: the losses
    after an update are measured on the next batch rather than by a second forward on the
    same batch (the authors' loop), which keeps FAMO at one forward per step; the batch
    noise averages out in ξ. `update=adam` (default, the authors' code: Adam with lr β and
    weight decay γ on ξ) or `update=sgd` (the paper's Algorithm 1). ξ, the Adam moments and
    the last losses are persistent buffers. `min_losses` are the lower bounds L^min (default 0).
    The preference `k` is not used.
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 beta: float = 0.025, gamma: float = 0.01, update: str = "adam",
                 min_losses: Sequence[float] | None = None, eps: float = 1e-8) -> None:
        super().__init__(tasks, k0, k)
        if beta <= 0 or gamma < 0 or eps <= 0:
            raise ValueError(f"need balancer.beta > 0, balancer.gamma >= 0, balancer.eps > 0, "
                             f"got {beta}, {gamma}, {eps}")
        if update not in UPDATES:
            raise ValueError(f"balancer.update must be one of {UPDATES}, got {update!r}")
        m = len(self.tasks)
        min_losses = [0.0] * m if min_losses is None else [float(v) for v in min_losses]
        if len(min_losses) != m:
            raise ValueError(f"balancer.min_losses needs one value per task ({m}), got {min_losses}")
        self.beta, self.gamma, self.update, self.eps = float(beta), float(gamma), update, float(eps)
        self.register_buffer("min_losses", torch.tensor(min_losses), persistent=False)
        self.register_buffer("logits", torch.zeros(m))
        self.register_buffer("last_log_losses", torch.zeros(m))
        self.register_buffer("has_last", torch.zeros((), dtype=torch.bool))
        self.register_buffer("adam_m", torch.zeros(m))
        self.register_buffer("adam_v", torch.zeros(m))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))

    @property
    def z(self) -> Tensor:
        """Current task weights softmax(ξ)."""
        return torch.softmax(self.logits, dim=0)

    def shifted(self, losses: Tensor) -> Tensor:
        """ℓ = L − L^min + ε (positive, so log ℓ and 1/ℓ are defined)."""
        return losses - self.min_losses.to(losses) + self.eps

    @torch.no_grad()
    def observe(self, losses: Tensor) -> None:
        """Record this step's losses; from the second step on, update ξ from the log-loss decrease."""
        losses = rank_mean_(losses.detach().clone())
        log_losses = self.shifted(losses).log().to(self.logits)
        if bool(self.has_last):
            self.step_logits(self.last_log_losses - log_losses)
        self.last_log_losses.copy_(log_losses)
        self.has_last.fill_(True)

    @torch.no_grad()
    def step_logits(self, delta: Tensor) -> None:
        """One descent step on ξ for the objective zᵀδ, with decay γ·ξ."""
        z = self.z
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits
        if self.update == "sgd":
            self.logits.sub_(self.beta * grad)
            return
        self.adam_step += 1
        b1, b2 = ADAM_BETAS
        self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step = int(self.adam_step)
        m_hat = self.adam_m / (1 - b1**step)
        v_hat = self.adam_v / (1 - b2**step)
        self.logits.sub_(self.beta * m_hat / (v_hat.sqrt() + ADAM_EPS))

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        if self.training:
            self.observe(stacked)
        z = self.z.to(stacked)
        shifted = self.shifted(stacked)
        c = (z / shifted.detach()).sum()
        return self.add_penalty((z * shifted.log()).sum() / c, penalty)

    def state_summary(self) -> dict[str, float]:
        return {f"w/{t}": float(w) for t, w in zip(self.tasks, self.z)}
