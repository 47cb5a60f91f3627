"""Cross-stitch networks (Misra et al., CVPR 2016) at LeNet scale.

Every task has its own LeNet column. After each stage (each conv block, then the FC
layer) a cross-stitch unit mixes the columns' activations: task t continues with
x̃_t = Σ_s α_ts · x_s, α learned (scalars per stage and task pair, initialised to α_tt = 0.9
and 0.1 spread over the other columns, as in the paper). Head t reads x̃_t of the last stage.

Every column and every stitch but the last feeds all tasks, so they are the shared
parameters; the last stitch's row α_t· and head t only affect task t. The columns' last
stage outputs, stacked, are the shared representation (MGDA-UB, `mode=representation`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.models.lenet import first_layer, lenet_trunk
from mtlsparse.models.mtan import trunk_stages
from mtlsparse.tasks import Task


def stitch_init(tasks: Sequence[str], task: str, self_weight: float) -> Tensor:
    """Initial mixing row of `task`: self_weight on its own column, the rest spread evenly."""
    m = len(tasks)
    if m == 1:
        return torch.ones(1)
    row = torch.full((m,), (1.0 - self_weight) / (m - 1))
    row[list(tasks).index(task)] = self_weight
    return row


class CrossStitch(MultiTaskModel):
    """One LeNet column per task (same knobs as HPS), cross-stitch units after every stage, linear heads."""

    has_representation = True

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], channels: Sequence[int] = (10, 20),
                 hidden: int = 50, kernel_size: int = 5, batch_norm: bool = False,
                 self_weight: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= self_weight <= 1.0:
            raise ValueError(f"model.self_weight must be in [0, 1], got {self_weight}")
        self.tasks = dict(tasks)
        names = list(self.tasks)
        self.columns = nn.ModuleDict(
            {name: lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm) for name in names})
        self._stages = trunk_stages(self.columns[names[0]])
        self.stitches = nn.ModuleList(
            nn.ParameterDict({name: nn.Parameter(stitch_init(names, name, self_weight)) for name in names})
            for _ in self._stages)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, t.out_dim) for name, t in self.tasks.items()})

    @staticmethod
    def stitch(stitch: nn.ParameterDict, features: Tensor) -> dict[str, Tensor]:
        """Cross-stitch unit: features [B, m, ...] of all columns → each task's mixture Σ_s α_ts x_s."""
        return {name: torch.tensordot(alpha, features, dims=([0], [1])) for name, alpha in stitch.items()}

    def encode(self, x: Tensor) -> Tensor:
        """The columns' last-stage outputs, stacked [B, m, hidden]: every task depends on all of it."""
        h = {name: x for name in self.tasks}
        for index, stage in enumerate(self._stages):
            out = torch.stack([self.columns[name][stage](h[name]) for name in self.tasks], dim=1)
            if index == len(self._stages) - 1:
                return out
            h = self.stitch(self.stitches[index], out)
        raise AssertionError("unreachable: a LeNet trunk has at least one stage")  # pragma: no cover

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Last cross-stitch unit, then each task's head."""
        mixed = self.stitch(self.stitches[-1], z)
        return {name: self.heads[name](mixed[name]) for name in self.tasks}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        for stitch in self.stitches[:-1]:
            yield from stitch.parameters()
        yield from self.columns.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.stitches[-1][task]
        yield from self.heads[task].parameters()

    def backbone_modules(self) -> Sequence[nn.Module]:
        return list(self.columns.values())

    def input_layers(self) -> Sequence[nn.Module]:
        return [first_layer(column) for column in self.columns.values()]

    def head_modules(self) -> Sequence[nn.Module]:
        return list(self.heads.values())
