"""DeepLab-v3 multi-task model on a dilated ResNet trunk (Upadhyay et al.; DiSparse; min-max sparse MTL).

Trunk: ResNet-18/34/50 from torchvision's blocks, random init by default. Output stride 8
(16) replaces the strides of stages 3 and 4 (stage 4) by dilation: the strided convs get
stride 1 and dilation d/2, the other 3×3 convs dilation d (d = 2 for stage 3, 4 for stage 4).
For Bottleneck blocks (ResNet-50) this is exactly torchvision's
``replace_stride_with_dilation``; torchvision's BasicBlock (ResNet-18/34) refuses dilation,
so the same surgery is applied to its convs after construction. Module names match
torchvision's (conv1, bn1, layer1..4), so a torchvision checkpoint loads when given as a
local file (``pretrained``); nothing is downloaded.

Heads: a DeepLab-v3 ASPP head (torchvision's ASPP) per dense task, upsampled bilinearly
to the input size; a conv + global pool + two-FC head per image-level task. The trunk
runs once per batch for all heads. ``width`` scales every channel count, so tests can
run the same architecture tiny.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1
from torchvision.models.segmentation.deeplabv3 import ASPP

from mtlsparse.models.hps import SharedTrunkModel
from mtlsparse.tasks import Task

RESNETS: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}
STAGE_PLANES = (64, 128, 256, 512)
#: output stride → dilation of stages 3 and 4 (1 = keep the stride)
DILATIONS = {8: (2, 4), 16: (1, 2), 32: (1, 1)}
#: DeepLab-v3's ASPP rates for each output stride
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def scaled(channels: int, width: float) -> int:
    """`channels · width`, rounded, at least 1."""
    return max(1, round(channels * width))


def make_stage(block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, blocks: int,
               stride: int) -> nn.Sequential:
    """A ResNet stage as torchvision's `ResNet._make_layer` builds it (without dilation)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Replace the stage's stride 2 by dilation: strided convs → stride 1 (3×3: dilation d/2), other 3×3 → d."""
    for conv in stage.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
            d = dilation // 2
        elif conv.kernel_size == (3, 3):
            d = dilation
        else:
            continue
        if conv.kernel_size == (3, 3):
            conv.dilation, conv.padding = (d, d), (d, d)


class ResNetTrunk(nn.Module):
    """Dilated ResNet feature extractor: stem (conv1-bn1-relu-maxpool) and stages layer1..layer4."""

    def __init__(self, depth: int = 50, width: float = 1.0, output_stride: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"model.depth must be one of {sorted(RESNETS)}, got {depth}")
        if output_stride not in DILATIONS:
            raise ValueError(f"model.output_stride must be one of {sorted(DILATIONS)}, got {output_stride}")
        if width <= 0:
            raise ValueError(f"model.width must be > 0 (channel multiplier), got {width}")
        block, counts = RESNETS[depth]
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem
        for i, (planes, blocks) in enumerate(zip(STAGE_PLANES, counts), start=1):
            planes = scaled(planes, width)
            self.add_module(f"layer{i}", make_stage(block, inplanes, planes, blocks, stride=1 if i == 1 else 2))
            inplanes = planes * block.expansion
        for stage, dilation in zip((self.layer3, self.layer4), DILATIONS[output_stride]):
            if dilation > 1:
                dilate_stage(stage, dilation)
        self.out_channels = inplanes
        self.output_stride = output_stride
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def load_torchvision(self, path: str | Path) -> None:
        """Load a torchvision ResNet state_dict file (its `fc.*` classifier is dropped); shapes must match."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()
                 if not k.removeprefix("module.").startswith("fc.")}
        mine = self.state_dict()
        wrong = [k for k, v in state.items() if k in mine and mine[k].shape != v.shape]
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if wrong or missing or unexpected:
            raise ValueError(f"model.pretrained={path} does not fit this trunk (torchvision ResNet of the same depth, "
                             f"width=1, 3 input channels): shape mismatches {wrong[:3]}, missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        self.load_state_dict(state)


def aspp_head(in_channels: int, out_channels: int, atrous_rates: Sequence[int], channels: int) -> nn.Sequential:
    """torchvision's DeepLabHead with `channels` instead of its fixed 256: ASPP → 3×3 conv-BN-ReLU → 1×1 conv."""
    return nn.Sequential(
        ASPP(in_channels, list(atrous_rates), channels),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, out_channels, 1),
    )


