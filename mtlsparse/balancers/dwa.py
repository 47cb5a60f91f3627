"""Dynamic Weight Average (Liu et al., CVPR 2019).

w_t(e) = m · softmax_t(r(e−1) / T) with r_t(e−1) = L_t(e−1) / L_t(e−2), the ratio of the
task's epoch-mean training losses over the two previous epochs: a task whose loss falls
more slowly gets more weight. w = 1 for the first two epochs (no ratio yet); Σ_t w_t = m.
The preference `k` is not used (the paper has none).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext, Balancer, LossMeter
from mtlsparse.training_state import TrainingState


class DWA(Balancer):
    """Σ_t w_t L_t + k0·L0 with w from the last two epochs' loss ratios at temperature T.

    Loss history, the number of epochs recorded and the weights are persistent buffers,
    so a resumed run continues with the same weights.
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 temperature: float = 2.0) -> None:
        super().__init__(tasks, k0, k)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        m = len(self.tasks)
        self.register_buffer("w", torch.ones(m))
        self.register_buffer("history", torch.zeros(2, m))  # epoch-mean losses: [L(e−1), L(e−2)]
        self.register_buffer("epochs_recorded", torch.zeros((), dtype=torch.long))
        self.meter = LossMeter(m)

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        vec = self.stack(losses)
        if self.training:
            self.meter.add(vec)
        return self.add_penalty((self.w * vec).sum(), penalty)

    @torch.no_grad()
    def on_train_epoch_end(self, state: TrainingState) -> None:
        """Record this epoch's mean losses and set the weights for the next epoch."""
        mean_losses = self.meter.pop_mean()
        if mean_losses is None:
            return
        self.history.copy_(torch.stack([mean_losses, self.history[0]]))
        self.epochs_recorded += 1
        if self.epochs_recorded >= 2:
            # a loss of exactly 0 (a task with no examples) would divide by zero
            ratios = self.history[0] / self.history[1].clamp_min(torch.finfo(self.history.dtype).tiny)
            self.w.copy_(len(self.tasks) * torch.softmax(ratios / self.temperature, dim=0))

    def state_summary(self) -> dict[str, float]:
        return {f"w/{t}": float(w) for t, w in zip(self.tasks, self.w)}
