"""Customized Gate Control (CGC) at LeNet scale: the single-level PLE.

H. Tang, J. Liu, M. Zhao, X. Gong, *Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations*, RecSys 2020, §4.2.

Each task k owns `task_experts` LeNet experts, `shared_experts` LeNet experts serve all
tasks, and task k's gate is a softmax over its own and the shared experts only:
g^k(x) = w^k(x) S^k(x), w^k(x) = softmax(W^k x) over the m_k + m_s selected experts (x the
flattened input), S^k(x) the stacked outputs of task k's experts then the shared ones.
Head k reads g^k(x). Unlike MMoE, a task never mixes another task's experts.

Contract: the shared experts are the shared parameters (every task's gate weighs them);
task k's experts, gate and head are task k's. The gates read the raw input, so they are
input layers (not sparsified unless `scope.input_layers`), and there is no shared
representation the heads could decode alone: `mode=representation` fails at setup.
`ExtractionLayer` is one CGC layer; PLE (`ple.py`) stacks them and adds a shared gate.

The paper targets recommendation (embedding inputs, MLP experts), not dense prediction:
there is no ResNet-trunk variant here (docs/models.md).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.models.lenet import first_layer, lenet_trunk
from mtlsparse.tasks import Task


def mix(weights: Tensor, outputs: Sequence[Tensor]) -> Tensor:
    """Σ_e weights[:, e] · outputs[e]: a per-sample mixture ([B, E] weights) of same-shaped expert outputs.

    A sum of products rather than stack + reduce, so each expert's channels stay channels
    (compaction traces it like a residual sum) whatever the outputs' rank.
    """
    shape = (-1,) + (1,) * (outputs[0].dim() - 1)
    total = weights[:, 0].reshape(shape) * outputs[0]
    for e, out in enumerate(outputs[1:], start=1):
        total = total + weights[:, e].reshape(shape) * out
    return total


def check_counts(**counts: int) -> None:
    """Expert counts are integers >= 0 (`model.<name>`)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"model.{name} must be an integer >= 0, got {value!r}")


class ExtractionLayer(nn.Module):
    """One CGC layer: experts per task and shared, one softmax gate per task, optionally a shared gate.

    `make_expert()` builds one expert. Task k's experts and gate read `inputs[k]`; the shared
    experts (and the shared gate) read `shared_input`. Task k's gate weighs [its experts,
    shared experts]; the shared gate (PLE below its top level) weighs every expert of the
    layer: [task experts in task order, shared experts]. `gate_in` is the flattened size of
    the layer's inputs.
    """

    def __init__(self, tasks: Sequence[str], make_expert: Callable[[], nn.Module], task_experts: int,
                 shared_experts: int, gate_in: int, shared_gate: bool) -> None:
        super().__init__()
        check_counts(task_experts=task_experts, shared_experts=shared_experts)
        if task_experts + shared_experts < 1:
            raise ValueError("model.task_experts + model.shared_experts must be >= 1 (a gate needs an expert)")
        self.task_names = list(tasks)
        self.experts = nn.ModuleDict({t: nn.ModuleList(make_expert() for _ in range(task_experts))
                                      for t in self.task_names})
        self.shared = nn.ModuleList(make_expert() for _ in range(shared_experts))
        self.gates = nn.ModuleDict({t: nn.Linear(gate_in, task_experts + shared_experts) for t in self.task_names})
        total = len(self.task_names) * task_experts + shared_experts
        self.shared_gate = nn.Linear(gate_in, total) if shared_gate else None

    def gate_weights(self, inputs: dict[str, Tensor], shared_input: Tensor) -> dict[str, Tensor]:
        """Each task's softmax weights [B, m_k + m_s] (and the shared gate's, key "shared", when there is one)."""
        weights = {t: torch.softmax(self.gates[t](inputs[t].flatten(1)), dim=1) for t in self.task_names}
        if self.shared_gate is not None:
            weights["shared"] = torch.softmax(self.shared_gate(shared_input.flatten(1)), dim=1)
        return weights

    def forward(self, inputs: dict[str, Tensor], shared_input: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """Each task's gated mixture, and the shared gate's mixture (None at the top level)."""
        weights = self.gate_weights(inputs, shared_input)
        shared = [expert(shared_input) for expert in self.shared]
        own = {t: [expert(inputs[t]) for expert in self.experts[t]] for t in self.task_names}
        out = {t: mix(weights[t], own[t] + shared) for t in self.task_names}
        if self.shared_gate is None:
            return out, None
        return out, mix(weights["shared"], [o for t in self.task_names for o in own[t]] + shared)


class CGC(MultiTaskModel):
    """Shared and per-task LeNet experts (same knobs as MMoE), one gate per task over its own + shared experts."""

    has_representation = False  # the gates read the input too

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], shared_experts: int = 1,
                 task_experts: int = 1, channels: Sequence[int] = (10, 20), hidden: int = 50, kernel_size: int = 5,
                 batch_norm: bool = False) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.layer = ExtractionLayer(list(self.tasks), lambda: lenet_trunk(in_shape, channels, hidden, kernel_size,
                                                                           batch_norm),
                                     task_experts, shared_experts, math.prod(in_shape), shared_gate=False)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, t.out_dim) for name, t in self.tasks.items()})

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """Each task's softmax weights over [its experts, shared experts], [B, m_k + m_s]."""
        return self.layer.gate_weights({t: x for t in self.tasks}, x)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        mixed, _ = self.layer({t: x for t in self.tasks}, x)
        return {name: self.heads[name](mixed[name]) for name in self.tasks}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.layer.shared.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.layer.experts[task].parameters()
        yield from self.layer.gates[task].parameters()
        yield from self.heads[task].parameters()

    def backbone_modules(self) -> Sequence[nn.Module]:
        return [self.layer]

    def input_layers(self) -> Sequence[nn.Module]:
        experts = [*self.layer.shared, *(e for t in self.tasks for e in self.layer.experts[t])]
        return [*(first_layer(e) for e in experts), *self.layer.gates.values()]

    def head_modules(self) -> Sequence[nn.Module]:
        return list(self.heads.values())
