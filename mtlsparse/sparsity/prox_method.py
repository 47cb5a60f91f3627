"""Regularise-and-prox methods, with an optional refit on the support they found.

The prox shrinks every surviving weight a little at every step (the penalty's bias).
With `finetune_epochs > 0` the last epochs stop the prox and freeze the zero pattern
found so far in mask buffers (so checkpoints and resume keep it): the surviving
weights are refit without shrinkage, the usual "debiasing" step after a lasso.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.base import SparsityMethod
from mtlsparse.sparsity.masks import add_mask, apply_masks_, mask_of, set_mask_

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L


class ProxMethod(SparsityMethod):
    """Base class: subclasses implement `prox_(optimizer)`; the refit schedule lives here."""

    family = "prox"

    def __init__(self, lam: float = 0.0, finetune_epochs: int = 0, include_input_layers: bool = False,
                 include_heads: bool = False) -> None:
        super().__init__(include_input_layers, include_heads)
        if lam < 0:
            raise ValueError(f"method.lam must be >= 0, got {lam}")
        if finetune_epochs < 0:
            raise ValueError(f"method.finetune_epochs must be >= 0, got {finetune_epochs}")
        self.lam = float(lam)
        self.finetune_epochs = int(finetune_epochs)
        self.register_buffer("refitting", torch.tensor(False))

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        if self.finetune_epochs:
            for layer in self.layers:
                add_mask(layer.module)

    def prox_(self, optimizer: torch.optim.Optimizer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.refitting:
            apply_masks_(self.layers, optimizer)
        elif self.lam:
            self.prox_(optimizer)

    @torch.no_grad()
    def on_train_epoch_end(self, module: L.LightningModule) -> None:
        """Freeze the support when only `finetune_epochs` epochs are left."""
        remaining = module.trainer.max_epochs - (module.current_epoch + 1)
        if self.finetune_epochs and not self.refitting and remaining <= self.finetune_epochs:
            for layer in self.layers:
                set_mask_(layer, layer.weight != 0)
            self.refitting.fill_(True)

    def masks(self) -> dict[str, Tensor] | None:
        return {layer.name: mask_of(layer) for layer in self.layers} if self.refitting else None
