"""DB-MTL, dual-balancing multi-task learning (Lin et al., 2023).

B. Lin, W. Jiang, F. Ye, Y. Zhang, P. Chen, Y.-C. Chen, S. Liu, I. W. Tsang, J. T. Kwok,
*Dual-Balancing for Multi-Task Learning*, arXiv:2308.12029 (2023; Neural Networks). Two
balancing steps, one on the losses and one on the gradients of the shared parameters θ:

1. loss-scale balancing: each task loss is replaced by its logarithm, log(L_t + ε), whose
   gradient ∇L_t / L_t does not change when a task's loss is multiplied by a constant;
2. gradient-magnitude balancing: a moving average of each task's log-loss gradient,
   ĝ_t ← β_k ĝ_t + (1 − β_k) ∇_θ log(L_t + ε) (ĝ_t starts at 0, β_k = β / k^σ at step k),
   then every task's ĝ_t is rescaled to the largest norm:

       d = Σ_t (max_s ‖ĝ_s‖ / ‖ĝ_t‖) ĝ_t,

   so each task contributes a vector of the same length, the length of the largest one.

The shared parameters step along d; each task-specific parameter along its task's log-loss
gradient (ψ_t ← ψ_t − η ∇_ψ log L_t). ĝ (m × P, P = trainable shared parameters) and the step
counter are persistent buffers; under DDP ĝ is built from the rank-averaged gradients, so it is
the same on every rank. Only `mode=params` (ĝ averages gradients of different batches).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext
from mtlsparse.balancers.task_state import SharedGradientBalancer, check_range, decayed


def max_norm_direction(grads: Tensor) -> tuple[Tensor, Tensor]:
    """(d, scales): d = Σ_t s_t g_t with s_t = max_u ‖g_u‖ / ‖g_t‖, so every s_t g_t has the largest norm.

    A task whose moving average is exactly zero contributes nothing (its scale is irrelevant).
    """
    norms = grads.double().norm(dim=1)
    scales = norms.max() / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return scales.to(grads.dtype) @ grads, scales


class DBMTL(SharedGradientBalancer):
    """DB-MTL: log losses, moving averages of their shared gradients, each rescaled to the largest norm; + k0·L0.

    `beta` is the moving-average weight β of the old average (0.9), `beta_sigma` its decay σ in
    β_k = β / k^σ (0: constant), `eps` the ε inside log(L + ε). `k` is validated but unused.
    The returned value (logged as train/loss) is Σ_t log(L_t + ε).
    """

    name = "db_mtl"
    state_buffers = ("average",)
    _mode_reason = "keeps a moving average of each task's gradient of the shared parameters across steps"

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None, beta: float = 0.9,
                 beta_sigma: float = 0.0, eps: float = 1e-8, mode: str = "params") -> None:
        super().__init__(tasks, k0, k, mode)
        self.beta = check_range("beta", beta, 0.0, 1.0, high_open=True, hint=" (the weight of the old average)")
        self.beta_sigma = check_range("beta_sigma", beta_sigma, 0.0)
        self.eps = check_range("eps", eps, 0.0, low_open=True)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("norms", torch.full((len(self.tasks),), float("nan"), dtype=torch.float64),
                             persistent=False)

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        log_losses = (self.stack(losses) + self.eps).log()
        grads = self.step_gradients(list(log_losses), ctx)
        with torch.no_grad():
            average = self.average
            if self.training:
                self.step += 1
                beta = decayed(self.beta, self.beta_sigma, int(self.step))
                average.mul_(beta).add_(grads.shared_rows, alpha=1 - beta)
            direction, _ = max_norm_direction(average)
            self.norms.copy_(average.double().norm(dim=1))
        heads = torch.ones(len(self.tasks), dtype=log_losses.dtype, device=log_losses.device)
        return self.add_penalty(self.surrogate(grads, direction, heads, log_losses.sum()), penalty)

    def state_summary(self) -> dict[str, float]:
        if torch.isnan(self.norms).any():
            return {}
        return self.weights_summary(self.norms, "grad_norm")
