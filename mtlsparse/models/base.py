"""The multi-task model contract every architecture implements.

`forward(x)` returns one output per task. Balancers need to tell shared from
task-specific parameters (MGDA, gradient surgery), and sparsity methods need to know
which layers form the feature extractor they may sparsify and which layers read the
raw input (those are excluded by default, as in the papers).

A model whose tasks see the input only through one shared tensor z declares
`has_representation = True` and splits its forward into `encode(x) -> z` and
`decode(z) -> outputs`; gradient balancers in `mode=representation` (MGDA-UB) then
differentiate w.r.t. z. Anything a model computes besides the outputs (an auxiliary
loss) belongs in `encode`, so both paths compute it.

An architecture that changes during the fit (LTB fixes its branching after a search
phase) uses the two schedule hooks: `set_budget(max_epochs)` right after construction
(fractions of the run → epochs, unreachable epochs fail before training) and
`on_train_epoch_end(state)` at every training epoch end, before the sparsity method's and
the balancer's hooks. Both do nothing by default.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtlsparse.tasks import Task
from mtlsparse.training_state import TrainingState


class MultiTaskModel(nn.Module):
    """Base class: subclasses set `self.tasks` and either implement `encode`/`decode` or override `forward`."""

    tasks: dict[str, Task]
    #: whether `forward(x)` is `decode(encode(x))` with a shared representation z every task reads
    has_representation: bool = False

    def encode(self, x: Tensor) -> Tensor:
        """The shared representation z of `x`: every task's output depends on `x` only through z."""
        raise NotImplementedError(f"{type(self).__name__} has no shared representation (has_representation=False)")

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """One output per task from the shared representation z."""
        raise NotImplementedError(f"{type(self).__name__} has no shared representation (has_representation=False)")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """`decode ∘ encode`; models without a shared representation override it."""
        return self.decode(self.encode(x))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss depends on."""
        raise NotImplementedError

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters only `task`'s loss depends on."""
        raise NotImplementedError

    def backbone_modules(self) -> Sequence[nn.Module]:
        """Feature extractors that sparsity methods act on (trunks, monitors)."""
        raise NotImplementedError

    def input_layers(self) -> Sequence[nn.Module]:
        """Layers that read the raw input; excluded from sparsification by default."""
        raise NotImplementedError

    def head_modules(self) -> Sequence[nn.Module]:
        """Task output layers; never sparsified by default."""
        raise NotImplementedError

    def auxiliary_loss(self) -> Tensor | None:
        """Architecture-level loss of the last training forward (e.g. distillation), added unweighted."""
        return None

    def unreachable_modules(self) -> list[str]:
        """Names of submodules that no output reads in eval (a fixed LTB tree's unused nodes): export drops them."""
        return []

    def set_budget(self, max_epochs: int | None) -> None:
        """The run's epoch budget, right after construction (resolve epoch schedules; fail on unreachable ones)."""

    def on_train_epoch_end(self, state: TrainingState) -> None:
        """Architecture-level work at a training epoch end, before the method's and balancer's hooks."""


def flat_features(in_shape: Sequence[int], trunk: nn.Module) -> int:
    """Number of features `trunk` produces for one input of shape (C, H, W)."""
    with torch.no_grad():
        return int(trunk(torch.zeros(1, *in_shape)).flatten(1).shape[1])
