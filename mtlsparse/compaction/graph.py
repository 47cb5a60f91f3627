"""Which channels of a channel-sparse model no output depends on: dependency analysis, bounded.

torch-pruning's DependencyGraph says which channels are coupled and must go together
(conv → BN → ReLU, residual adds, concatenations, flatten → FC blocks, several task heads
reading one trunk). A channel is removable only when every conv/linear that reads it
ignores it, i.e. for each such consumer either

* its input group for the channel is all zero (what group lasso / GrOWL produce), or
* the channel is identically zero there: every producer's output row for it is zero, so
  the channel is a constant (bias, BN shift, ReLU) independent of the input, and a probe
  forward shows that constant is 0. A zero row with a non-zero bias/BN shift is kept.

Channels that reach a model output are never removed, and groups touching layers whose
channels are not independent (LayerNorm, GroupNorm, grouped convs, loose parameters) are
left whole.

The analysis is bounded and decided up front: an architecture declared in
`NOT_COMPACTABLE` (cross-stitch networks mix every task's channels through learned
scalars) is refused with one line (`NotCompactable`) before any tracing; the model is
traced once and torch-pruning's graph is asked for the coupled group of a layer only when
a layer reading its channel component ignores some input; each group search
(`coupled_group`) leaves a group whole once torch-pruning maps its channels past the
largest activation of the model (cross-stitch's `tensordot` reshapes made it multiply
indices without end), and runs under a `Budget` (wall-clock deadline, cap on the channel
indices it may hold), so it finishes quickly or stops with a clear `BudgetExceeded`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning._helpers import GroupItem, _HybridIndex
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.dependency import Dependency

from mtlsparse.channel_groups import WEIGHTED_TYPES, ChannelGroups, dependency_graph
from mtlsparse.compaction.errors import BudgetExceeded, NotCompactable
from mtlsparse.sparsity.masks import MASK

# wall-clock budget of one export's dependency analysis and cuts (s), and the most channel indices one
# group search may hold (torch-pruning keeps a Python object per index, ~125 bytes: ~125 MB)
BUDGET_S = 120.0
MAX_GROUP_INDICES = 1_000_000
# architectures whose channels export cannot remove, by model class name: (config option, why)
NOT_COMPACTABLE = {
    "CrossStitch": ("cross_stitch", "mixes every task's channels with cross-stitch units, so a channel can only be "
                                    "removed from all columns at once"),
}
# layers whose channels are not independent of each other: a group touching them stays whole
UNSAFE_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention, nn.RNNBase, nn.Embedding)


def check_compactable(model: nn.Module | type | str) -> None:
    """Raise `NotCompactable` when `model` (a module, its class, or a class name / `_target_` path) is
    declared in `NOT_COMPACTABLE`; decided from the class alone, before any tracing."""
    if isinstance(model, str):
        names = [model.rpartition(".")[2]]
    else:
        names = [cls.__name__ for cls in (model if isinstance(model, type) else type(model)).__mro__]
    for name in names:
        if name in NOT_COMPACTABLE:
            option, why = NOT_COMPACTABLE[name]
            raise NotCompactable(f"model={option} {why}: compaction is not supported for it; the trained sparse "
                                 "model in checkpoints/ is the result")


class Budget:
    """Limits of one export's dependency analysis: a wall-clock deadline (checked between layers
    and inside every group search) and a cap on the channel indices a group search may hold."""

    def __init__(self, seconds: float = BUDGET_S, max_indices: int = MAX_GROUP_INDICES) -> None:
        if not seconds > 0 or max_indices < 1:
            raise ValueError(f"export budget needs seconds > 0 and max_indices >= 1, got {seconds}, {max_indices}")
        self.seconds, self.max_indices = float(seconds), int(max_indices)
        self.deadline = time.monotonic() + self.seconds

    def check(self, where: str) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"dependency analysis ran past its {self.seconds:g} s budget ({where}); export "
                              "stopped (export.budget_s sets the budget)")


def _is_plain_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def channel_role(graph: tp.DependencyGraph, dep: Any, output_nodes: set) -> str:
    """What a group member does with the group's channels.

    consumer: conv/linear reading them (its input groups decide); producer: conv/linear
    writing them; output: they leave the model there; unsafe: channels are mixed or owned
    by something we cannot shrink exactly; passthrough: per-channel ops (BN, ReLU, add, cat ...).
    """
    module, writes = dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)
    if isinstance(module, nn.Parameter):
        return "unsafe"
    if isinstance(module, nn.Linear) or _is_plain_conv(module):
        if not writes:
            return "consumer"
        return "output" if dep.target in output_nodes else "producer"
    if dep.target in output_nodes:
        return "output"
    if _is_depthwise(module):
        return "passthrough"
    if isinstance(module, UNSAFE_TYPES + (nn.modules.conv._ConvNd,)):
        return "unsafe"
    return "passthrough"


def _scatter(n: int, roots: Tensor, values: Tensor, reduce: str) -> Tensor:
    """Reduce per-member bools onto the root channels (several members can map to one root)."""
    out = torch.full((n,), 1 if reduce == "amin" else 0, dtype=torch.int8)
    return out.scatter_reduce_(0, roots, values.to(torch.int8), reduce=reduce, include_self=True).bool()


def removable_channels(graph: tp.DependencyGraph, group: Any, output_nodes: set,
                       input_is_zero: dict[nn.Module, Tensor]) -> list[int]:
    """Root-channel indices of `group` that no output depends on (see module docstring)."""
    n = len(group[0].idxs)
    source_zero = torch.ones(n, dtype=torch.bool)
    consumers, producers = [], 0
    for item in group:
        role = channel_role(graph, item.dep, output_nodes)
        if role in ("unsafe", "output"):
            return []
        if role == "passthrough":
            continue
        idxs, roots = torch.as_tensor(item.idxs), torch.as_tensor(item.root_idxs)
        weight = item.dep.target.module.weight.detach()
        if len(idxs) and int(idxs.max()) >= weight.shape[0 if role == "producer" else 1]:
            return []  # torch-pruning coupled dims that do not match here (e.g. a broadcast): leave whole
        if role == "producer":
            producers += 1
            row_zero = weight.flatten(1).abs().amax(dim=1) == 0
            source_zero &= _scatter(n, roots, row_zero[idxs], "amin")
        else:
            consumers.append((item.dep.target.module, idxs, roots, weight))
    if not consumers:
        return []
    read = torch.zeros(n, dtype=torch.bool)
    for module, idxs, roots, weight in consumers:
        ignored = ChannelGroups.of(weight).zero()[idxs]
        if producers and module in input_is_zero:  # identically-zero channels (zero rows, zero constant)
            ignored |= source_zero[roots] & input_is_zero[module][idxs]
        read |= _scatter(n, roots, ~ignored, "amax")
    drop = (~read).nonzero().flatten().tolist()
    return drop[1:] if len(drop) == n else drop  # keep one channel: layers cannot be 0 wide


def probe(model: nn.Module, x: Tensor) -> tuple[dict[nn.Module, Tensor], int]:
    """One forward on `x`: per conv/linear, which input channels were exactly zero everywhere; and
    the most features per sample of any conv/linear input or output or model output (no channel
    or flattened-feature index of the model can reach it)."""
    seen: dict[nn.Module, Tensor] = {}
    sizes = [1]

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        sizes.extend(t[0].numel() for t in (*inputs, output) if isinstance(t, Tensor) and t.dim() > 1)
        if isinstance(module, nn.Linear) or _is_plain_conv(module):
            inp = inputs[0].detach()
            dim = inp.dim() - 1 if isinstance(module, nn.Linear) else 1
            zero = inp.transpose(0, dim).reshape(inp.shape[dim], -1).abs().amax(dim=1) == 0
            seen[module] = seen[module] & zero if module in seen else zero

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, WEIGHTED_TYPES)]
    try:
        with torch.no_grad():
            outputs = tp.utils.flatten_as_list(model(x))
    finally:
        for h in handles:
            h.remove()
    return seen, max(sizes + [t[0].numel() for t in outputs if isinstance(t, Tensor) and t.dim() > 1])


def _mapped_range(mapping: Any, idxs: list) -> tuple[int, int]:
    """(count, largest index + 1) that `mapping` turns `idxs` into, without building them: only
    torch-pruning's forward flatten grows them (each index i → i·stride … (i+1)·stride − 1)."""
    top = max(i.idx for i in idxs) + 1
    if isinstance(mapping, index_mapping._FlattenIndexMapping) and not mapping.reverse:
        return len(idxs) * mapping._stride, top * mapping._stride
    return len(idxs), top


