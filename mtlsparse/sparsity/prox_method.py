"""Regularise-and-prox methods, with an optional refit on the support they found.

The prox shrinks every surviving weight a little at every step (the penalty's bias).
With a refit the last F epochs stop the prox and freeze the zero pattern found so far
in mask buffers (so checkpoints and resume keep it): the surviving weights are refit
without shrinkage, the usual "debiasing" step after a lasso. F is `finetune_fraction`
of the run (default 0: no refit; round(f·N), at least 1 when f > 0, at most N − 1 so
one prox epoch comes first) unless `finetune_epochs` is given, which replaces it and
must leave that prox epoch (F <= trainer.max_epochs − 1).

λ warm-up: with `warmup_fraction` f > 0 (or `warmup_epochs` W, which replaces it) the prox
strength ramps linearly over the first W = round(f·N) epochs, λ·(e + 1)/W in epoch e, then
stays λ. Without it the first epoch's prox zeroes most groups at once (85–93% on the default
model) and they revive while the network learns; the ramp lets groups die in the order the
task gradients leave them, not in the order of their random initial norms.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mtlsparse.errors import ConfigError
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.base import SparsityMethod
from mtlsparse.sparsity.budget import check_epoch, check_fraction, epoch_count, finite_budget, needs_budget
from mtlsparse.sparsity.masks import add_mask, apply_masks_, mask_of, set_mask_
from mtlsparse.sparsity.scope import ScopeLike
from mtlsparse.training_state import TrainingState


class ProxMethod(SparsityMethod):
    """Base class: subclasses implement `prox_(optimizer)`; the refit schedule lives here."""

    def __init__(self, lam: float = 0.0, finetune_fraction: float = 0.0, finetune_epochs: int | None = None,
                 scope: ScopeLike = None, warmup_fraction: float = 0.0, warmup_epochs: int | None = None) -> None:
        super().__init__(scope)
        if lam < 0:
            raise ValueError(f"method.lam must be >= 0, got {lam}")
        self.lam = float(lam)
        self.finetune_fraction = check_fraction("finetune_fraction", finetune_fraction)
        self.finetune_epochs = check_epoch("finetune_epochs", finetune_epochs, "finetune_fraction")
        self.warmup_fraction = check_fraction("warmup_fraction", warmup_fraction)
        self.warmup_epochs = check_epoch("warmup_epochs", warmup_epochs, "warmup_fraction")
        self.refit_epochs: int | None = None  # F, resolved by set_budget
        self.freeze_after: int | None = None
        self.ramp_epochs = 0  # W, resolved by set_budget (0: no warm-up)
        self.strength = self.lam  # the prox's λ in the current epoch (the warm-up ramp sets it)
        self.register_buffer("refitting", torch.tensor(False))

    @property
    def refits(self) -> bool:
        """Whether a refit may happen at all (decides the mask buffers before the budget is known)."""
        return bool(self.finetune_epochs) if self.finetune_epochs is not None else self.finetune_fraction > 0

    def set_budget(self, max_epochs: int | None) -> None:
        super().set_budget(max_epochs)
        budget = finite_budget(max_epochs)
        if self.finetune_epochs is not None:
            if budget is None and self.finetune_epochs:
                raise ConfigError(f"method.finetune_epochs={self.finetune_epochs} counts the last epochs of the run, "
                                  "but trainer.max_epochs is unbounded here: set trainer.max_epochs")
            if budget is not None and self.finetune_epochs >= budget:
                raise ConfigError(
                    f"method.finetune_epochs={self.finetune_epochs} leaves no prox epoch before the refit in "
                    f"trainer.max_epochs={budget} (at most {budget - 1}): lower method.finetune_epochs or drop "
                    "it (method.finetune_epochs=null) to use method.finetune_fraction, a fraction of the run")
            self.refit_epochs = self.finetune_epochs
        elif self.finetune_fraction == 0:
            self.refit_epochs = 0
        elif budget is None:
            raise needs_budget("finetune_fraction", "finetune_epochs")
        else:
            self.refit_epochs = epoch_count(self.finetune_fraction, budget, low=1, high=budget - 1)
        # the support freezes at the end of this epoch (None: no refit)
        self.freeze_after = budget - 1 - self.refit_epochs if self.refit_epochs else None
        self.ramp_epochs = self._ramp_epochs(budget)

    def _ramp_epochs(self, budget: int | None) -> int:
        """W, the warm-up's length in epochs (it must end before the refit freezes the support)."""
        if self.warmup_epochs is not None:
            ramp = self.warmup_epochs
        elif self.warmup_fraction == 0:
            return 0
        elif budget is None:
            raise needs_budget("warmup_fraction", "warmup_epochs")
        else:
            ramp = epoch_count(self.warmup_fraction, budget, low=1)
        prox_epochs = budget - self.refit_epochs if budget is not None else None
        if prox_epochs is not None and ramp > prox_epochs:
            raise ConfigError(f"the λ warm-up lasts {ramp} epochs but only {prox_epochs} epochs run the prox before "
                              f"the refit (trainer.max_epochs={budget}): lower method.warmup_fraction / "
                              "method.warmup_epochs or the refit")
        return ramp

    def on_train_epoch_start(self, state: TrainingState) -> None:
        """The warm-up's prox strength for this epoch: λ·(e + 1)/W during the ramp, λ after."""
        ramp = self.ramp_epochs
        self.strength = self.lam * min(1.0, (state.epoch + 1) / ramp) if ramp else self.lam

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        if self.refits:
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
    def on_train_epoch_end(self, state: TrainingState) -> None:
        """Freeze the support when only the refit's F epochs are left."""
        if self.refit_epochs is None and self.refits:
            raise RuntimeError(f"{type(self).__name__}: call set_budget(trainer.max_epochs) before training")
        if self.freeze_after is not None and not self.refitting and state.epoch >= self.freeze_after:
            for layer in self.layers:
                set_mask_(layer, layer.weight != 0)
            self.refitting.fill_(True)

    def masks(self) -> dict[str, Tensor] | None:
        return {layer.name: mask_of(layer) for layer in self.layers} if self.refitting else None
