"""Modified weighted Chebyshev scalarisation by an Augmented Lagrangian (Hotegni et al.; docs/methods/growl_mdmtn.md).

The multi-objective problem min (f_0, f_1..f_m) — f_0 the sparsity objective, f_i the
task losses — becomes, for a preference vector k = (k_0, k_1..k_m) and reference point a,

    min t   s.t.   H_i = k_i [(f_i − a_i) + ε Σ_j (f_j − a_j)] − t ≤ 0,   i = 0..m,

whose solutions are exactly the properly Pareto-optimal points. Each training step
minimises the Augmented Lagrangian L_A = t + λᵀH + (μ/2)‖H‖² over the weights and t;
after every outer iteration of `epochs_per_iteration` epochs the multipliers move:
λ ← λ + μ·H̄ (H̄ = mean H of the last epoch), μ ← ρ·μ.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlsparse.balancers.base import BalanceContext, Balancer, LossMeter
from mtlsparse.training_state import PhaseStarted, TrainingState

SPARSITY_NAME = "L0"


class Chebyshev(Balancer):
    """Chebyshev + Augmented Lagrangian balancer; `t` is learned, λ and μ are checkpointed buffers.

    Defaults follow the paper: a = 0, ε = 1e-4, λ_0 = 1/(m+1), μ_0 = 2.5e-8 (MultiMNIST;
    6.8e-8 for Cifar10Mnist), ρ = 2, 3 epochs per outer iteration. `inequality=True`
    (default) uses the multiplier update of inequality constraints, λ ← max(0, λ + μH̄):
    the constraints are H ≤ 0, and a negative λ_i would reward *raising* objective i.
    With the paper's μ scale the clamp practically never binds, so results match the
    paper's equality-form update; `inequality=False` reproduces it exactly.
    Without a sparsity objective (`penalty` None) f_0 − a_0 is taken as 0 and k_0 as 0.
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None,
                 reference: Sequence[float] | None = None, eps: float = 1e-4, t_init: float = 0.0,
                 mu0: float = 2.5e-8, rho: float = 2.0, epochs_per_iteration: int = 3,
                 inequality: bool = True) -> None:
        super().__init__(tasks, k0, k)
        n = len(self.tasks) + 1
        reference = [0.0] * n if reference is None else [float(v) for v in reference]
        if len(reference) != n:
            raise ValueError(f"reference has {len(reference)} entries; it needs one per objective "
                             f"(sparsity + {len(self.tasks)} tasks = {n})")
        if eps < 0 or mu0 <= 0 or rho <= 0:
            raise ValueError(f"need eps >= 0, mu0 > 0 and rho > 0, got eps={eps}, mu0={mu0}, rho={rho}")
        if epochs_per_iteration < 1:
            raise ValueError(f"epochs_per_iteration must be >= 1, got {epochs_per_iteration}")
        self.eps, self.mu0, self.rho = float(eps), float(mu0), float(rho)
        self.epochs_per_iteration, self.inequality = int(epochs_per_iteration), bool(inequality)
        self.t = nn.Parameter(torch.tensor(float(t_init)))
        self.register_buffer("reference", torch.tensor(reference), persistent=False)
        self.register_buffer("lambdas", torch.full((n,), 1.0 / n))
        self.register_buffer("mu", torch.tensor(float(mu0)))
        self.register_buffer("h_mean", torch.zeros(n), persistent=False)  # H̄ of the last epoch, for logging
        self._h_meter = LossMeter(n)  # this epoch's H, averaged over steps and DDP ranks
        self._restarted_after: int | None = None  # epoch whose end restarted the AL (its update is skipped)

    @property
    def objective_names(self) -> list[str]:
        """Names of f_0..f_m, used as log keys."""
        return [SPARSITY_NAME, *self.tasks]

    def constraints(self, losses: dict[str, Tensor], penalty: Tensor | None) -> Tensor:
        """The vector H(x, t) of the m+1 Chebyshev constraints."""
        task_gaps = self.stack(losses) - self.reference[1:]
        k0 = self.k0 if penalty is not None else 0.0
        sparsity_gap = (penalty - self.reference[0]) if penalty is not None else task_gaps.new_zeros(())
        gaps = torch.cat([sparsity_gap.reshape(1).to(task_gaps), task_gaps])
        weights = torch.cat([self.k.new_tensor([k0]), self.k])
        return weights * (gaps + self.eps * gaps.sum()) - self.t

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        h = self.constraints(losses, penalty)
        if self.training:
            self._h_meter.add(h)
        return self.t + self.lambdas @ h + 0.5 * self.mu * h.square().sum()

    def on_train_epoch_end(self, state: TrainingState) -> None:
        """Store this epoch's H̄; at the end of an outer iteration update λ and μ."""
        h_mean = self._h_meter.pop_mean()  # same on every rank, hence the same λ, μ
        if h_mean is None:
            return
        self.h_mean.copy_(h_mean)
        if self._restarted_after == state.epoch:
            return  # the restart at this epoch's end already set λ, μ
        if (state.epoch + 1) % self.epochs_per_iteration == 0:
            lambdas = self.lambdas + self.mu * self.h_mean
            self.lambdas.copy_(lambdas.clamp_min(0) if self.inequality else lambdas)
            self.mu.mul_(self.rho)

    def on_phase_started(self, event: PhaseStarted) -> None:
        """Phase 2 (retraining the fixed support) restarts the AL, as Algorithm 1 does."""
        if event.phase == 2:
            self.reset_multipliers(after_epoch=event.epoch)

    def reset_multipliers(self, after_epoch: int) -> None:
        """Restart the AL at λ = 1/(m+1), μ = μ_0 at the end of `after_epoch`, whose update is then skipped.

        Whichever of the restart and this epoch's `on_train_epoch_end` comes first, the epoch
        ends with the restarted multipliers.
        """
        self.lambdas.fill_(1.0 / self.lambdas.numel())
        self.mu.fill_(self.mu0)
        self._restarted_after = after_epoch

    def state_summary(self) -> dict[str, float]:
        summary = {"t": float(self.t.detach()), "mu": float(self.mu)}
        for name, lam, h in zip(self.objective_names, self.lambdas.tolist(), self.h_mean.tolist()):
            summary[f"lambda/{name}"] = lam
            summary[f"H/{name}"] = h
        return summary
