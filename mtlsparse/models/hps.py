"""Hard parameter sharing: one shared trunk, one head per task."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.models.lenet import first_layer, lenet_trunk
from mtlsparse.tasks import Task


class SharedTrunkModel(MultiTaskModel):
    """Hard parameter sharing around any trunk: `trunk(x)` features feed one head per task."""

    has_representation = True

    def __init__(self, tasks: dict[str, Task], trunk: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)

    def encode(self, x: Tensor) -> Tensor:
        """Trunk features z shared by all heads (MGDA-UB differentiates w.r.t. these)."""
        return self.trunk(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Apply every task head to the shared representation."""
        return {name: head(z) for name, head in self.heads.items()}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.trunk.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()

    def backbone_modules(self) -> Sequence[nn.Module]:
        return [self.trunk]

    def input_layers(self) -> Sequence[nn.Module]:
        return [first_layer(self.trunk)]

    def head_modules(self) -> Sequence[nn.Module]:
        return list(self.heads.values())


class HPS(SharedTrunkModel):
    """LeNet HPS of docs/methods/growl_mdmtn.md: Conv(10,k5)-pool-ReLU-Conv(20,k5)-pool-ReLU-FC(50)-ReLU + FC heads."""

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], channels: Sequence[int] = (10, 20),
                 hidden: int = 50, kernel_size: int = 5, batch_norm: bool = False,
                 dropout: float = 0.0) -> None:
        trunk = lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm, dropout)
        super().__init__(tasks, trunk, {name: nn.Linear(hidden, t.out_dim) for name, t in tasks.items()})
