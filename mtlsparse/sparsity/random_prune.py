"""Random pruning: the baseline that magnitude pruning must beat.

At the end of one scheduled epoch, each prunable layer keeps a uniformly random
(1 − sparsity) share of its weights (already-masked weights stay masked); training then
continues with the masks fixed. The positions come from a CPU generator seeded by
(seed, epoch), so every DDP rank and device draws the same masks, and a resumed run
takes them from the checkpoint (they are `weight_mask` buffers). The epoch follows the
schedule convention of `budget.py`: `prune_fraction` of the run, or an explicit
`prune_epoch`. See docs/adding.md, where this method is the worked example.
"""
from __future__ import annotations

import torch

from mtlsparse.sparsity.allocation import layer_counts
from mtlsparse.sparsity.budget import check_epoch, check_fraction, finite_budget, resolve_point
from mtlsparse.sparsity.dst import step_generator
from mtlsparse.sparsity.masks import MaskedMethod, mask_of, topk_mask
from mtlsparse.sparsity.scope import ScopeLike
from mtlsparse.training_state import TrainingState


class RandomPrune(MaskedMethod):
    """Prune a uniformly random `sparsity` share of every prunable layer once, then train masked.

    Defaults: at 30 epochs the prune happens at the end of epoch 9 (as `magnitude`'s one-shot).
    """

    def __init__(self, sparsity: float = 0.0, prune_fraction: float = 0.3333, prune_epoch: int | None = None,
                 seed: int = 0, scope: ScopeLike = None) -> None:
        super().__init__(sparsity, scope)
        self.prune_fraction = check_fraction("prune_fraction", prune_fraction)
        self.prune_epoch = check_epoch("prune_epoch", prune_epoch, "prune_fraction")
        self.seed = int(seed)
        self.epoch: int | None = None  # resolved by set_budget

    def set_budget(self, max_epochs: int | None) -> None:
        super().set_budget(max_epochs)
        self.epoch = resolve_point("prune_epoch", self.prune_epoch, "prune_fraction", self.prune_fraction,
                                   finite_budget(max_epochs))

    @torch.no_grad()
    def prune_(self, epoch: int) -> None:
        """Per layer, keep round((1 − sparsity)·numel) random weights among those still kept."""
        generator = step_generator(self.seed, epoch)
        counts = layer_counts([layer.weight.shape for layer in self.layers], self.density, "uniform")
        masks = []
        for layer, k in zip(self.layers, counts):
            mask = mask_of(layer)
            score = torch.rand(mask.shape, generator=generator).to(mask.device)
            masks.append(topk_mask(torch.where(mask, score, -1.0), min(k, int(mask.sum()))))
        self.set_masks_(masks)

    def on_train_epoch_end(self, state: TrainingState) -> None:
        if self.epoch is None:
            raise RuntimeError("RandomPrune: call set_budget(trainer.max_epochs) before training")
        if state.epoch == self.epoch:
            self.prune_(state.epoch)
