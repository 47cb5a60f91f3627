"""Task descriptions shared by datasets, models, losses and metrics.

A dataset declares its tasks; models size their heads from them, and the
LightningModule builds each task's loss and torchmetrics from them, so adding a
task kind means adding one branch here, not touching every model.

Kinds and their outputs / targets:
- ``classification``: logits ``[B,C]`` / class ids ``[B]`` (``ignore_index``: not this task's sample)
- ``binary``: one logit ``[B,1]`` / 0 or 1 ``[B]``
- ``segmentation``: logits ``[B,C,H,W]`` / class ids ``[B,H,W]`` (``ignore_index``: unlabelled pixel)
- ``depth``: ``[B,1,H,W]`` / depth ``[B,1,H,W]``, valid where > 0
- ``normal``: ``[B,3,H,W]`` (normalised in loss and metrics) / unit normals ``[B,3,H,W]``, valid where non-zero
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor
from torchmetrics.wrappers import LambdaInputTransformer

from mtlsparse.metrics.dense import DepthErrors, NormalErrors, as_depth_map, depth_valid, normal_valid

TASK_KINDS = ("classification", "binary", "segmentation", "depth", "normal")
DENSE_KINDS = ("segmentation", "depth", "normal")
#: loss variants per kind (first = default); `loss_type` picks one
LOSS_TYPES = {"classification": ("ce",), "binary": ("bce",), "segmentation": ("ce",), "depth": ("l1", "mse"),
              "normal": ("cosine",)}
#: each metric's direction: "max" (higher is better) or "min"
METRIC_MODES = {
    "classification": {"acc": "max"},
    "binary": {"acc": "max"},
    "segmentation": {"miou": "max", "pix_acc": "max"},
    "depth": {"abs_err": "min", "rel_err": "min"},
    "normal": {"mean_angle": "min", "median_angle": "min", "within_11_25": "max", "within_22_5": "max",
               "within_30": "max", "cos_sim": "max"},
}
SELECTION = {"classification": "acc", "binary": "acc", "segmentation": "miou", "depth": "abs_err",
             "normal": "mean_angle"}


@dataclass(frozen=True)
class Task:
    """One prediction task: its name, kind and output size."""

    name: str
    kind: str = "classification"
    num_classes: int = 10
    #: targets equal to this are not this task's samples (e.g. CIFAR-100-20: other superclasses)
    ignore_index: int | None = None
    #: loss variant of the kind (see LOSS_TYPES); None = the kind's default
    loss_type: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task '{self.name}': unknown kind '{self.kind}', allowed: {TASK_KINDS}")
        if self.loss_type is not None and self.loss_type not in LOSS_TYPES[self.kind]:
            raise ValueError(f"task '{self.name}': loss_type '{self.loss_type}' is not one of "
                             f"{LOSS_TYPES[self.kind]} for kind '{self.kind}'")

    @property
    def dense(self) -> bool:
        """True for per-pixel tasks (their heads output a map at input resolution)."""
        return self.kind in DENSE_KINDS

    @property
    def out_dim(self) -> int:
        """Number of output units (channels for dense tasks) the task head must produce."""
        return {"binary": 1, "depth": 1, "normal": 3}.get(self.kind, self.num_classes)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean task loss over the batch's valid targets / pixels (0 when there are none, never NaN)."""
        kind, loss_type = self.kind, self.loss_type or LOSS_TYPES[self.kind][0]
        if kind in ("classification", "segmentation"):
            if self.ignore_index is None:
                return F.cross_entropy(output, target)
            total = F.cross_entropy(output, target, ignore_index=self.ignore_index, reduction="sum")
            return total / (target != self.ignore_index).sum().clamp_min(1)
        if kind == "binary":
            return F.binary_cross_entropy_with_logits(output.reshape(-1), target.reshape(-1).to(output.dtype))
        if kind == "depth":
            output, target = as_depth_map(output), as_depth_map(target)
            valid = depth_valid(target)
            diff = torch.where(valid, output - target, torch.zeros_like(output))
            per_pixel = diff.abs() if loss_type == "l1" else diff.square()
            return per_pixel.sum() / valid.sum().clamp_min(1)
        # normal: 1 − cos(prediction, target) over pixels with a ground-truth normal
        valid = normal_valid(target)
        cos = F.cosine_similarity(output, target.to(output.dtype), dim=1)
        return torch.where(valid, 1.0 - cos, torch.zeros_like(cos)).sum() / valid.sum().clamp_min(1)

    def metrics(self) -> torchmetrics.MetricCollection:
        """Fresh torchmetrics for this task (one collection per split)."""
        if self.kind == "classification":
            return torchmetrics.MetricCollection(
                {"acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes,
                                              ignore_index=self.ignore_index)})
        if self.kind == "binary":  # logits → probabilities, so the 0.5 threshold is right whatever the logit range
            return torchmetrics.MetricCollection(
                {"acc": LambdaInputTransformer(torchmetrics.classification.BinaryAccuracy(),
                                               transform_pred=_sigmoid_flat, transform_target=_long_flat)})
        if self.kind == "segmentation":
            return torchmetrics.MetricCollection({
                "miou": torchmetrics.classification.MulticlassJaccardIndex(
                    self.num_classes, average="macro", ignore_index=self.ignore_index),
                "pix_acc": torchmetrics.classification.MulticlassAccuracy(
                    self.num_classes, average="micro", multidim_average="global", ignore_index=self.ignore_index),
            })
        if self.kind == "depth":
            return torchmetrics.MetricCollection({"depth": DepthErrors()})
        return torchmetrics.MetricCollection({"normal": NormalErrors()})

    @property
    def metric_modes(self) -> dict[str, str]:
        """Each metric's direction, "max" (higher is better) or "min" (keys as logged)."""
        return dict(METRIC_MODES[self.kind])

    @property
    def selection_metric(self) -> tuple[str, str]:
        """(metric name, 'max' | 'min') used to rank checkpoints for this task."""
        key = SELECTION[self.kind]
        return key, METRIC_MODES[self.kind][key]


def _sigmoid_flat(logits: Tensor) -> Tensor:
    return torch.sigmoid(logits.reshape(-1))


def _long_flat(target: Tensor) -> Tensor:
    return target.reshape(-1).long()
