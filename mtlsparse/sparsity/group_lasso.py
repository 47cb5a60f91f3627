"""Channel-wise group lasso (Upadhyay et al., seed 003) solved by proximal Adam.

Objective Σ k_t L_t + λ Σ_g √|g| ‖W_g‖₂ with one group per input channel of each
prunable conv/linear weight. After every optimizer step each group gets the prox of
τ‖·‖₂, τ = lr·λ·√|g|: either the plain Euclidean prox (`prox: plain`) or the prox in
Adam's own metric D = √v̂ + eps (`prox: adam`), which matches the preconditioned step.
The penalty's subgradient is not added to the loss (unless the balancer's k0 > 0).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlsparse.sparsity.base import param_state
from mtlsparse.sparsity.layers import group_norms
from mtlsparse.sparsity.prox import group_prox_, group_prox_metric_
from mtlsparse.sparsity.prox_method import ProxMethod

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

    def __init__(self, lam: float = 0.0, prox: str = "adam", finetune_epochs: int = 0,
                 include_input_layers: bool = False, include_heads: bool = False) -> None:
        super().__init__(lam, finetune_epochs, include_input_layers, include_heads)
        if prox not in PROX_VARIANTS:
            raise ValueError(f"method.prox must be one of {PROX_VARIANTS}, got '{prox}'")
        self.prox = prox

    def penalty(self) -> Tensor | None:
        return self.lam * sum(math.sqrt(layer.group_size) * group_norms(layer.weight).sum() for layer in self.layers)

    def prox_(self, optimizer: torch.optim.Optimizer) -> None:
        state = param_state(optimizer)
        for layer in self.layers:
            group, pstate = state[id(layer.weight)]
            tau = group["lr"] * self.lam * math.sqrt(layer.group_size)
            if self.prox == "plain":
                group_prox_(layer.weight, tau)
            else:
                group_prox_metric_(layer.weight, tau, adam_metric(group, pstate))
