"""GLS, the geometric loss strategy (Chennupati et al., CVPR Workshops 2019).

S. Chennupati, G. Sistu, S. Yogamani, S. A. Rawashdeh, *MultiNet++: Multi-Stream Feature
Aggregation and Geometric Loss Strategy for Multi-Task Learning*, CVPR Workshops 2019
(arXiv:1904.08492). The model minimises the geometric mean of the task losses,

    L_GLS = (Π_t L_t)^(1/m),   ∂L_GLS/∂L_t = L_GLS / (m·L_t),

so each task's gradient is scaled by the inverse of its own loss: the update is invariant to
rescaling any one task's loss, and a task whose loss is small relative to the others gets a
larger weight. Computed as exp(mean_t log L_t), which does not overflow or underflow for many
tasks. Losses must be positive (cross-entropy, L1, ...); a loss of exactly 0 is clamped to the
smallest positive float, where the geometric mean's gradient vanishes instead of becoming NaN.
No per-task gradients, so it works with every model; no state.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext, Balancer


def geometric_mean(losses: Tensor) -> Tensor:
    """(Π_t L_t)^(1/m) of a loss vector, as exp(mean log L) (zeros clamped to the smallest positive float)."""
    return losses.clamp_min(torch.finfo(losses.dtype).tiny).log().mean().exp()


class GLS(Balancer):
    """(Π_t L_t)^(1/m) + k0·L0. `k` is validated but unused (the paper's strategy has no preference)."""

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None) -> None:
        super().__init__(tasks, k0, k)
        self.register_buffer("weights", torch.full((len(self.tasks),), float("nan")), persistent=False)

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        value = geometric_mean(stacked)
        with torch.no_grad():  # the effective task weights ∂L_GLS/∂L_t, for the log
            self.weights.copy_(value.detach() / (len(self.tasks) * stacked.detach().clamp_min(
                torch.finfo(stacked.dtype).tiny)))
        return self.add_penalty(value, penalty)

    def state_summary(self) -> dict[str, float]:
        if torch.isnan(self.weights).any():
            return {}
        return {f"w/{t}": float(w) for t, w in zip(self.tasks, self.weights)}
