"""VGG-16 hard parameter sharing for CIFAR-scale images (CIFAR-100 as 20 tasks, docs/methods/minmax.md).

The trunk follows torchvision's VGG configuration "D" (13 conv3×3 layers, 5 max-pools),
with channel counts scaled by `width`, then global average pooling to one vector, so
32×32 inputs give the usual 1×1×512 CIFAR-VGG features. A max-pool is skipped when the
feature map is already 1 pixel high or wide, so small inputs (e.g. 16×16) still work.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.vgg import cfgs

from mtlsparse.models.hps import SharedTrunkModel
from mtlsparse.tasks import Task

VGG16_CFG = cfgs["D"]  # [64, 64, 'M', 128, 128, 'M', 256 ×3, 'M', 512 ×3, 'M', 512 ×3, 'M']


def scaled_channels(channels: int, width: float) -> int:
    """`channels · width`, rounded, at least 1."""
    return max(1, round(channels * width))


def vgg_trunk(in_shape: Sequence[int], width: float = 1.0, batch_norm: bool = True,
              cfg: Sequence[int | str] = VGG16_CFG) -> nn.Sequential:
    """Conv3×3(-BN)-ReLU stacks and 2×2 max-pools as in `cfg`, then global average pool + flatten."""
    c_in, size = in_shape[0], min(in_shape[1:])
    layers: list[nn.Module] = []
    for item in cfg:
        if item == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            continue
        c_out = scaled_channels(int(item), width)
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def task_head(features: int, num_outputs: int, hidden: int | None) -> nn.Module:
    """A Linear classifier, or Linear-ReLU-Linear when `hidden` is given."""
    if hidden is None:
        return nn.Linear(features, num_outputs)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_outputs))


class VGG16MT(SharedTrunkModel):
    """VGG-16 trunk shared by all tasks + one head per task.

    Heads are a single Linear by default (the CIFAR-VGG classifier),
    Linear(C→head_hidden)-ReLU-Linear when `head_hidden` is set.
    """

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], width: float = 1.0,
                 batch_norm: bool = True, head_hidden: int | None = None) -> None:
        if width <= 0:
            raise ValueError(f"width must be > 0 (channel multiplier of VGG-16), got {width}")
        if head_hidden is not None and head_hidden < 1:
            raise ValueError(f"head_hidden must be a positive int or null, got {head_hidden}")
        trunk = vgg_trunk(in_shape, width, batch_norm)
        features = [m for m in trunk if isinstance(m, nn.Conv2d)][-1].out_channels
        super().__init__(tasks, trunk, {name: task_head(features, t.out_dim, head_hidden) for name, t in tasks.items()})