def coupled_group(graph: tp.DependencyGraph, module: nn.Module, idxs: Sequence[int], budget: Budget,
                  index_limit: int | None = None) -> tp.Group | None:
    """torch-pruning's `get_pruning_group` for `module`'s output channels `idxs`, bounded.

    The same walk over the graph's dependencies and the same merged group (pruned by
    `group.prune()` as usual), but a target already reached with the same index set is not
    walked again whatever the order of its indices, the indices held are capped at
    `budget.max_indices` (checked before a flatten mapping multiplies them: `BudgetExceeded`)
    and the deadline is checked at every step. The walk ends with None (the caller leaves
    the group whole) when a mapping would reach an index ≥ `index_limit`: no tensor of the
    model has that many channels, so torch-pruning read a reshape of other dims (e.g. the
    batch-and-channel flattening inside a `tensordot`) as a flatten of channels.
    """
    if module not in graph.module2node:
        raise ValueError(f"{module} is not in the dependency graph")
    fn = graph.get_pruner_of_module(module).prune_out_channels
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1:
        fn = tp.pruner.function.prune_depthwise_conv_out_channels
    index_mapping.update_index_mapping(graph)  # concat/flatten offsets follow the current (cut) shapes
    root = graph.module2node[module]
    first = [_HybridIndex(idx=i, root_idx=i) for i in idxs]
    items = [(Dependency(fn, fn, source=root, target=root), first)]
    seen = {(root, fn): {frozenset(first)}}
    held, stack = len(first), list(items)
    while stack:
        budget.check(f"coupled channels of {graph._module2name.get(module, module)}")
        dep, current = stack.pop()
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            mapped = current
            for mapping in new_dep.index_mapping:
                if mapping is not None and mapped:
                    count, top = _mapped_range(mapping, mapped)
                    if index_limit is not None and top > index_limit:
                        return None
                    if held + count > budget.max_indices:
                        raise BudgetExceeded(
                            f"dependency analysis of {graph._module2name.get(module, module)} exceeded its budget of "
                            f"{budget.max_indices:,} channel indices: torch-pruning's graph couples far more entries "
                            "to its channels than they are (a reshape/matmul read as a flatten?); export stopped")
                    mapped = mapping(mapped)
            if not mapped:
                continue
            signature, key = frozenset(mapped), (new_dep.target, new_dep.handler)
            if signature in seen.setdefault(key, set()):
                continue
            seen[key].add(signature)
            held += len(mapped)
            items.append((new_dep, mapped))
            stack.append((new_dep, mapped))
    merged: dict[tuple, tuple[Any, list, set]] = {}  # per (target, handler), first-seen order, unique idx
    for dep, mapped in items:
        _, keep, have = merged.setdefault((dep.target, dep.handler), (dep, [], set()))
        for index in mapped:
            if index.idx not in have:
                have.add(index.idx)
                keep.append(index)
    group = tp.Group()
    group._DG = graph
    for dep, keep, _ in merged.values():
        item = GroupItem(dep, [i.idx for i in keep])
        item.root_idxs = [i.root_idx for i in keep]
        group._group.append(item)
    return group


