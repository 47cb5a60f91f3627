"""Unstructured ℓ1 regularisation solved by proximal gradient (soft thresholding)."""
from __future__ import annotations

import torch
from torch import Tensor

from mtlsparse.sparsity.base import param_state
from mtlsparse.sparsity.prox import soft_threshold_
from mtlsparse.sparsity.prox_method import ProxMethod


class L1(ProxMethod):
    """Objective Σ k_t L_t + λ‖W‖₁ on the prunable layers; prox threshold lr·λ after every step (λ: warm-up ramp)."""

    def penalty(self) -> Tensor | None:
        return self.lam * sum(layer.weight.abs().sum() for layer in self.layers)

    def prox_(self, optimizer: torch.optim.Optimizer) -> None:
        state = param_state(optimizer)
        for layer in self.layers:
            group, _ = state[id(layer.weight)]
            soft_threshold_(layer.weight, group["lr"] * self.strength)
