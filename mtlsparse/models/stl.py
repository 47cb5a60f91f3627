"""Single-task learning baseline: an independent trunk and head per task."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.models.lenet import first_layer, lenet_trunk
from mtlsparse.tasks import Task


class STL(MultiTaskModel):
    """One LeNet trunk + head per task, trained jointly but sharing nothing."""

    has_representation = False  # nothing is shared

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], channels: Sequence[int] = (10, 20),
                 hidden: int = 50, kernel_size: int = 5, batch_norm: bool = False) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.trunks = nn.ModuleDict(
            {name: lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm) for name in self.tasks})
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, t.out_dim) for name, t in self.tasks.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: self.heads[name](self.trunks[name](x)) for name in self.tasks}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.trunks[task].parameters()
        yield from self.heads[task].parameters()

    def backbone_modules(self) -> Sequence[nn.Module]:
        return list(self.trunks.values())

    def input_layers(self) -> Sequence[nn.Module]:
        return [first_layer(t) for t in self.trunks.values()]

    def head_modules(self) -> Sequence[nn.Module]:
        return list(self.heads.values())
