"""Learning to Branch (LTB): a layered tree whose branching is learned by Gumbel-softmax, then fixed.

P. Guo, C.-Y. Lee, D. Ulbricht, *Learning to Branch for Multi-Task Learning*, ICML 2020.

Search space: the trunk's stages are the layers of a tree; layer l holds `nodes[l]` copies
of stage l (default: one per task). Every node of layer 0 reads the input (the root); node
i of layer l ≥ 1 has one parent among the nodes of layer l − 1, and task t's head has one
parent among the nodes of the last layer. Each choice is a categorical distribution with
learned logits θ (branching probabilities softmax(θ), initially uniform).

- Search phase (training until the end of epoch `search_epoch`, by default half the run:
  `search_fraction=0.5`): a child reads Σ_j d_j · parent_j with d a Gumbel-softmax sample of
  θ at temperature τ (`hard=true`: one-hot forward, soft backward), so the weights and θ
  train together end to end; τ anneals geometrically from `tau_start` (first epoch) to
  `tau_end` (last search epoch).
- Then every child keeps its most probable parent (argmax θ), the tree is fixed (buffers,
  saved in checkpoints) and training continues on it with θ unused (unused parameters get an
  exact zero gradient, so DDP's default strategy still sees every one). Evaluation always
  runs the argmax tree (the one that is or will be fixed), computing only the nodes that a
  task's path reaches, so a fixed model's unused nodes cost nothing and export sees the tree.

Contract: the nodes and the inner branching logits are the shared parameters (during the
search every task's loss reaches every node; after the fix a node matters to the tasks
below it, a subset, and the declared split stays the search's: a task's gradient is zero
where it does not reach); task t's head and its head logits are task t's. The last layer's
outputs, stacked ([B, nodes, ...]), are the shared representation (`encode`; every head
reads them, chosen by its branching): MGDA-UB / `mode=representation` work. Layer-0 nodes'
first layers read the input (input layers).

Targets: the paper evaluates image-level tasks (CelebA attributes) and dense prediction
(Taskonomy), so there are two variants: `LTB` on LeNet stages (Multi-*), and `LTBResNet`
on the dilated ResNet trunk's stem and stages with DeepLab-v3 ASPP heads for dense tasks
(`model=ltb_resnet`). LibMTL's LTB deviates (it never fixes the tree and samples a random
one at test time): docs/models.md.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlsparse.errors import ConfigError
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.models.deeplab import ResNetTrunk, task_heads
from mtlsparse.models.lenet import first_layer, lenet_trunk
from mtlsparse.models.mtan import trunk_stages
from mtlsparse.tasks import Task
from mtlsparse.training_state import TrainingState

log = logging.getLogger("mtlsparse")


def weighted_sum(weights: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Σ_j weights[j] · tensors[j] for one weight vector (a branching sample)."""
    total = weights[0] * tensors[0]
    for j in range(1, len(tensors)):
        total = total + weights[j] * tensors[j]
    return total


def search_end_epoch(max_epochs: int | None, fraction: float, epoch: int | None) -> int:
    """The 0-based epoch at whose end the tree is fixed (the schedule convention of docs/README.md)."""
    if epoch is not None:
        if max_epochs is not None and max_epochs >= 1 and epoch >= max_epochs:
            raise ConfigError(f"model.search_epoch={epoch} is past the last epoch of trainer.max_epochs={max_epochs} "
                              f"(epochs 0..{max_epochs - 1}): lower model.search_epoch or drop it "
                              "(model.search_epoch=null) to use model.search_fraction, a fraction of the run")
        return epoch
    if max_epochs is None or max_epochs < 1:
        raise ConfigError("model.search_fraction is a fraction of trainer.max_epochs, which is unbounded here: set "
                          "trainer.max_epochs or give model.search_epoch explicitly")
    return min(max(int(fraction * max_epochs + 0.5 + 1e-9) - 1, 0), max_epochs - 1)


def node_counts(nodes: int | Sequence[int] | None, layers: int, tasks: int) -> list[int]:
    """Nodes per layer: null → one per task; an int → that many in every layer; a list → one count per layer."""
    counts = [tasks] * layers if nodes is None else [nodes] * layers if isinstance(nodes, int) else list(nodes)
    if len(counts) != layers or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"model.nodes must be null (one node per task), an integer >= 1 or a list of {layers} "
                         f"integers >= 1 (one per layer of the trunk), got {nodes!r}")
    return counts


