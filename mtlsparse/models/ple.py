"""Progressive Layered Extraction (PLE) at LeNet scale: stacked CGC layers with a shared gate.

H. Tang, J. Liu, M. Zhao, X. Gong, *Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations*, RecSys 2020, §4.3.

The LeNet trunk's stages (each conv block, then the FC layer) are split into `num_levels`
extraction levels, as evenly as possible with the lower levels taking the extra stages
(3 stages, 2 levels: [conv1, conv2], [FC]). Level j has per-task and shared experts, each a
copy of that level's trunk stages. With g^{k,0} = g^{s,0} = x:

- task k's experts and gate read task k's previous output g^{k,j−1}; its gate is a softmax
  over [task k's experts, shared experts] of the level (as in CGC);
- the shared experts read the shared module's previous output g^{s,j−1}, and below the top
  level a shared gate (softmax over *every* expert of the level, read from g^{s,j−1})
  gives g^{s,j}; the top level has no shared gate;
- head k reads g^{k,N}. `num_levels=1` is CGC.

Contract, from what each loss really depends on (tests check it with autograd): the shared
experts and shared gates of every level, the task experts below the top level (the shared
gate weighs them) and the task gates more than two levels below the top (they feed task
experts that the shared gate weighs) are shared; task k's top-level experts, its gates of
the top two levels and its head are task k's. Level-1 experts' first layers and level-1
gates read the raw input (input layers); the higher gates are backbone layers that the
sparsity methods may act on. Gates read the input, so there is no shared representation:
`mode=representation` fails at setup.

LibMTL's PLE has no shared gate and runs the shared experts on each task's own previous
output, so its shared path is not carried between levels (docs/models.md). The paper
targets recommendation, not dense prediction: there is no ResNet-trunk variant here.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel, flat_features
from mtlsparse.models.cgc import ExtractionLayer
from mtlsparse.models.lenet import first_layer, lenet_trunk
from mtlsparse.models.mtan import trunk_stages
from mtlsparse.tasks import Task


def level_slices(num_stages: int, num_levels: int) -> list[slice]:
    """Stage index ranges of the levels: contiguous, as even as possible, lower levels first to get an extra stage."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or not 1 <= num_levels <= num_stages:
        raise ValueError(f"model.num_levels must be an integer in 1..{num_stages} (the trunk's stages: one per conv "
                         f"block and the FC layer), got {num_levels!r}")
    base, extra = divmod(num_stages, num_levels)
    sizes = [base + 1] * extra + [base] * (num_levels - extra)
    starts = [sum(sizes[:j]) for j in range(num_levels)]
    return [slice(a, a + n) for a, n in zip(starts, sizes)]


class PLE(MultiTaskModel):
    """`num_levels` CGC levels of LeNet-stage experts (same knobs as CGC), a shared gate below the top level."""

    has_representation = False  # the gates read the input and every level's mixtures

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], num_levels: int = 2, shared_experts: int = 1,
                 task_experts: int = 1, channels: Sequence[int] = (10, 20), hidden: int = 50, kernel_size: int = 5,
                 batch_norm: bool = False) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        names = list(self.tasks)

        def trunk() -> nn.Sequential:
            return lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm)

        stages = trunk_stages(trunk())
        bounds = level_slices(len(stages), num_levels)
        layer_ranges = [slice(stages[b.start].start, stages[b.stop - 1].stop) for b in bounds]
        gate_in = [math.prod(in_shape)] + [flat_features(in_shape, trunk()[:r.stop]) for r in layer_ranges[:-1]]
        self.levels = nn.ModuleList(
            ExtractionLayer(names, lambda r=r: trunk()[r], task_experts, shared_experts, size,
                            shared_gate=j < num_levels - 1)
            for j, (r, size) in enumerate(zip(layer_ranges, gate_in)))
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, t.out_dim) for name, t in self.tasks.items()})

    def _extract(self, x: Tensor, record: list | None = None) -> dict[str, Tensor]:
        inputs, shared = {t: x for t in self.tasks}, x
        for level in self.levels:
            if record is not None:
                record.append(level.gate_weights(inputs, shared))
            inputs, shared = level(inputs, shared)
        return inputs

    def gate_weights(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Per level, each task's softmax weights [B, m_k + m_s] and (below the top) the shared gate's [B, all]."""
        record: list[dict[str, Tensor]] = []
        self._extract(x, record)
        return record

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        top = self._extract(x)
        return {name: self.heads[name](top[name]) for name in self.tasks}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        top = len(self.levels) - 1
        for j, level in enumerate(self.levels):
            yield from level.shared.parameters()
            if level.shared_gate is not None:
                yield from level.shared_gate.parameters()
            if j < top:  # the shared gate of this level weighs them
                yield from level.experts.parameters()
            if j < top - 1:  # they feed task experts that a shared gate weighs
                yield from level.gates.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        top = len(self.levels) - 1
        yield from self.levels[top].experts[task].parameters()
        for level in self.levels[max(top - 1, 0):]:
            yield from level.gates[task].parameters()
        yield from self.heads[task].parameters()

    def backbone_modules(self) -> Sequence[nn.Module]:
        return list(self.levels)

    def input_layers(self) -> Sequence[nn.Module]:
        bottom = self.levels[0]
        experts = [*bottom.shared, *(e for t in self.tasks for e in bottom.experts[t])]
        gates = [*bottom.gates.values(), *([bottom.shared_gate] if bottom.shared_gate is not None else [])]
        return [*(first_layer(e) for e in experts), *gates]

    def head_modules(self) -> Sequence[nn.Module]:
        return list(self.heads.values())
