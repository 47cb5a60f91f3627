"""The loss-balancer contract: task losses (+ sparsity objective) → one scalar to backprop.

Balancers are `nn.Module`s so learnable state (log-variances, Chebyshev's t) is seen
by the optimizer and saved in checkpoints. Gradient-based balancers read shared
parameters / the shared representation from `BalanceContext` (per step); epoch-level hooks
and event handlers receive the declared `TrainingState` / events of mtlsparse.training_state.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtlsparse.errors import ConfigError
from mtlsparse.gradients import rank_sum_
from mtlsparse.training_state import PhaseStarted, TrainingState


@dataclass
class BalanceContext:
    """What a balancer may need at a training step beyond the losses."""

    shared_params: list[nn.Parameter] = field(default_factory=list)
    representation: Tensor | None = None


def preference_weights(tasks: Sequence[str], k: Sequence[float] | None) -> list[float]:
    """Validate the task preference vector k (one non-negative weight per task; default 1/m)."""
    m = len(tasks)
    if k is None:
        return [1.0 / m] * m
    k = [float(v) for v in k]
    if len(k) != m:
        raise ValueError(f"k has {len(k)} entries but the dataset has {m} tasks {list(tasks)}; "
                         f"pass one weight per task, e.g. k=[{','.join(['0.5'] * m)}]")
    if any(v < 0 for v in k):
        raise ValueError(f"k must be non-negative, got {k}")
    return k


def require_shared_parameters(balancer: str, model: nn.Module) -> None:
    """Fail at setup, not at the first step, when a gradient-based balancer meets a model that shares nothing.

    `balancer` names it as the user wrote it (e.g. "balancer=mgda"). Models without
    `shared_parameters()` (plain modules in tests) are not checked.
    """
    shared = getattr(model, "shared_parameters", None)
    if not callable(shared) or any(p.requires_grad for p in shared()):
        return
    name = type(model).__name__
    why = " (model=stl trains one network per task)" if name == "STL" else ""
    raise ConfigError(f"{balancer} combines per-task gradients of the shared parameters, but this model ({name}) has "
                      f"none{why}: use balancer=linear (or another loss-weighting balancer: uncertainty, dwa, famo, "
                      "rlw) with this model")


class LossMeter:
    """Running mean of detached task-loss vectors, averaged over DDP ranks when it is read.

    Plain tensors, not module buffers: DDP broadcasts rank 0's buffers before every
    forward, which would overwrite each rank's own sums. So a checkpoint does not hold a
    partly filled window (with per-epoch updates the window is empty when Lightning saves).
    """

    def __init__(self, num_tasks: int) -> None:
        self.total = torch.zeros(num_tasks)
        self.count = 0

    def add(self, losses: Tensor) -> None:
        """Record one step's task losses."""
        self.total = self.total.to(losses.device).add_(losses.detach().to(self.total.dtype))
        self.count += 1

    def pop_mean(self) -> Tensor | None:
        """Mean over all recorded steps (of every rank), then reset; None if nothing was recorded.

        Under DDP every rank must call this at the same point (it is a collective).
        """
        stats = rank_sum_(torch.cat([self.total, self.total.new_tensor([self.count])]))
        self.total = torch.zeros_like(self.total)
        self.count = 0
        return stats[:-1] / stats[-1] if stats[-1] > 0 else None


class Balancer(nn.Module):
    """Base class. `k0` weights the sparsity objective, `k` the tasks (top-level knobs; docs/methods/balancers.md)."""

    #: set by balancers that need the shared representation (MGDA-UB)
    needs_representation = False

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None) -> None:
        super().__init__()
        if k0 < 0:
            raise ValueError(f"k0 must be >= 0, got {k0}")
        self.tasks = list(tasks)
        self.k0 = float(k0)
        self.register_buffer("k", torch.tensor(preference_weights(self.tasks, k)), persistent=False)

    def setup(self, model: nn.Module) -> None:
        """Bind to the model before training (e.g. check it exposes a shared representation)."""

    @property
    def uses_penalty(self) -> bool:
        """Whether the sparsity objective must be computed for this balancer."""
        return self.k0 != 0

    def stack(self, losses: dict[str, Tensor]) -> Tensor:
        """Task losses as a vector in task order."""
        return torch.stack([losses[t] for t in self.tasks])

    def add_penalty(self, loss: Tensor, penalty: Tensor | None) -> Tensor:
        """Add k0·L0 when the method has a penalty and k0 > 0."""
        return loss + self.k0 * penalty if (penalty is not None and self.k0 != 0) else loss

    def forward(self, losses: dict[str, Tensor], penalty: Tensor | None, ctx: BalanceContext) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def state_summary(self) -> dict[str, float]:
        """Scalars worth logging each epoch (weights, multipliers)."""
        return {}

    def on_fit_start(self, state: TrainingState) -> None:
        """Before the first step: check options against the run's budget (the default has none)."""

    def on_train_epoch_end(self, state: TrainingState) -> None:
        """Epoch-level updates (AL multipliers, min-max ascent)."""

    def on_phase_started(self, event: PhaseStarted) -> None:
        """A sparsity method announced a new phase (GrOWL's phase 2); the default ignores it."""
