"""Multi-Task Attention Network (Liu et al., 2019) at LeNet scale.

A shared LeNet trunk produces features p^1..p^L at every stage (each conv block, then
the FC layer). Each task owns one attention module per stage that soft-masks the
shared features: q_t^j = σ(g_t^j([p^j, f_t^j(q_t^{j-1})])) ⊙ p^j, where f_t^j brings the
task's previous attended features to stage j's shape (a conv block or FC with the
trunk's geometry) and g_t^j is a two-layer 1×1 (or linear) gate. Head t reads q_t^L.
Nothing in an attention module is shared between tasks (the MDMTN reference code
shared one module across tasks).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel, flat_features
from mtlsparse.models.lenet import first_layer, lenet_trunk
from mtlsparse.tasks import Task


def trunk_stages(trunk: nn.Sequential) -> list[slice]:
    """Index ranges of the trunk's stages: each ends with a ReLU (conv blocks, then Flatten-FC-ReLU)."""
    ends = [i + 1 for i, layer in enumerate(trunk) if isinstance(layer, nn.ReLU)]
    return [slice(a, b) for a, b in zip([0, *ends[:-1]], ends)]


class AttentionStage(nn.Module):
    """One task's attention at one trunk stage: gate g over [shared, carried] features, carry f from before."""

    def __init__(self, gate: nn.Sequential, carry: nn.Module | None) -> None:
        super().__init__()
        self.gate, self.carry = gate, carry

    def forward(self, shared: Tensor, previous: Tensor | None) -> Tensor:
        gate_in = shared if previous is None else torch.cat([shared, self.carry(previous)], dim=1)
        return self.gate(gate_in) * shared


def conv_gate(in_ch: int, ch: int, batch_norm: bool) -> nn.Sequential:
    """1×1 conv - [BN] - ReLU - 1×1 conv - sigmoid: a per-position, per-channel soft mask."""
    norm = [nn.BatchNorm2d(ch)] if batch_norm else []
    return nn.Sequential(nn.Conv2d(in_ch, ch, 1), *norm, nn.ReLU(), nn.Conv2d(ch, ch, 1), nn.Sigmoid())


def linear_gate(in_dim: int, dim: int) -> nn.Sequential:
    """Linear - ReLU - Linear - sigmoid: a per-feature soft mask on the trunk's FC output."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Sigmoid())


class MTAN(MultiTaskModel):
    """Shared LeNet trunk + per-task attention stages + linear heads (same knobs as HPS)."""

    has_representation = False  # attention reads the trunk's features at every stage, not one z

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], channels: Sequence[int] = (10, 20),
                 hidden: int = 50, kernel_size: int = 5, batch_norm: bool = False) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.trunk = lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm)
        self._stages = trunk_stages(self.trunk)
        flat = flat_features(in_shape, self.trunk[:self._stages[-1].start])
        self.attention = nn.ModuleDict({name: self._task_attention(channels, hidden, kernel_size, batch_norm, flat)
                                        for name in self.tasks})
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, t.out_dim) for name, t in self.tasks.items()})

    @staticmethod
    def _task_attention(channels: Sequence[int], hidden: int, kernel_size: int, batch_norm: bool,
                        flat: int) -> nn.ModuleList:
        """One task's attention stages, mirroring the trunk's conv blocks and FC layer."""
        stages = [AttentionStage(conv_gate(channels[0], channels[0], batch_norm), None)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
            carry = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size), *norm, nn.MaxPool2d(2), nn.ReLU())
            stages.append(AttentionStage(conv_gate(2 * c_out, c_out, batch_norm), carry))
        carry = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU())
        stages.append(AttentionStage(linear_gate(2 * hidden, hidden), carry))
        return nn.ModuleList(stages)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared, h = [], x
        for stage in self._stages:
            h = self.trunk[stage](h)
            shared.append(h)
        out = {}
        for name in self.tasks:
            q = None
            for attention, p in zip(self.attention[name], shared):
                q = attention(p, q)
            out[name] = self.heads[name](q)
        return out

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.trunk.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.attention[task].parameters()
        yield from self.heads[task].parameters()

    def backbone_modules(self) -> Sequence[nn.Module]:
        return [self.trunk, *self.attention.values()]

    def input_layers(self) -> Sequence[nn.Module]:
        return [first_layer(self.trunk)]

    def head_modules(self) -> Sequence[nn.Module]:
        return list(self.heads.values())