def channel_components(graph: tp.DependencyGraph) -> dict[nn.Module, set[nn.Module]]:
    """Per plain conv/linear layer: the consumers of its channel component.

    A component is what a plain conv/linear writes, followed through every other node in
    both directions (BN, ReLU, add, cat, reshape, parameters ...) up to the plain conv/linear
    layers that read it (consumers: not followed) or write it (producers: followed on). Every
    coupled group rooted at a producer lies inside its component, and all producers of a
    component share it, so a component none of whose consumers ignores an input holds no
    removable channel, whichever of its layers is the root.
    """
    def boundary(node: Any) -> bool:
        return isinstance(node.module, nn.Linear) or _is_plain_conv(node.module)

    consumers_of: dict[nn.Module, set[nn.Module]] = {}
    for start in graph.module2node.values():
        if not boundary(start) or start.module in consumers_of:
            continue
        producers, consumers, seen = {start}, set(), set()
        todo = [(n, "in") for n in start.outputs]  # (node, the side of it we entered from)
        while todo:
            node, side = todo.pop()
            if (node, side) in seen:
                continue
            seen.add((node, side))
            if boundary(node):
                if side == "in":
                    consumers.add(node.module)
                elif node not in producers:
                    producers.add(node)
                    todo.extend((n, "in") for n in node.outputs)
            else:
                todo.extend((n, "out") for n in node.inputs)
                todo.extend((n, "in") for n in node.outputs)
        for producer in producers:
            consumers_of[producer.module] = consumers
    return consumers_of


