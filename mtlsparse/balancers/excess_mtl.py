"""ExcessMTL, multi-task learning weighted by excess risks (He et al., ICML 2024).

Y. He, S. Zhou, G. Zhang, H. Yun, Y. Xu, B. Zeng, T. Chilimbi, H. Zhao, *Robust Multi-Task
Learning with Excess Risks*, ICML 2024 (arXiv:2402.02009). Loss-based weightings give noisy
tasks (high Bayes error, hence high loss) too much weight. ExcessMTL weights tasks by their
excess risk, the distance of the current loss to the best loss the model class can reach,
estimated by a second-order Taylor expansion around the optimum with a diagonal, AdaGrad-
style estimate of the Hessian (the empirical Fisher's square root):

    S_t ← S_t + g_t ⊙ g_t,      E_t ≈ g_tᵀ diag(√(S_t + ε))⁻¹ g_t

(g_t: task t's gradient of the shared parameters). The weights follow an exponentiated-
gradient (mirror ascent) step of a distributionally robust objective, on the simplex:

    α_t ← α_t · exp(η · E_t / E_t⁰) / Σ_s α_s · exp(η · E_s / E_s⁰)

where E⁰ is the scale normalisation (each task's excess risk at the start: the first step's
estimate, or the mean over `warmup_steps` steps during which α stays uniform; the paper's
appendix suggests 3 epochs of statistics). So a task that stays far from convergence, relative
to where it started, gains weight; a task whose loss is high but no longer falling does not.
The model steps along Σ_t α_t ∇L_t over the whole model. S (m × P), α, E⁰ and the counters are
persistent buffers; under DDP everything is built from rank-averaged gradients, so it is the
same on every rank. Only `mode=params` (S accumulates gradients over batches).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext
from mtlsparse.balancers.task_state import SharedGradientBalancer, check_count, check_range

#: the normalised excess risk of a task whose baseline is exactly zero (it then has a gradient: weight it fully)
RATIO_CAP = 1e12


def excess_risks(grads: Tensor, sq_sum: Tensor, eps: float) -> Tensor:
    """E_t = Σ_j g_tj² / √(S_tj + ε) per task (float64), for gradients g [m, P] and the accumulated S."""
    return (grads.double().square() / (sq_sum.double() + eps).sqrt()).sum(dim=1)


def excess_weights(weights: Tensor, excess: Tensor, baseline: Tensor, step_size: float) -> Tensor:
    """One exponentiated step α ∝ α · exp(η E / E⁰) on the simplex, in log space (no overflow)."""
    ratio = torch.nan_to_num(excess / baseline, nan=0.0, posinf=RATIO_CAP)
    return torch.softmax(weights.clamp_min(torch.finfo(weights.dtype).tiny).log() + step_size * ratio, dim=0)


class ExcessMTL(SharedGradientBalancer):
    """ExcessMTL: Σ_t α_t L_t + k0·L0, α on the simplex raised by each task's normalised excess risk.

    `step_size` is η (1e-2, the authors' code), `warmup_steps` the steps whose mean excess risk
    becomes the baseline E⁰ (0: the first step's), `eps` the ε of the diagonal Hessian. `k` is
    validated but unused (α starts uniform).
    """

    name = "excess_mtl"
    state_buffers = ("sq_sum",)
    _mode_reason = "accumulates squared task gradients of the shared parameters across steps"

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 step_size: float = 1e-2, warmup_steps: int = 0, eps: float = 1e-7, mode: str = "params") -> None:
        super().__init__(tasks, k0, k, mode)
        self.step_size = check_range("step_size", step_size, 0.0, low_open=True,
                                     hint=" (the exponentiated-gradient step η of the task weights)")
        self.warmup_steps = check_count("warmup_steps", warmup_steps, 0)
        self.eps = check_range("eps", eps, 0.0, low_open=True)
        m = len(self.tasks)
        self.register_buffer("weights", torch.full((m,), 1.0 / m, dtype=torch.float64))
        self.register_buffer("baseline", torch.full((m,), float("nan"), dtype=torch.float64))
        self.register_buffer("warmup_sum", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("excess", torch.full((m,), float("nan"), dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Accumulate S, estimate this step's excess risks, and move α (or collect the baseline)."""
        self.sq_sum.add_(rows.square())
        excess = excess_risks(rows, self.sq_sum, self.eps)
        self.excess.copy_(excess)
        self.step += 1
        step = int(self.step)
        if step <= self.warmup_steps:
            self.warmup_sum.add_(excess)
            if step == self.warmup_steps:
                self.baseline.copy_(self.warmup_sum / self.warmup_steps)
            return
        if bool(torch.isnan(self.baseline).any()):  # no warm-up: the first estimate is the scale (ratio 1: no move)
            self.baseline.copy_(excess)
            return
        self.weights.copy_(self.same_on_every_rank(excess_weights(self.weights, excess, self.baseline,
                                                                  self.step_size)))

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        grads = self.step_gradients(list(stacked), ctx)
        if self.training:
            self.update(grads.shared_rows)
        weights = self.weights.to(stacked)
        with torch.no_grad():
            direction = weights @ grads.shared_rows
        return self.add_penalty(self.surrogate(grads, direction, weights, (weights * stacked).sum()), penalty)

    def state_summary(self) -> dict[str, float]:
        summary = self.weights_summary(self.weights)
        if not torch.isnan(self.excess).any():
            summary.update(self.weights_summary(self.excess, "excess"))
        return summary
