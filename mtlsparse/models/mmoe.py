"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) at LeNet scale.

E LeNet experts see the input; each task t has a gate, a linear map of the flattened
input followed by a softmax over the experts, and its head reads the gated mixture
f_t(x) = Σ_e g_t,e(x) · expert_e(x). The experts are shared by all tasks; gate t and
head t belong to task t. Gates read the raw input, so they count as input layers (not
sparsified unless `scope.input_layers`). The mixture depends on the input through the
gates as well as through the experts, so there is no shared representation that the
heads could decode alone: MGDA-UB / `mode=representation` fail with a clear error.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.models.lenet import first_layer, lenet_trunk
from mtlsparse.tasks import Task


def check_num_experts(num_experts: int) -> int:
    """`model.num_experts`: an integer >= 1."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"model.num_experts must be an integer >= 1, got {num_experts!r}")
    return num_experts


class SharedExperts(MultiTaskModel):
    """Base of the mixture-of-experts models: `num_experts` LeNet experts shared by every task and, per
    task, a gate (built by `make_gate`) and a linear head on the gated mixture of the experts' features.

    Contract: the experts are the shared parameters; task t's gate and head are task t's.
    """

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], num_experts: int,
                 channels: Sequence[int], hidden: int, kernel_size: int, batch_norm: bool,
                 make_gate: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.experts = nn.ModuleList(lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm)
                                     for _ in range(check_num_experts(num_experts)))
        self.gates = nn.ModuleDict({name: make_gate() for name in self.tasks})
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, t.out_dim) for name, t in self.tasks.items()})

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.experts.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.gates[task].parameters()
        yield from self.heads[task].parameters()

    def backbone_modules(self) -> Sequence[nn.Module]:
        return [*self.experts, *self.gates.values()]

    def expert_input_layers(self) -> list[nn.Module]:
        """Each expert's first layer (it reads the raw input)."""
        return [first_layer(expert) for expert in self.experts]

    def head_modules(self) -> Sequence[nn.Module]:
        return list(self.heads.values())


class MMoE(SharedExperts):
    """`num_experts` LeNet experts (same knobs as HPS) + one softmax gate and one linear head per task."""

    has_representation = False  # the gates read the input too

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], num_experts: int = 3,
                 channels: Sequence[int] = (10, 20), hidden: int = 50, kernel_size: int = 5,
                 batch_norm: bool = False) -> None:
        super().__init__(tasks, in_shape, num_experts, channels, hidden, kernel_size, batch_norm,
                         make_gate=lambda: nn.Linear(math.prod(in_shape), num_experts))

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """Each task's softmax weights over the experts, [B, E]."""
        flat = x.flatten(1)
        return {name: torch.softmax(gate(flat), dim=1) for name, gate in self.gates.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, hidden]
        return {name: self.heads[name]((g.unsqueeze(-1) * experts).sum(dim=1))
                for name, g in self.gate_weights(x).items()}

    def input_layers(self) -> Sequence[nn.Module]:
        return [*self.expert_input_layers(), *self.gates.values()]
