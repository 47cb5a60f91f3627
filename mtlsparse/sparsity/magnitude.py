"""Magnitude pruning + masked finetuning: one-shot at an epoch end or gradual (Zhu & Gupta).

The pruning epochs are fractions of the run by default (`budget.py`), so any budget,
however short, ends at the target.

Pruning happens at the end of training epochs (before validation and checkpointing, so
the pruned model is what gets evaluated); weights removed once stay removed.
"""
from __future__ import annotations

import torch

from mtlsparse.errors import ConfigError
from mtlsparse.sparsity.allocation import check_allocation, score_masks
from mtlsparse.sparsity.budget import check_epoch, check_fraction, finite_budget, resolve_point
from mtlsparse.sparsity.masks import MaskedMethod, mask_of
from mtlsparse.sparsity.schedules import gradual_sparsity
from mtlsparse.sparsity.scope import ScopeLike
from mtlsparse.training_state import TrainingState

SCHEDULES = ("oneshot", "gradual")


@torch.no_grad()
def magnitude_prune_(method: MaskedMethod, sparsity: float, allocation: str) -> None:
    """Keep the largest |w| of `method.layers` at `sparsity`; already-masked weights stay masked."""
    scores = [torch.where(mask_of(layer), layer.weight.abs(), -1.0) for layer in method.layers]
    method.set_masks_(score_masks(scores, 1.0 - sparsity, allocation))


class Magnitude(MaskedMethod):
    """Prune the smallest-magnitude weights to `sparsity`, then finetune with the mask fixed.

    `oneshot` prunes at the end of one epoch, `gradual` at the end of each epoch from a
    start to an end epoch following the cubic schedule (the end epoch reaches the target).
    Each point is a fraction of the run (`prune_fraction`, `start_fraction`,
    `end_fraction`: the epoch at whose end that fraction is done) unless the explicit
    0-based epoch (`prune_epoch`, `start_epoch`, `end_epoch`) is given, which replaces it
    and must lie within the run. Defaults: at 30 epochs, epoch 9 (one-shot), 2..19 (gradual).
    """

    def __init__(self, sparsity: float = 0.0, schedule: str = "oneshot", prune_fraction: float = 0.3333,
                 prune_epoch: int | None = None, start_fraction: float = 0.1, start_epoch: int | None = None,
                 end_fraction: float = 0.6667, end_epoch: int | None = None, allocation: str = "global",
                 scope: ScopeLike = None) -> None:
        super().__init__(sparsity, scope)
        if schedule not in SCHEDULES:
            raise ValueError(f"method.schedule must be one of {SCHEDULES}, got '{schedule}'")
        self.schedule = schedule
        #: per point: (explicit-epoch key, its value, fraction key, fraction)
        self.points = {name: (f"{name}_epoch", check_epoch(f"{name}_epoch", epoch, f"{name}_fraction"),
                              f"{name}_fraction", check_fraction(f"{name}_fraction", fraction))
                       for name, epoch, fraction in (("prune", prune_epoch, prune_fraction),
                                                     ("start", start_epoch, start_fraction),
                                                     ("end", end_epoch, end_fraction))}
        self.allocation = check_allocation(allocation)
        self.epochs: dict[str, int] | None = None  # resolved by set_budget

    def set_budget(self, max_epochs: int | None) -> None:
        super().set_budget(max_epochs)
        budget = finite_budget(max_epochs)
        names = ("prune",) if self.schedule == "oneshot" else ("start", "end")
        epochs = {name: resolve_point(*self.points[name], budget) for name in names}
        if self.schedule == "gradual" and epochs["start"] > epochs["end"]:
            raise ConfigError(f"method.schedule=gradual starts at epoch {epochs['start']} (method.start_epoch / "
                              f"method.start_fraction) after it ends at epoch {epochs['end']} (method.end_epoch / "
                              f"method.end_fraction) of trainer.max_epochs={max_epochs}: move the start before the end")
        self.epochs = epochs

    def target_after(self, epoch: int) -> float | None:
        """Sparsity to prune to at the end of `epoch`, None when this epoch does not prune."""
        if self.epochs is None:
            raise RuntimeError("Magnitude: call set_budget(trainer.max_epochs) before the schedule is used")
        if self.schedule == "oneshot":
            return self.sparsity if epoch == self.epochs["prune"] else None
        return gradual_sparsity(epoch, self.epochs["start"], self.epochs["end"], self.sparsity)

    def on_train_epoch_end(self, state: TrainingState) -> None:
        target = self.target_after(state.epoch)
        if target is not None:
            magnitude_prune_(self, target, self.allocation)
