"""Monitored Deep Multi-Task Network (Hotegni et al.; docs/methods/growl_mdmtn.md).

An HPS trunk S plus one small task-specific monitor M_t per task that sees the raw
input and catches what the shared features miss; head O_t reads the learned fusion
z_t = α_1^(t)·S(u) + α_2^(t)·M_t(u).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.models.lenet import first_layer, lenet_trunk
from mtlsparse.tasks import Task


class MDMTN(MultiTaskModel):
    """LeNet trunk + per-task monitor Conv(monitor_channels)-pool-ReLU-FC(hidden)-ReLU + fused linear heads.

    MultiMNIST defaults: trunk (10, 20) k5, hidden 50, monitors 20 channels. Cifar10Mnist:
    `channels=[16,32] kernel_size=3 hidden=32 monitor_channels=32 batch_norm=true`.
    α^(t) = (α_1, α_2) are registered parameters (in `state_dict`, trained), initialised
    to `alpha_init`. Each α^(t) only affects task t's loss, so it belongs to
    `task_parameters(t)`, not to the shared parameters (MGDA's gradients stay trunk-only).
    """

    has_representation = False  # the monitors read the input too

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], channels: Sequence[int] = (10, 20),
                 hidden: int = 50, kernel_size: int = 5, batch_norm: bool = False, monitor_channels: int = 20,
                 alpha_init: Sequence[float] = (0.5, 0.5)) -> None:
        super().__init__()
        if len(alpha_init) != 2:
            raise ValueError(f"alpha_init must be [α_shared, α_monitor], got {list(alpha_init)}")
        self.tasks = dict(tasks)
        self.trunk = lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm)
        self.monitors = nn.ModuleDict(
            {name: lenet_trunk(in_shape, (monitor_channels,), hidden, kernel_size, batch_norm) for name in self.tasks})
        self.alphas = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor([float(a) for a in alpha_init])) for name in self.tasks})
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, t.out_dim) for name, t in self.tasks.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared = self.trunk(x)
        out = {}
        for name in self.tasks:
            alpha = self.alphas[name]
            out[name] = self.heads[name](alpha[0] * shared + alpha[1] * self.monitors[name](x))
        return out

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.trunk.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.monitors[task].parameters()
        yield self.alphas[task]
        yield from self.heads[task].parameters()

    def backbone_modules(self) -> Sequence[nn.Module]:
        return [self.trunk, *self.monitors.values()]

    def input_layers(self) -> Sequence[nn.Module]:
        return [first_layer(self.trunk), *(first_layer(m) for m in self.monitors.values())]

    def head_modules(self) -> Sequence[nn.Module]:
        return list(self.heads.values())
