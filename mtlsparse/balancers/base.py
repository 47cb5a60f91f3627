"""The loss-balancer contract: task losses (+ sparsity objective) → one scalar to backprop.

Balancers are `nn.Module`s so learnable state (log-variances, Chebyshev's t) is seen
by the optimizer and saved in checkpoints. Gradient-based balancers read shared
parameters / the shared representation from `BalanceContext`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L


@dataclass
class BalanceContext:
    """What a balancer may need beyond the losses."""

    shared_params: list[nn.Parameter] = field(default_factory=list)
    representation: Tensor | None = None
    step: int = 0
    epoch: int = 0


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


class Balancer(nn.Module):
    """Base class. `k0` weights the sparsity objective, `k` the tasks (DESIGN.md knobs)."""

    #: set by balancers that need the shared representation (MGDA-UB)
    needs_representation = False

    def __init__(self, tasks: Sequence[str], k0: float = 0.0, k: Sequence[float] | None = None) -> None:
        super().__init__()
        if k0 < 0:
            raise ValueError(f"k0 must be >= 0, got {k0}")
        self.tasks = list(tasks)
        self.k0 = float(k0)
        self.register_buffer("k", torch.tensor(preference_weights(self.tasks, k)), persistent=False)

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

    def on_train_epoch_end(self, module: L.LightningModule) -> None:
        """Epoch-level updates (AL multipliers, min-max ascent)."""
