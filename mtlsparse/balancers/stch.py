"""STCH, smooth Tchebycheff scalarisation (Lin et al., ICML 2024).

X. Lin, X. Zhang, Z. Yang, F. Liu, Z. Wang, Q. Zhang, *Smooth Tchebycheff Scalarization for
Multi-Objective Optimization*, ICML 2024 (arXiv:2402.19078). For objectives f_i, preference
λ on the simplex and ideal point z*, the smooth Tchebycheff scalarisation is

    g_μ(x | λ) = μ · log Σ_i exp(λ_i (f_i(x) − z_i*) / μ),

a log-sum-exp smoothing of the Tchebycheff max_i λ_i (f_i − z_i*): it lies between the max
and the max + μ log m, so it tends to the Tchebycheff scalarisation as μ → 0, and its gradient
Σ_i softmax_i(λ(f − z*)/μ) λ_i ∇f_i weights the currently worst objective most.

For multi-task learning the authors' code (ported in LibMTL) scalarises the log losses
normalised by a nadir point, f_i = log(L_i / L̄_i), after a warm-up: during the warm-up the
model minimises the log losses (here Σ_i λ_i log L_i, the μ → ∞ limit's direction), and L̄ is
the mean training loss of the last warm-up epoch (averaged over DDP ranks). The warm-up ends
at a point of the run (`warmup_fraction`, default 0.025: 5 of 200 epochs as in the authors'
runs; or an explicit `warmup_epoch`); an explicit `nadir` skips it. λ is the top-level
preference `k` (default uniform 1/m). L̄ is a persistent buffer, so a resumed run keeps it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.balancers.base import BalanceContext, Balancer, LossMeter
from mtlsparse.balancers.task_state import check_range
from mtlsparse.errors import ConfigError
from mtlsparse.training_state import TrainingState

#: added to each loss before its log, as the authors' code does (a loss of exactly 0 stays finite)
LOG_EPS = 1e-20


def warmup_point(fraction: float, max_epochs: int) -> int:
    """0-based epoch at whose end `fraction` of the run is done: round(f·N) − 1 in 0..N−1.

    The schedule convention of mtlsparse.sparsity.budget (which balancers may not import), so
    a warm-up fraction means the same as a method's schedule fraction.
    """
    return min(max(math.floor(fraction * max_epochs + 0.5 + 1e-9) - 1, 0), max_epochs - 1)


def smooth_tchebycheff(values: Tensor, preference: Tensor, mu: float, ideal: Tensor | None = None) -> Tensor:
    """μ log Σ_i exp(λ_i (f_i − z_i*) / μ), computed stably (logsumexp)."""
    shifted = values if ideal is None else values - ideal
    return mu * torch.logsumexp(preference * shifted / mu, dim=0)


class STCH(Balancer):
    """Smooth Tchebycheff scalarisation of the nadir-normalised log losses, after a log-loss warm-up; + k0·L0.

    `mu` is the smoothing μ > 0 (small: close to Tchebycheff; large: close to the λ-weighted
    mean of the log losses). With uniform λ = 1/m on two tasks the default μ = 0.5 gives the
    authors' MTL setting (their λ_i = 1, μ = 1: the same softmax weights, a 4× larger loss).
    """

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None, mu: float = 0.5,
                 warmup_fraction: float = 0.025, warmup_epoch: int | None = None,
                 nadir: Sequence[float] | None = None) -> None:
        super().__init__(tasks, k0, k)
        self.mu = check_range("mu", mu, 0.0, low_open=True, hint=" (the smoothing of the max; e.g. 0.1 or 1.0)")
        self.warmup_fraction = check_range("warmup_fraction", warmup_fraction, 0.0, 1.0,
                                           hint=" (a fraction of trainer.max_epochs)")
        if warmup_epoch is not None and (isinstance(warmup_epoch, bool) or not isinstance(warmup_epoch, int)
                                         or warmup_epoch < 0):
            raise ConfigError(f"balancer.warmup_epoch must be null or an integer epoch >= 0, got {warmup_epoch!r}; "
                              "give a fraction of the run as balancer.warmup_fraction instead")
        self.warmup_epoch = warmup_epoch
        m = len(self.tasks)
        start = torch.full((m,), float("nan"), dtype=torch.float64)
        if nadir is not None:
            values = [float(v) for v in nadir]
            if len(values) != m or not all(v > 0 for v in values):
                raise ConfigError(f"balancer.nadir needs one positive loss per task ({m}: {self.tasks}), got "
                                  f"{list(nadir)}; or null to measure it in a warm-up")
            start = torch.tensor(values, dtype=torch.float64)
        self.register_buffer("nadir", start)  # L̄: NaN while warming up
        self.meter = LossMeter(m)

    @property
    def warming_up(self) -> bool:
        """Whether the nadir point is still unknown (the model minimises the log losses meanwhile)."""
        return bool(torch.isnan(self.nadir).any())

    def warmup_last_epoch(self, max_epochs: int | None) -> int:
        """The 0-based epoch whose mean training losses become the nadir point."""
        budget = int(max_epochs) if max_epochs is not None and int(max_epochs) >= 1 else None
        if self.warmup_epoch is not None:
            if budget is not None and self.warmup_epoch >= budget:
                raise ConfigError(f"balancer.warmup_epoch={self.warmup_epoch} is past the last epoch of "
                                  f"trainer.max_epochs={budget} (epochs 0..{budget - 1}), so STCH would never start: "
                                  "lower it, or drop it (balancer.warmup_epoch=null) to use balancer.warmup_fraction")
            return self.warmup_epoch
        if budget is None:
            raise ConfigError("balancer.warmup_fraction is a fraction of trainer.max_epochs, which is unbounded here: "
                              "set trainer.max_epochs or give balancer.warmup_epoch (or balancer.nadir) explicitly")
        return warmup_point(self.warmup_fraction, budget)

    def on_fit_start(self, state: TrainingState) -> None:
        """A warm-up that cannot end within trainer.max_epochs fails now, not at the end of an epoch."""
        if self.warming_up:
            self.warmup_last_epoch(state.max_epochs)

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        stacked = self.stack(losses)
        log_losses = (stacked + LOG_EPS).log()
        preference = self.k.to(stacked)
        if self.warming_up:
            if self.training:
                self.meter.add(stacked.detach())
            value = (preference * log_losses).sum()
        else:
            value = smooth_tchebycheff(log_losses, preference, self.mu, self.nadir.log().to(stacked))
        return self.add_penalty(value, penalty)

    @torch.no_grad()
    def on_train_epoch_end(self, state: TrainingState) -> None:
        """At the end of the warm-up's last epoch, that epoch's mean training losses become the nadir point."""
        if not self.warming_up:
            return
        mean = self.meter.pop_mean()  # every rank warms up alike, so every rank reaches this collective
        if mean is not None and state.epoch >= self.warmup_last_epoch(state.max_epochs):
            self.nadir.copy_(mean.double().clamp_min(torch.finfo(torch.float64).tiny))

    def state_summary(self) -> dict[str, float]:
        summary = {"warmup": float(self.warming_up)}
        if not self.warming_up:
            summary.update({f"nadir/{t}": float(v) for t, v in zip(self.tasks, self.nadir)})
        return summary
