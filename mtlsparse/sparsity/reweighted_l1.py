"""Reweighted ℓ1 pruning (Guo et al.; docs/methods/minmax.md): pretrain → reweighted ℓ1 → prune → retrain.

Stages are counted in epochs (0-based epoch e): `pretrain` while e < P, `reweight` for
the next R epochs, `retrain` afterwards. P and R are fractions of the run by default
(`pretrain_fraction`, `reweight_fraction`: round(f·N) epochs, R clamped so the prune
falls within the run) unless given explicitly (`pretrain_epochs`, `reweight_epochs`,
which replace the fractions and must fit: P + R <= trainer.max_epochs); at the default
30 epochs that is P = 5, R = 10. In the reweight stage
the objective gains c·Σ|W ⊙ R| with R = 1/(|W_prev| + δ); it is minimised by a proximal
step after every optimizer step (soft threshold with per-weight τ = lr·c·R), so it acts
with every balancer, whatever k0. R is taken when the stage starts and refreshed after
every `refresh_every` reweight epochs. When the stage ends the weights are hard-pruned
by magnitude to the target and the rest of training is a masked retrain.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mtlsparse.errors import ConfigError
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.allocation import check_allocation
from mtlsparse.sparsity.base import param_state
from mtlsparse.sparsity.budget import check_epoch, check_fraction, epoch_count, finite_budget, needs_budget
from mtlsparse.sparsity.magnitude import magnitude_prune_
from mtlsparse.sparsity.masks import MaskedMethod
from mtlsparse.sparsity.prox import soft_threshold_
from mtlsparse.sparsity.scope import ScopeLike
from mtlsparse.training_state import TrainingState

STAGES = ("pretrain", "reweight", "retrain")


class ReweightedL1(MaskedMethod):
    """Guo et al.'s reweighted-ℓ1 pruning pipeline; stage boundaries at epoch ends."""

    def __init__(self, sparsity: float = 0.0, c: float = 1e-7, delta: float = 1e-6, pretrain_fraction: float = 0.1667,
                 pretrain_epochs: int | None = None, reweight_fraction: float = 0.3333,
                 reweight_epochs: int | None = None, refresh_every: int = 2, allocation: str = "uniform",
                 scope: ScopeLike = None) -> None:
        super().__init__(sparsity, scope)
        if c < 0 or delta <= 0:
            raise ValueError(f"need method.c >= 0 and method.delta > 0, got c={c}, delta={delta}")
        if refresh_every < 1:
            raise ValueError(f"need method.refresh_every >= 1, got {refresh_every}")
        self.c, self.delta = float(c), float(delta)
        self.pretrain_fraction = check_fraction("pretrain_fraction", pretrain_fraction)
        self.reweight_fraction = check_fraction("reweight_fraction", reweight_fraction)
        self.pretrain_epochs = check_epoch("pretrain_epochs", pretrain_epochs, "pretrain_fraction")
        self.reweight_epochs = check_epoch("reweight_epochs", reweight_epochs, "reweight_fraction")
        if pretrain_epochs is None and reweight_epochs is None and self.pretrain_fraction + self.reweight_fraction > 1:
            raise ConfigError("method.pretrain_fraction + method.reweight_fraction must be <= 1 (the prune falls "
                              f"within the run), got {self.pretrain_fraction} + {self.reweight_fraction}")
        self.refresh_every = refresh_every
        self.allocation = check_allocation(allocation)
        self.stages: tuple[int, int] | None = None  # (P, R), resolved by set_budget
        self.register_buffer("epochs_done", torch.tensor(0))

    def set_budget(self, max_epochs: int | None) -> None:
        super().set_budget(max_epochs)
        self.stages = self.resolve_stages(finite_budget(max_epochs))

    def resolve_stages(self, budget: int | None) -> tuple[int, int]:
        """(pretrain epochs P, reweight epochs R) for a `budget`-epoch run (None: unbounded)."""
        pretrain, reweight = self.pretrain_epochs, self.reweight_epochs
        if budget is None:
            if pretrain is None or reweight is None:
                name = "pretrain" if pretrain is None else "reweight"
                raise needs_budget(f"{name}_fraction", f"{name}_epochs")
            return pretrain, reweight
        explicit = (pretrain or 0) + (reweight or 0)
        if explicit > budget:
            given = " + ".join(f"method.{k}={v}" for k, v in (("pretrain_epochs", pretrain),
                                                               ("reweight_epochs", reweight)) if v is not None)
            raise ConfigError(f"{given} puts the prune past the last epoch of trainer.max_epochs={budget} "
                              f"(epochs 0..{budget - 1}): lower them or drop them (=null) to use "
                              "method.pretrain_fraction / method.reweight_fraction, fractions of the run")
        if pretrain is None:
            pretrain = epoch_count(self.pretrain_fraction, budget, high=budget - (reweight or 0))
        if reweight is None:
            reweight = epoch_count(self.reweight_fraction, budget, high=budget - pretrain)
        return pretrain, reweight

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        for i, layer in enumerate(self.layers):
            self.register_buffer(f"reweight{i}", torch.ones_like(layer.weight))

    def reweights(self) -> list[Tensor]:
        """R of each prunable layer (1 until the reweight stage starts)."""
        return [getattr(self, f"reweight{i}") for i in range(len(self.layers))]

    def stage(self, epoch: int) -> str:
        """Stage that training epoch `epoch` (0-based) belongs to."""
        if self.stages is None:
            raise RuntimeError("ReweightedL1: call set_budget(trainer.max_epochs) before the schedule is used")
        pretrain, reweight = self.stages
        if epoch < pretrain:
            return "pretrain"
        return "reweight" if epoch < pretrain + reweight else "retrain"

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

    def on_fit_start(self, state: TrainingState) -> None:
        super().on_fit_start(state)
        if int(self.epochs_done) == 0 and self.stage(0) != "pretrain":
            self.enter(self.stage(0))

    def on_train_epoch_end(self, state: TrainingState) -> None:
        epoch = state.epoch
        self.epochs_done.fill_(epoch + 1)
        current, following = self.stage(epoch), self.stage(epoch + 1)
        if following != current:
            self.enter(following)
        elif following == "reweight" and (epoch + 1 - self.stages[0]) % self.refresh_every == 0:
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
