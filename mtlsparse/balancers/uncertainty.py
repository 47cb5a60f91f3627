"""Homoscedastic uncertainty weighting (Kendall et al., 2018)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlsparse.balancers.base import BalanceContext, Balancer


class Uncertainty(Balancer):
    """Σ_t exp(−s_t)·L_t + s_t + k0·L0 with learnable log-variances s_t.

    s_t are parameters of this module, so the optimizer updates them (the reference
    code for seed 003 never optimised them). `k` is not used: the weights are learned.
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 init_log_var: float = 0.0) -> None:
        super().__init__(tasks, k0, k)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        loss = (torch.exp(-self.log_vars) * self.stack(losses) + self.log_vars).sum()
        return self.add_penalty(loss, penalty)

    def state_summary(self) -> dict[str, float]:
        return {f"w/{t}": float(torch.exp(-s)) for t, s in zip(self.tasks, self.log_vars.detach())}
