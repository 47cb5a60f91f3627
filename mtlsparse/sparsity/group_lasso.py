"""Channel-wise group lasso (Upadhyay et al., seed 003) solved by proximal Adam.

Objective Σ k_t L_t + λ Σ_g √|g| ‖W_g‖₂ with one group per input channel of each
prunable conv/linear weight. After every optimizer step each group gets the prox of
τ‖·‖₂, τ = lr·λ·√|g|: either the plain Euclidean prox (`prox: plain`) or the prox in
Adam's own metric D = √v̂ + eps (`prox: adam`), which matches the preconditioned step.
The penalty's subgradient is not added to the loss (unless the balancer's k0 > 0).

`couple_norms: true` adds each group's producer BatchNorm γ_c, β_c to the group (see
`norm_coupling`): without it BN's free scale keeps a conv's input groups alive, so only
FC features and whole conv outputs go, and the compute-heavy early channels stay.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlsparse.channel_groups import ChannelGroups, group_norms, stack_groups
from mtlsparse.sparsity.base import param_state
from mtlsparse.sparsity.dead_rows import check_tolerance
from mtlsparse.sparsity.norm_coupling import GroupCoupling
from mtlsparse.sparsity.prox import group_prox_, group_prox_metric_
from mtlsparse.sparsity.prox_method import ProxMethod
from mtlsparse.sparsity.scope import ScopeLike
from mtlsparse.training_state import TrainingState

PROX_VARIANTS = ("plain", "adam")


def adam_metric(group: dict, state: dict) -> Tensor:
    """Adam's diagonal preconditioner D = √(v / (1 − β₂ᵗ)) + eps for one parameter."""
    if "exp_avg_sq" not in state:
        raise ValueError("method.prox=adam needs an Adam-family optimizer (optimizer=adam or adamw); "
                         "use method.prox=plain with other optimizers")
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    step = float(state["step"])
    return (v / (1 - group["betas"][1] ** step)).sqrt() + group["eps"]


class GroupLasso(ProxMethod):
    """Proximal-Adam channel group lasso on the prunable layers (shared trunk by default)."""

    structured = True

    def __init__(self, lam: float = 0.0, prox: str = "adam", finetune_fraction: float = 0.0,
                 finetune_epochs: int | None = None, scope: ScopeLike = None,
                 couple_norms: bool = False, dead_tol: float = 0.0, warmup_fraction: float = 0.0,
                 warmup_epochs: int | None = None, freeze_at_sparsity: float | None = None,
                 refit_optimizer: str = "continue") -> None:
        super().__init__(lam, finetune_fraction, finetune_epochs, scope, warmup_fraction, warmup_epochs,
                         freeze_at_sparsity, refit_optimizer)
        self.dead_tol = check_tolerance(dead_tol)
        if prox not in PROX_VARIANTS:
            raise ValueError(f"method.prox must be one of {PROX_VARIANTS}, got '{prox}'")
        self.prox = prox
        self.coupling = GroupCoupling(couple_norms)

    def on_fit_start(self, state: TrainingState) -> None:
        self.coupling.couple_at_fit_start(state, self.layers, type(self).__name__)
        super().on_fit_start(state)

    def channel_groups(self) -> list[ChannelGroups]:
        return [self.coupling.groups(layer) for layer in self.layers]

    def penalty(self) -> Tensor | None:
        return self.lam * sum(math.sqrt(groups.size) * group_norms(groups.stacked()).sum()
                              for groups in self.channel_groups())

    def prox_(self, optimizer: torch.optim.Optimizer) -> None:
        state = param_state(optimizer)
        for groups in self.channel_groups():
            tau = state[id(groups.weight)][0]["lr"] * self.strength * math.sqrt(groups.size)
            target = groups.stacked()
            self._prox_tensor_(target, tau, state, groups.tensors)
            groups.write_back_(target)

    def _prox_tensor_(self, target: Tensor, tau: float, state: dict, tensors: list[Tensor]) -> None:
        """Group prox of `target` (the weight, or the stacked groups of `tensors`) in place."""
        if self.prox == "plain":
            group_prox_(target, tau)
            return
        metrics = [adam_metric(*state[id(t)]) for t in tensors]
        group_prox_metric_(target, tau, metrics[0] if len(metrics) == 1 else stack_groups(metrics))
