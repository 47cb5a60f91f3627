"""Magnitude pruning + masked finetuning: one-shot at an epoch end or gradual (Zhu & Gupta).

Pruning happens at the end of training epochs (before validation and checkpointing, so
the pruned model is what gets evaluated); weights removed once stay removed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mtlsparse.sparsity.allocation import check_allocation, score_masks
from mtlsparse.sparsity.masks import MaskedMethod, mask_of
from mtlsparse.sparsity.schedules import gradual_sparsity

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L

SCHEDULES = ("oneshot", "gradual")


@torch.no_grad()
def magnitude_prune_(method: MaskedMethod, sparsity: float, allocation: str) -> None:
    """Keep the largest |w| of `method.layers` at `sparsity`; already-masked weights stay masked."""
    scores = [torch.where(mask_of(layer), layer.weight.abs(), -1.0) for layer in method.layers]
    method.set_masks_(score_masks(scores, 1.0 - sparsity, allocation))


class Magnitude(MaskedMethod):
    """Prune the smallest-magnitude weights to `sparsity`, then finetune with the mask fixed.

    `oneshot` prunes at the end of epoch `prune_epoch` (0-based); `gradual` at the end of
    each epoch start_epoch..end_epoch following the cubic schedule.
    """

    family = "prune"

    def __init__(self, sparsity: float = 0.0, schedule: str = "oneshot", prune_epoch: int = 9,
                 start_epoch: int = 2, end_epoch: int = 19, allocation: str = "global",
                 include_input_layers: bool = False, include_heads: bool = False) -> None:
        super().__init__(sparsity, include_input_layers, include_heads)
        if schedule not in SCHEDULES:
            raise ValueError(f"method.schedule must be one of {SCHEDULES}, got '{schedule}'")
        if min(prune_epoch, start_epoch) < 0 or end_epoch < start_epoch:
            raise ValueError(f"need 0 <= method.prune_epoch and 0 <= method.start_epoch <= method.end_epoch, "
                             f"got prune_epoch={prune_epoch}, start_epoch={start_epoch}, end_epoch={end_epoch}")
        self.schedule = schedule
        self.prune_epoch, self.start_epoch, self.end_epoch = prune_epoch, start_epoch, end_epoch
        self.allocation = check_allocation(allocation)

    def target_after(self, epoch: int) -> float | None:
        """Sparsity to prune to at the end of `epoch`, None when this epoch does not prune."""
        if self.schedule == "oneshot":
            return self.sparsity if epoch == self.prune_epoch else None
        return gradual_sparsity(epoch, self.start_epoch, self.end_epoch, self.sparsity)

    def on_fit_start(self, module: L.LightningModule) -> None:
        if self.schedule == "oneshot":
            self.warn_if_unreached(module, self.prune_epoch, "prune_epoch")
        else:
            self.warn_if_unreached(module, self.end_epoch, "end_epoch")

    def on_train_epoch_end(self, module: L.LightningModule) -> None:
        target = self.target_after(module.current_epoch)
        if target is not None:
            magnitude_prune_(self, target, self.allocation)
