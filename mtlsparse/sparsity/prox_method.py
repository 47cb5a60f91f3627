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

Refit at a target sparsity: with `freeze_at_sparsity` s the support freezes at the end of the
first prox epoch whose sparsity (channel groups for a structured method, parameters for ℓ1)
reaches 100·s %, and the refit runs for the rest of the run; `finetune_epochs` /
`finetune_fraction` then only bound how late the freeze may come. Without it the prox finds its
zeros early and loses many of them again while the network learns (groups revive), so a freeze at
a fixed epoch lands wherever that oscillation happens to be. `refit_optimizer: restart` starts the
refit with a fresh optimizer and its lr schedule from the first epoch over the epochs left
(announced as `PhaseStarted(2)`, like GrOWL's phase 2); `continue` keeps both.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from mtlsparse.errors import ConfigError
from mtlsparse.metrics.sparsity import group_sparsity, param_sparsity
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.base import SparsityMethod
from mtlsparse.sparsity.budget import check_epoch, check_fraction, epoch_count, finite_budget, needs_budget
from mtlsparse.sparsity.dead_rows import Snapped
from mtlsparse.sparsity.masks import add_mask, apply_masks_, mask_of, set_mask_
from mtlsparse.sparsity.scope import ScopeLike
from mtlsparse.training_state import PhaseStarted, TrainingState

log = logging.getLogger(__name__)
REFIT_OPTIMIZERS = ("continue", "restart")


class ProxMethod(SparsityMethod):
    """Base class: subclasses implement `prox_(optimizer)`; the refit schedule lives here."""

    def __init__(self, lam: float = 0.0, finetune_fraction: float = 0.0, finetune_epochs: int | None = None,
                 scope: ScopeLike = None, warmup_fraction: float = 0.0, warmup_epochs: int | None = None,
                 freeze_at_sparsity: float | None = None, refit_optimizer: str = "continue") -> None:
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
        if freeze_at_sparsity is not None and not 0.0 < freeze_at_sparsity < 1.0:
            raise ValueError(f"method.freeze_at_sparsity must be a fraction in (0, 1) (0.7: freeze the support once "
                             f"70% is zero) or null, got {freeze_at_sparsity}")
        self.freeze_at_sparsity = None if freeze_at_sparsity is None else float(freeze_at_sparsity)
        if refit_optimizer not in REFIT_OPTIMIZERS:
            raise ValueError(f"method.refit_optimizer must be one of {REFIT_OPTIMIZERS}, got '{refit_optimizer}'")
        self.refit_optimizer = refit_optimizer
        self.register_buffer("refitting", torch.tensor(False))
        self.register_buffer("refit_from_epoch", torch.tensor(-1))  # first refit epoch (−1: no refit yet)
        self.register_buffer("restart_pending", torch.tensor(False))  # restart the optimizer at the next epoch start
        self._snapped_at_freeze = Snapped()

    @property
    def refits(self) -> bool:
        """Whether a refit may happen at all (decides the mask buffers before the budget is known)."""
        if self.freeze_at_sparsity is not None:
            return True
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
        if prox_epochs is not None and ramp > prox_epochs:  # (a freeze at the target may still cut it short)
            raise ConfigError(f"the λ warm-up lasts {ramp} epochs but only {prox_epochs} epochs run the prox before "
                              f"the refit (trainer.max_epochs={budget}): lower method.warmup_fraction / "
                              "method.warmup_epochs or the refit")
        return ramp

    def on_train_epoch_start(self, state: TrainingState) -> None:
        """The warm-up's prox strength for this epoch: λ·(e + 1)/W during the ramp, λ after; the first
        refit epoch restarts the optimizer (`refit_optimizer: restart`)."""
        if bool(self.restart_pending):
            self.restart_pending.fill_(False)
            state.announce(PhaseStarted(phase=2, epoch=state.epoch - 1, restart_optimizer=True))
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

    def current_sparsity(self) -> float:
        """% zero of what the method sparsifies: channel groups (structured) or parameters (ℓ1)."""
        if self.structured:
            return group_sparsity(self.channel_groups())
        return param_sparsity(layer.weight for layer in self.layers)

    @torch.no_grad()
    def on_train_epoch_end(self, state: TrainingState) -> None:
        """Freeze the support when only the refit's F epochs are left, or once the target sparsity is reached."""
        if self.refit_epochs is None and self.refits:
            raise RuntimeError(f"{type(self).__name__}: call set_budget(trainer.max_epochs) before training")
        if self.refitting:
            return
        if self.freeze_after is None or state.epoch < self.freeze_after:  # not the scheduled freeze: the target?
            if self.freeze_at_sparsity is None:
                return
            # the dead-row rule first, so the target counts (and the mask keeps) the zeros metrics will report
            self._snapped_at_freeze = super().snap_dead_()
            sparsity = self.current_sparsity()
            if sparsity < 100.0 * self.freeze_at_sparsity:
                return
            log.info("%s: %.1f%% zero after epoch %d (method.freeze_at_sparsity=%g): support frozen, refit from "
                     "epoch %d", type(self).__name__, sparsity, state.epoch, self.freeze_at_sparsity, state.epoch + 1)
        for layer in self.layers:
            set_mask_(layer, layer.weight != 0)
        self.refitting.fill_(True)
        self.refit_from_epoch.fill_(state.epoch + 1)
        self.restart_pending.fill_(self.refit_optimizer == "restart")

    def snap_dead_(self) -> Snapped:
        """The dead-row rule's count for this epoch, including what it zeroed before the target check."""
        done, self._snapped_at_freeze = self._snapped_at_freeze, Snapped()
        now = super().snap_dead_()
        return Snapped(done.groups + now.groups, done.units + now.units)

    def report(self) -> dict[str, float]:
        """The epoch the refit began (−1: never), when the refit can start at a target sparsity."""
        if self.freeze_at_sparsity is None:
            return super().report()
        return {**super().report(), "prox/refit_from_epoch": float(self.refit_from_epoch)}

    def masks(self) -> dict[str, Tensor] | None:
        return {layer.name: mask_of(layer) for layer in self.layers} if self.refitting else None
