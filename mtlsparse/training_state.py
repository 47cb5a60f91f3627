"""The declared contract between the training loop and the parts it drives.

Sparsity methods and balancers never see the LightningModule or the Trainer. Their fit-
and epoch-level hooks receive a `TrainingState`: the run's counters and length, the model
being trained, a source of training batches and a logger. When one part has news another
may act on, it announces an event (`state.announce(PhaseStarted(...))`) and the loop hands
it to the other part's declared handler (`Balancer.on_phase_started`), so every coupling
is visible in a signature.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import nn

Batch = Any  # (inputs, {task: target}) as the datamodule yields it, on the model's device


@dataclass(frozen=True)
class PhaseStarted:
    """A sparsity method starts its phase `phase` after epoch `epoch` (GrOWL: phase 2, retraining tied rows).

    `restart_optimizer`: the phase retrains from a fresh optimizer, so the loop clears the
    optimizer's state (Adam's moments) and restarts the learning-rate schedule at its first
    epoch, its horizon (cosine's T_max) shortened to the epochs left.
    """

    phase: int
    epoch: int
    restart_optimizer: bool = False


#: every event a part may announce
Event = PhaseStarted


def _no_batches() -> Iterator[Batch]:
    raise RuntimeError("this TrainingState has no training data: the hook needs batches, so give the state a "
                       "`batches` source (the training loop does: fit with a datamodule)")


def _ignore(_: Any) -> None:
    return None


@dataclass(frozen=True)
class TrainingState:
    """What a hook may know about the running fit (counters are their values at the call).

    `batches` and `log` stay valid for the whole fit, so a method may keep them from
    `on_fit_start` (DiSparse dynamic draws batches at each rewire).
    """

    model: nn.Module | None = None  # the model being trained, unwrapped (no DDP wrapper)
    epoch: int = 0  # current epoch, 0-based
    step: int = 0  # optimizer steps taken so far
    max_epochs: int | None = None  # the run's epoch budget (None: unbounded)
    input_shape: tuple[int, ...] | None = None  # shape of one input sample (tracing, e.g. norm coupling)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: optimizer steps of the whole run (inf: unbounded); see `total_steps`
    steps_source: Callable[[], float] = lambda: math.inf
    #: a fresh iterator over training batches on `device` (same order on every DDP rank)
    batch_source: Callable[[], Iterator[Batch]] = _no_batches
    #: logs {name: scalar} at the current step/epoch through the run's loggers
    log: Callable[[dict[str, float]], None] = _ignore
    #: hands an `Event` to the parts that declared a handler for it
    announce: Callable[[Event], None] = _ignore

    @property
    def total_steps(self) -> float:
        """Optimizer steps of the whole run, estimated on first use.

        Lazy because estimating it makes Lightning load the training loader early, which
        shifts the shuffling stream; runs whose methods never ask keep their batch order.
        """
        return self.steps_source()

    def batches(self, n: int) -> Iterator[Batch]:
        """The first `n` batches of a fresh pass over the training data."""
        return islice(self.batch_source(), n)