class BranchingModel(MultiTaskModel):
    """The LTB tree over given layers of nodes and heads; subclasses build the nodes (`LTB`, `LTBResNet`)."""

    has_representation = True  # the last layer's outputs, stacked

    def __init__(self, tasks: dict[str, Task], layers: Sequence[Sequence[nn.Module]], heads: dict[str, nn.Module],
                 search_fraction: float = 0.5, search_epoch: int | None = None, tau_start: float = 5.0,
                 tau_end: float = 0.5, hard: bool = False) -> None:
        super().__init__()
        if isinstance(search_fraction, bool) or not isinstance(search_fraction, (int, float)) \
                or not 0 <= search_fraction <= 1:
            raise ConfigError(f"model.search_fraction must be a fraction of trainer.max_epochs in [0, 1], "
                              f"got {search_fraction!r}")
        if search_epoch is not None and (isinstance(search_epoch, bool) or not isinstance(search_epoch, int)
                                         or search_epoch < 0):
            raise ConfigError(f"model.search_epoch must be null or an integer epoch >= 0, got {search_epoch!r}")
        if not (tau_start > 0 and tau_end > 0):
            raise ValueError(f"model.tau_start and model.tau_end must be > 0, got {tau_start!r}, {tau_end!r}")
        if not isinstance(hard, bool):
            raise ValueError(f"model.hard must be true or false, got {hard!r}")
        self.tasks = dict(tasks)
        self.search_fraction, self.search_epoch = float(search_fraction), search_epoch
        self.tau_start, self.tau_end, self.hard = float(tau_start), float(tau_end), hard
        self.nodes = nn.ModuleList(nn.ModuleList(layer) for layer in layers)
        widths = [len(layer) for layer in self.nodes]
        #: branching logits θ of layer l ≥ 1: [nodes of l, nodes of l − 1]; of each head: [nodes of the last layer]
        self.branch_logits = nn.ParameterDict({str(layer): nn.Parameter(torch.zeros(widths[layer], widths[layer - 1]))
                                               for layer in range(1, len(widths))})
        self.head_logits = nn.ParameterDict({name: nn.Parameter(torch.zeros(widths[-1])) for name in self.tasks})
        self.heads = nn.ModuleDict(heads)
        for layer in range(1, len(widths)):
            self.register_buffer(f"parents_{layer}", torch.zeros(widths[layer], dtype=torch.long))
        self.register_buffer("head_parents", torch.zeros(len(self.tasks), dtype=torch.long))
        self.register_buffer("fixed", torch.tensor(False))
        self.register_buffer("tau", torch.tensor(self.tau_start))
        self._search_end: int | None = None

    # ------------------------------------------------------------ branching
    def branching_probabilities(self) -> dict[str, Tensor]:
        """softmax(θ) of every choice: {"<layer>": [children, parents], "head/<task>": [last-layer nodes]}."""
        probs = {key: torch.softmax(logits, dim=-1) for key, logits in self.branch_logits.items()}
        probs.update({f"head/{name}": torch.softmax(logits, dim=-1) for name, logits in self.head_logits.items()})
        return probs

    def parents(self) -> tuple[list[list[int]], dict[str, int]]:
        """The argmax tree (the fixed one once fixed): each layer-l ≥ 1 node's parent, each head's parent."""
        if bool(self.fixed):
            inner = [getattr(self, f"parents_{layer}").tolist() for layer in range(1, len(self.nodes))]
            return inner, dict(zip(self.tasks, self.head_parents.tolist()))
        inner = [self.branch_logits[str(layer)].argmax(-1).tolist() for layer in range(1, len(self.nodes))]
        return inner, {name: int(self.head_logits[name].argmax()) for name in self.tasks}

    def fix_(self) -> None:
        """End the search: every child keeps its most probable parent from now on."""
        inner, heads = self.parents()
        with torch.no_grad():
            for layer, chosen in enumerate(inner, start=1):
                getattr(self, f"parents_{layer}").copy_(torch.tensor(chosen))
            self.head_parents.copy_(torch.tensor([heads[name] for name in self.tasks]))
            self.fixed.fill_(True)

    def architecture(self) -> dict[str, list[int] | dict[str, int]]:
        """The (argmax or fixed) tree: layer l's parents (l ≥ 1), each head's parent; for logs and tests."""
        inner, heads = self.parents()
        return {**{f"layer{layer}": chosen for layer, chosen in enumerate(inner, start=1)}, "heads": heads}

    def _searching(self) -> bool:
        return self.training and not bool(self.fixed)

    def _sample(self, logits: Tensor) -> Tensor:
        return F.gumbel_softmax(logits, tau=float(self.tau), hard=self.hard, dim=-1)

    # ------------------------------------------------------------ forward
    def _head(self, name: str, features: Tensor) -> Tensor:
        return self.heads[name](features)

    def encode(self, x: Tensor) -> Tensor:
        """Every node's output, layer by layer; the last layer's stacked [B, nodes, ...] is the representation."""
        self._remember_input(x)
        outs = [node(x) for node in self.nodes[0]]
        inner, _ = (None, None) if self._searching() else self.parents()
        for layer in range(1, len(self.nodes)):
            if inner is None:
                d = self._sample(self.branch_logits[str(layer)])
                outs = [node(weighted_sum(d[i], outs)) for i, node in enumerate(self.nodes[layer])]
            else:
                outs = [node(outs[p]) for node, p in zip(self.nodes[layer], inner[layer - 1])]
        return torch.stack(outs, dim=1)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Each head's branching over the last layer's outputs z [B, nodes, ...], then the head."""
        outs = z.unbind(1)
        if self._searching():
            return {name: self._head(name, weighted_sum(self._sample(self.head_logits[name]), outs))
                    for name in self.tasks}
        _, heads = self.parents()
        return self._tie_unused({name: self._head(name, outs[heads[name]]) for name in self.tasks}, None)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self._searching():
            return self.decode(self.encode(x))
        self._remember_input(x)
        inner, heads = self.parents()
        needed = self._reached(inner, heads)
        outs = {i: self.nodes[0][i](x) for i in sorted(needed[0])}
        for layer in range(1, len(self.nodes)):
            outs = {i: self.nodes[layer][i](outs[inner[layer - 1][i]]) for i in sorted(needed[layer])}
        return self._tie_unused({name: self._head(name, outs[heads[name]]) for name in self.tasks}, needed)

    def reached_nodes(self) -> list[set[int]]:
        """Per layer, the nodes of the argmax (or fixed) tree that some task's path reaches, from the heads down."""
        return self._reached(*self.parents())

    def _reached(self, inner: list[list[int]], heads: dict[str, int]) -> list[set[int]]:
        """`reached_nodes` of the tree that `parents()` returned (inner parents, head parents)."""
        needed: list[set[int]] = [set() for _ in self.nodes]
        needed[-1] = set(heads.values())
        for layer in range(len(self.nodes) - 1, 0, -1):
            needed[layer - 1] = {inner[layer - 1][i] for i in needed[layer]}
        return needed

    def unreachable_modules(self) -> list[str]:
        """The tree's nodes that no task's path reaches: evaluation never computes them."""
        return [f"nodes.{layer}.{i}" for layer, used in enumerate(self.reached_nodes())
                for i in range(len(self.nodes[layer])) if i not in used]

    def _tie_unused(self, out: dict[str, Tensor], needed: list[set[int]] | None) -> dict[str, Tensor]:
        """While training the fixed tree, add 0 · Σ(unused parameters) to the outputs.

        The logits and the nodes no task reaches (`needed`: the computed nodes per layer, None:
        all) then get an exact zero gradient instead of none, as DDP's default strategy
        requires of every parameter at every step; outputs and every other gradient are
        unchanged. Evaluation does not do it, so export traces only the tree.
        """
        if not self.training:
            return out
        unused = [*self.branch_logits.values(), *self.head_logits.values()]
        if needed is not None:
            unused += [p for layer, used in zip(self.nodes, needed) for i, node in enumerate(layer) if i not in used
                       for p in node.parameters()]
        tie = torch.stack([p.sum() for p in unused]).sum() * 0.0
        return {name: y + tie for name, y in out.items()}

    def _remember_input(self, x: Tensor) -> None:
        """Hook for heads that need the input size (dense outputs); nothing here."""

    # ------------------------------------------------------------ schedule
    def set_budget(self, max_epochs: int | None) -> None:
        self._search_end = search_end_epoch(max_epochs, self.search_fraction, self.search_epoch)

    def temperature(self, epoch: int, end: int) -> float:
        """τ of search epoch `epoch` (0..end): geometric from tau_start to tau_end."""
        ratio = min(epoch / end, 1.0) if end > 0 else 0.0
        return self.tau_start * (self.tau_end / self.tau_start) ** ratio

    def on_train_epoch_end(self, state: TrainingState) -> None:
        """Fix the tree at the end of the search's last epoch; else anneal τ for the next epoch."""
        if bool(self.fixed):
            return
        end = self._search_end
        if end is None:
            end = search_end_epoch(state.max_epochs, self.search_fraction, self.search_epoch)
        if state.epoch >= end:
            self.fix_()
            log.info("LTB: branching fixed after epoch %d: %s", state.epoch, self.architecture())
        else:
            self.tau.fill_(self.temperature(state.epoch + 1, end))
        state.log({"ltb/fixed": float(self.fixed), "ltb/tau": float(self.tau)})

    # ------------------------------------------------------------ contract
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.branch_logits.parameters()  # first: the last shared weight is a node's (GradNorm's W)
        yield from self.nodes.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.head_logits[task]
        yield from self.heads[task].parameters()

    def backbone_modules(self) -> Sequence[nn.Module]:
        return [self.nodes]

    def input_layers(self) -> Sequence[nn.Module]:
        return [first_layer(node) for node in self.nodes[0]]

    def head_modules(self) -> Sequence[nn.Module]:
        return list(self.heads.values())