def coupled_groups(graph: tp.DependencyGraph, budget: Budget, wanted: Callable[[nn.Module], bool] | None = None,
                   index_limit: int | None = None) -> Iterator[tuple[nn.Module, tp.Group]]:
    """(root layer, group of all its output channels) per coupled group, like torch-pruning's
    `get_all_groups` but bounded: `coupled_group` under `budget`, the deadline checked between
    layers, and only roots `wanted(layer)` accepts searched (a layer already in an earlier
    group's output channels is not a root again)."""
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        budget.check(f"at layer {graph._module2name.get(module, module)}")
        if wanted is not None and not wanted(module):
            continue
        group = coupled_group(graph, module, range(pruner.get_out_channels(module)), budget, index_limit)
        if group is not None:
            visited.update(item.dep.target.module for item in group
                           if graph.is_out_channel_pruning_fn(item.dep.handler))
            yield module, group


def plan_removal(model: nn.Module, x: Tensor, budget: Budget | None = None
                 ) -> tuple[tp.DependencyGraph, dict[str, list[int]]]:
    """Trace `model` on `x` once and decide, per coupled group, which root-layer output channels can go.

    Only layers whose channel component (`channel_components`) has a consumer that ignores
    an input (zero input group, or a channel the probe saw identically zero) get a group
    search; the others cannot lose a channel.
    """
    budget = budget or Budget()
    input_is_zero, limit = probe(model, x)
    graph, output_nodes = dependency_graph(model, x)
    names = {m: n for n, m in model.named_modules()}
    ignores = {m for m in graph.module2node if (isinstance(m, nn.Linear) or _is_plain_conv(m))
               and bool(ChannelGroups.of(m.weight.detach()).zero().any() or input_is_zero.get(m, torch.zeros(1)).any())}
    consumers_of = channel_components(graph)

    def wanted(module: nn.Module) -> bool:
        # a root outside every component (a grouped/transposed conv) is searched as before
        return graph.module2node[module] not in output_nodes and (
            module not in consumers_of or not ignores.isdisjoint(consumers_of[module]))

    plan: dict[str, list[int]] = {}
    for module, group in coupled_groups(graph, budget, wanted, limit):
        drop = removable_channels(graph, group, output_nodes, input_is_zero)
        if drop:
            plan[names[module]] = drop
    return graph, plan


def zero_channel_groups(model: nn.Module) -> int:
    """All-zero input groups and output rows of the model's conv/linear layers: what export could remove."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) or _is_plain_conv(module):
                weight = module.weight
                if MASK in module._buffers:
                    weight = weight * module._buffers[MASK]
                zero_rows = weight.flatten(1).abs().amax(dim=1) == 0
                count += int(ChannelGroups.of(weight).zero().sum()) + int(zero_rows.sum())
    return count