def task_heads(tasks: dict[str, Task], in_channels: int, width: float, output_stride: int,
               atrous_rates: Sequence[int] | None, head_channels: int | None, cls_hidden: int | None
               ) -> dict[str, nn.Sequential]:
    """One head per task on `in_channels` trunk features: ASPP for dense tasks, pooled MLP for image-level ones.

    `head_channels` defaults to 256 scaled by `width`, `cls_hidden` to `head_channels`, the atrous
    rates to those of `output_stride`.
    """
    head_channels = head_channels or scaled(256, width)
    cls_hidden = cls_hidden or head_channels
    if head_channels < 1 or cls_hidden < 1:
        raise ValueError(f"model.head_channels and model.cls_hidden must be >= 1, got {head_channels}, {cls_hidden}")
    rates = tuple(atrous_rates) if atrous_rates is not None else ATROUS_RATES[output_stride]
    return {name: aspp_head(in_channels, t.out_dim, rates, head_channels) if t.dense
            else image_head(in_channels, t.out_dim, head_channels, cls_hidden) for name, t in tasks.items()}


def image_head(in_channels: int, out_channels: int, channels: int, hidden: int) -> nn.Sequential:
    """Image-level head (Upadhyay et al.: one conv and two FC layers): 3×3 conv-BN-ReLU → global pool → FC-ReLU-FC."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out_channels),
    )


class DeepLabResNet(SharedTrunkModel):
    """Dilated ResNet trunk shared by all tasks; ASPP heads for dense tasks, pooled heads for image-level ones.

    `head_channels` (ASPP and image-head conv width) defaults to 256·width, `cls_hidden` (FC
    width of image heads) to `head_channels`; `atrous_rates` default to DeepLab-v3's for the
    output stride. `pretrained`: path of a torchvision ResNet checkpoint to start the trunk from.
    `trunk_per_task` runs the trunk once per task as the seeds' reference code did (for speed
    comparisons only; `make bench-trunk`): outputs are the same, the trunk's cost is m× larger.
    """

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], depth: int = 50, width: float = 1.0,
                 output_stride: int = 8, atrous_rates: Sequence[int] | None = None, head_channels: int | None = None,
                 cls_hidden: int | None = None, pretrained: str | None = None, trunk_per_task: bool = False) -> None:
        trunk = ResNetTrunk(depth, width, output_stride, in_channels=in_shape[0])
        if pretrained:
            trunk.load_torchvision(pretrained)
        heads = task_heads(tasks, trunk.out_channels, width, output_stride, atrous_rates, head_channels, cls_hidden)
        super().__init__(tasks, trunk, heads)
        if not isinstance(trunk_per_task, bool):
            raise ValueError(f"model.trunk_per_task must be true or false, got {trunk_per_task!r}")
        self.trunk_per_task = trunk_per_task
        self._input_size: tuple[int, int] | None = None

    def encode(self, x: Tensor) -> Tensor:
        """Trunk features (stride `output_stride`); remembers the input size for `decode`."""
        self._input_size = (x.shape[-2], x.shape[-1])
        return self.trunk(x)

    def decode(self, z: Tensor, size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """Every head on the shared features; dense outputs upsampled to `size` (default: the last input's)."""
        size = size or self._input_size
        if size is None:
            raise RuntimeError("decode(z) needs the input size: pass size= or call encode(x) first")
        return {name: self._head(name, z, size) for name in self.heads}

    def _head(self, name: str, z: Tensor, size: tuple[int, int]) -> Tensor:
        y = self.heads[name](z)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False) if self.tasks[name].dense else y

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = (x.shape[-2], x.shape[-1])
        if self.trunk_per_task:  # the reference design: same outputs, the trunk's cost once per task
            return {name: self._head(name, self.encode(x), size) for name in self.heads}
        return self.decode(self.encode(x), size)