class LTB(BranchingModel):
    """LTB over the LeNet trunk's stages (each conv block, then the FC layer; same knobs as HPS) + linear heads."""

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], nodes: int | Sequence[int] | None = None,
                 channels: Sequence[int] = (10, 20), hidden: int = 50, kernel_size: int = 5,
                 batch_norm: bool = False, search_fraction: float = 0.5, search_epoch: int | None = None,
                 tau_start: float = 5.0, tau_end: float = 0.5, hard: bool = False) -> None:
        stages = trunk_stages(lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm))
        widths = node_counts(nodes, len(stages), len(tasks))
        columns = [lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm) for _ in range(max(widths))]
        layers = [[columns[i][stage] for i in range(n)] for stage, n in zip(stages, widths)]
        heads = {name: nn.Linear(hidden, t.out_dim) for name, t in tasks.items()}
        super().__init__(tasks, layers, heads, search_fraction, search_epoch, tau_start, tau_end, hard)


def resnet_stages(trunk: ResNetTrunk) -> list[nn.Module]:
    """The trunk's stem (conv1-bn1-relu-maxpool) and its stages layer1..layer4: the tree's five layers."""
    stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
    return [stem, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4]


class LTBResNet(BranchingModel):
    """LTB over the dilated ResNet trunk's stem and stages; ASPP heads for dense tasks, pooled heads otherwise.

    The trunk and head knobs are DeepLabResNet's (`model=deeplab_resnet`); `pretrained` starts
    every node from the same local torchvision checkpoint. Dense outputs are upsampled to the
    input size.
    """

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], nodes: int | Sequence[int] | None = None,
                 depth: int = 50, width: float = 1.0, output_stride: int = 8,
                 atrous_rates: Sequence[int] | None = None, head_channels: int | None = None,
                 cls_hidden: int | None = None, pretrained: str | None = None, search_fraction: float = 0.5,
                 search_epoch: int | None = None, tau_start: float = 5.0, tau_end: float = 0.5,
                 hard: bool = False) -> None:
        widths = node_counts(nodes, 5, len(tasks))
        columns = [ResNetTrunk(depth, width, output_stride, in_channels=in_shape[0]) for _ in range(max(widths))]
        if pretrained:
            for column in columns:
                column.load_torchvision(Path(pretrained))
        stages = [resnet_stages(column) for column in columns]
        layers = [[stages[i][layer] for i in range(n)] for layer, n in enumerate(widths)]
        heads = task_heads(tasks, columns[0].out_channels, width, output_stride, atrous_rates, head_channels,
                           cls_hidden)
        super().__init__(tasks, layers, heads, search_fraction, search_epoch, tau_start, tau_end, hard)
        self._input_size: tuple[int, int] | None = None

    def _remember_input(self, x: Tensor) -> None:
        self._input_size = (x.shape[-2], x.shape[-1])

    def _head(self, name: str, features: Tensor) -> Tensor:
        y = self.heads[name](features)
        if not self.tasks[name].dense:
            return y
        if self._input_size is None:
            raise RuntimeError("decode(z) needs the input size: call encode(x) first")
        return F.interpolate(y, size=self._input_size, mode="bilinear", align_corners=False)
