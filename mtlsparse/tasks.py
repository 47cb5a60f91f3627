"""Task descriptions shared by datasets, models, losses and metrics.

A dataset declares its tasks; models size their heads from them, and the
LightningModule builds each task's loss and torchmetrics from them, so adding a
task kind means adding one branch here, not touching every model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
import torchmetrics
from torch import Tensor

TASK_KINDS = ("classification",)


@dataclass(frozen=True)
class Task:
    """One prediction task: its name, kind and output size."""

    name: str
    kind: str = "classification"
    num_classes: int = 10
    #: targets equal to this are not this task's samples (e.g. CIFAR-100-20: other superclasses)
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task '{self.name}': unknown kind '{self.kind}', allowed: {TASK_KINDS}")

    @property
    def out_dim(self) -> int:
        """Number of output units the task head must produce."""
        return self.num_classes

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean task loss over the batch's valid targets (0 when the batch has none, never NaN)."""
        if self.ignore_index is None:
            return F.cross_entropy(output, target)
        total = F.cross_entropy(output, target, ignore_index=self.ignore_index, reduction="sum")
        return total / (target != self.ignore_index).sum().clamp_min(1)

    def metrics(self) -> torchmetrics.MetricCollection:
        """Fresh torchmetrics for this task (one collection per split)."""
        return torchmetrics.MetricCollection(
            {"acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes,
                                          ignore_index=self.ignore_index)}
        )

    @property
    def selection_metric(self) -> tuple[str, str]:
        """(metric name, 'max' | 'min') used to rank checkpoints for this task."""
        return "acc", "max"

