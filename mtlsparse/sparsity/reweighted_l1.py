"""Reweighted ℓ1 pruning (Guo et al., METHODS.md §3): pretrain → reweighted ℓ1 → prune → retrain.

Stages are counted in epochs (0-based epoch e): `pretrain` while e < pretrain_epochs,
`reweight` for the next reweight_epochs, `retrain` afterwards. In the reweight stage
the objective gains c·Σ|W ⊙ R| with R = 1/(|W_prev| + δ); it is minimised by a proximal
step after every optimizer step (soft threshold with per-weight τ = lr·c·R), so it acts
with every balancer, whatever k0. R is taken when the stage starts and refreshed after
every `refresh_every` reweight epochs. When the stage ends the weights are hard-pruned
by magnitude to the target and the rest of training is a masked retrain.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.allocation import check_allocation
from mtlsparse.sparsity.base import param_state
from mtlsparse.sparsity.magnitude import magnitude_prune_
from mtlsparse.sparsity.masks import MaskedMethod
from mtlsparse.sparsity.prox import soft_threshold_

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L

STAGES = ("pretrain", "reweight", "retrain")


class ReweightedL1(MaskedMethod):
    """Guo et al.'s reweighted-ℓ1 pruning pipeline; stage boundaries at epoch ends."""

    family = "prune"

    def __init__(self, sparsity: float = 0.0, c: float = 1e-7, delta: float = 1e-6, pretrain_epochs: int = 5,
                 reweight_epochs: int = 10, refresh_every: int = 2, allocation: str = "uniform",
                 include_input_layers: bool = False, include_heads: bool = False) -> None:
        super().__init__(sparsity, include_input_layers, include_heads)
        if c < 0 or delta <= 0:
            raise ValueError(f"need method.c >= 0 and method.delta > 0, got c={c}, delta={delta}")
        if min(pretrain_epochs, reweight_epochs) < 0 or refresh_every < 1:
            raise ValueError("need method.pretrain_epochs >= 0, method.reweight_epochs >= 0, "
                             f"method.refresh_every >= 1, got {pretrain_epochs}, {reweight_epochs}, {refresh_every}")
        self.c, self.delta = float(c), float(delta)
        self.pretrain_epochs, self.reweight_epochs, self.refresh_every = pretrain_epochs, reweight_epochs, refresh_every
        self.allocation = check_allocation(allocation)
        self.register_buffer("epochs_done", torch.tensor(0))

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        for i, layer in enumerate(self.layers):
            self.register_buffer(f"reweight{i}", torch.ones_like(layer.weight))

    def reweights(self) -> list[Tensor]:
        """R of each prunable layer (1 until the reweight stage starts)."""
        return [getattr(self, f"reweight{i}") for i in range(len(self.layers))]

    def stage(self, epoch: int) -> str:
        """Stage that training epoch `epoch` (0-based) belongs to."""
        if epoch < self.pretrain_epochs:
            return "pretrain"
        return "reweight" if epoch < self.pretrain_epochs + self.reweight_epochs else "retrain"

    @property
    def reweighting(self) -> bool:
        return self.stage(int(self.epochs_done)) == "reweight"

    @torch.no_grad()
    def refresh(self) -> None:
        """R ← 1 / (|W| + δ) from the current weights."""
        for layer, r in zip(self.layers, self.reweights()):
            r.copy_(1.0 / (layer.weight.abs() + self.delta))

    def enter(self, stage: str) -> None:
        """Stage-start work: take R when reweighting starts, hard-prune when retraining starts."""
        if stage == "reweight":
            self.refresh()
        elif stage == "retrain":
            magnitude_prune_(self, self.sparsity, self.allocation)

    def penalty(self) -> Tensor | None:
        if not self.reweighting:
            return None
        return self.c * sum((layer.weight * r).abs().sum() for layer, r in zip(self.layers, self.reweights()))

    def on_fit_start(self, module: L.LightningModule) -> None:
        self.warn_if_unreached(module, self.pretrain_epochs + self.reweight_epochs - 1, "reweight_epochs")
        if int(self.epochs_done) == 0 and self.stage(0) != "pretrain":
            self.enter(self.stage(0))

    def on_train_epoch_end(self, module: L.LightningModule) -> None:
        epoch = module.current_epoch
        self.epochs_done.fill_(epoch + 1)
        current, following = self.stage(epoch), self.stage(epoch + 1)
        if following != current:
            self.enter(following)
        elif following == "reweight" and (epoch + 1 - self.pretrain_epochs) % self.refresh_every == 0:
            self.refresh()

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().after_optimizer_step(optimizer)
        if not self.reweighting or self.c == 0:
            return
        state = param_state(optimizer)
        for layer, r in zip(self.layers, self.reweights()):
            group, _ = state[id(layer.weight)]
            soft_threshold_(layer.weight, group["lr"] * self.c * r)
