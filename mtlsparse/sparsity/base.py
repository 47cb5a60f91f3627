"""The sparsity-method contract: hooks the LightningModule calls at fixed points.

Fit- and epoch-level hooks receive a `TrainingState` (mtlsparse.training_state), the whole
of what a method may know about the run; a method tells the balancer about a phase change
by announcing `PhaseStarted` on it.

A method is an `nn.Module` so any state it keeps (buffers, schedules, step counters)
lands in the LightningModule's `state_dict` and therefore in checkpoints. Weights and
masks themselves live on the model; the method only acts on them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlsparse.channel_groups import ChannelGroups
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.dead_rows import Snapped, snap_dead_
from mtlsparse.sparsity.layers import PrunableLayer, prunable_layers
from mtlsparse.sparsity.scope import Scope, ScopeLike
from mtlsparse.training_state import TrainingState


class SparsityMethod(nn.Module):
    """Base class; the default hooks do nothing (that is the `dense` method)."""

    #: True when the structure the method creates is channel groups (drives export)
    structured = False
    #: % sparsity/param an epoch needs to be selected as best checkpoint (GrOWL's s_min)
    min_sparsity = 0.0
    #: groups / units at most this fraction of their layer's largest norm are set to zero at epoch ends
    #: (`dead_rows`; the structured methods take it as `method.dead_tol`); 0: the rule is off
    dead_tol = 0.0

    def __init__(self, scope: ScopeLike = None) -> None:
        super().__init__()
        self.scope = Scope.of(scope)  # the layers beyond the shared trunk it acts on (conf: `scope`)
        self._layers: list[PrunableLayer] = []
        self.budget_set = False

    def set_budget(self, max_epochs: int | None) -> None:
        """Resolve the epoch schedule for a run of `max_epochs` epochs (None or < 1: unbounded).

        Methods with epoch schedules turn their fractions of the run into epochs here and
        raise `ConfigError` for explicit epochs the run cannot reach (see `budget.py`); the
        run code calls it right after building the method. The base has no schedule.
        """
        self.budget_set = True

    def ensure_budget(self, state: TrainingState) -> None:
        """Fit-start fallback: take the run's max_epochs when `set_budget` was not called."""
        if not self.budget_set:
            self.set_budget(state.max_epochs)

    def setup(self, model: MultiTaskModel) -> None:
        """Bind to the model: find the layers this method acts on."""
        self._layers = prunable_layers(model, self.scope)

    @property
    def layers(self) -> list[PrunableLayer]:
        return self._layers

    def channel_groups(self) -> list[ChannelGroups]:
        """The channel groups of the layers it acts on, as the method defines them (the metrics count these)."""
        return [ChannelGroups(layer.name, layer.weight) for layer in self.layers]

    def penalty(self) -> Tensor | None:
        """Differentiable sparsity objective L0 handed to the balancer (None: no penalty)."""
        return None

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs after every optimizer step (prox operators, mask re-application)."""

    def on_fit_start(self, state: TrainingState) -> None:
        """Runs once before training (mask initialisation from data, e.g. SNIP); subclasses call super()."""
        self.ensure_budget(state)

    def on_train_epoch_start(self, state: TrainingState) -> None:
        """Runs before each training epoch's first step (GrOWL starts phase 2 here, once its last
        phase-1 epoch has been validated)."""

    def on_train_epoch_end(self, state: TrainingState) -> None:
        """Runs after each training epoch (thresholding, schedules, phase changes)."""

    def on_validated(self, state: TrainingState, score: float, param_sparsity: float) -> None:
        """Runs after each validation epoch (not Lightning's sanity check) with that epoch's selection
        score (`val/select` before any sparsity floor, higher is better) and `sparsity/param` (%)."""

    def snap_dead_(self) -> Snapped:
        """Set the numerically dead groups and units of the method's layers to zero (`dead_rows`, `dead_tol`)."""
        return snap_dead_(self.channel_groups(), self.dead_tol) if self.dead_tol > 0 else Snapped()

    def report(self) -> dict[str, float]:
        """Method-specific scalars for metrics.json at the end of the run (e.g. GrOWL's tying per layer)."""
        return {}

    def masks(self) -> dict[str, Tensor] | None:
        """Current binary masks keyed by layer name, if the method keeps masks."""
        return None


class Dense(SparsityMethod):
    """No sparsification: the dense baseline."""


def param_state(optimizer: torch.optim.Optimizer) -> dict[int, tuple[dict, dict]]:
    """Map id(param) → (its param group, its optimizer state) for per-parameter lr and moments."""
    return {id(p): (group, optimizer.state.get(p, {})) for group in optimizer.param_groups for p in group["params"]}
