"""Linear scalarisation: Σ k_t L_t + k0·L0."""
from __future__ import annotations

from torch import Tensor

from mtlsparse.balancers.base import BalanceContext, Balancer


class Linear(Balancer):
    """Fixed preference-weighted sum of task losses (plus the weighted sparsity objective)."""

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        return self.add_penalty((self.k * self.stack(losses)).sum(), penalty)

    def state_summary(self) -> dict[str, float]:
        return {f"w/{t}": float(w) for t, w in zip(self.tasks, self.k)}
