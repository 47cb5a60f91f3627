"""Unstructured ℓ1 regularisation solved by proximal gradient (soft thresholding)."""
from __future__ import annotations

import torch
from torch import Tensor

from mtlsparse.sparsity.base import SparsityMethod, param_state
from mtlsparse.sparsity.prox import soft_threshold_


class L1(SparsityMethod):
    """Objective Σ k_t L_t + λ‖W‖₁ on the prunable layers; prox threshold lr·λ after every step."""

    family = "prox"

    def __init__(self, lam: float = 0.0, include_input_layers: bool = False, include_heads: bool = False) -> None:
        super().__init__(include_input_layers, include_heads)
        if lam < 0:
            raise ValueError(f"method.lam must be >= 0, got {lam}")
        self.lam = float(lam)

    def penalty(self) -> Tensor | None:
        return self.lam * sum(layer.weight.abs().sum() for layer in self.layers)

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.lam == 0:
            return
        state = param_state(optimizer)
        for layer in self.layers:
            group, _ = state[id(layer.weight)]
            soft_threshold_(layer.weight, group["lr"] * self.lam)
