"""Min–max task weighting (Guo et al.): min over the model, max over task weights on the simplex.

The model minimises Σ_t w_t L_t (+ k0·L0) with w held fixed during each step; between
updates w ascends the regularised objective Σ_t w_t L̄_t − (γ/2)‖w − 1/m‖², where L̄ are
the mean task losses seen since the last update:

    w ← Π_Δ(w + (L̄ − γ(w − 1/m)) / β)

so tasks that keep a large loss gain weight, while γ pulls w back to uniform. The
preference `k` is not used (the paper has none: w *is* the adversary's preference).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext, Balancer, LossMeter
from mtlsparse.training_state import TrainingState


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of v (last dim) onto the probability simplex {w ≥ 0, Σ w = 1}.

    Sort-based algorithm (Held et al. 1974; Duchi et al. 2008): the projection is
    max(v − θ, 0) with θ chosen so the result sums to one; θ is found from the sorted v.
    """
    u = torch.sort(v, dim=-1, descending=True).values
    cumsum = u.cumsum(dim=-1) - 1
    ranks = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    support = (u - cumsum / ranks > 0).sum(dim=-1, keepdim=True)  # the condition holds on a prefix
    theta = cumsum.gather(-1, support - 1) / support.to(v.dtype)
    return (v - theta).clamp_min(0)


def parse_update_every(update_every: int | str) -> int | None:
    """`"epoch"` → None (update at epoch end); a positive int N → update every N training steps."""
    if update_every == "epoch":
        return None
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be 'epoch' or a positive number of steps, got {update_every!r}")
    return update_every


class MinMax(Balancer):
    """Σ_t w_t L_t + k0·L0 with w on the simplex, raised by projected gradient ascent.

    `beta` is the inverse ascent step size, `gamma` the strength of the pull to uniform
    weights, `update_every` either "epoch" (once per epoch, before validation) or a number
    of training steps. w is a persistent buffer (checkpointed, identical on DDP ranks).
    The losses are accumulated on all ranks and averaged over them at each update.
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 beta: float = 50.0, gamma: float = 5.0, update_every: int | str = "epoch") -> None:
        super().__init__(tasks, k0, k)
        if beta <= 0:
            raise ValueError(f"beta must be > 0 (inverse ascent step size), got {beta}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0 (pull towards uniform weights), got {gamma}")
        self.beta, self.gamma = float(beta), float(gamma)
        self.every_n_steps = parse_update_every(update_every)
        m = len(self.tasks)
        self.register_buffer("w", torch.full((m,), 1.0 / m))
        self.meter = LossMeter(m)

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        vec = self.stack(losses)
        loss = self.add_penalty((self.w.clone() * vec).sum(), penalty)  # clone: update() may change w in place
        if self.training:
            self.meter.add(vec)
            if self.every_n_steps is not None and self.meter.count >= self.every_n_steps:
                self.update()
        return loss

    @torch.no_grad()
    def update(self) -> None:
        """One projected ascent step on w from the mean losses since the last update (no-op if none)."""
        mean_losses = self.meter.pop_mean()
        if mean_losses is None:
            return
        uniform = 1.0 / len(self.tasks)
        self.w.copy_(project_simplex(self.w + (mean_losses - self.gamma * (self.w - uniform)) / self.beta))

    def on_train_epoch_end(self, state: TrainingState) -> None:
        if self.every_n_steps is None:
            self.update()

    def state_summary(self) -> dict[str, float]:
        return {f"w/{t}": float(w) for t, w in zip(self.tasks, self.w)}
