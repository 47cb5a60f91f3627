"""Export: physically remove the channels of a channel-sparse model that no output depends on.

`compact(model, x)` returns a smaller copy with the same outputs. torch-pruning's
DependencyGraph says which channels are coupled and must go together (conv → BN → ReLU,
residual adds, concatenations, flatten → FC blocks, several task heads reading one trunk).
A channel is removed only when every conv/linear that reads it ignores it, i.e. for each
such consumer either

* its input group for the channel is all zero (what group lasso / GrOWL produce), or
* the channel is identically zero there: every producer's output row for it is zero, so
  the channel is a constant (bias, BN shift, ReLU) independent of the input, and a probe
  forward shows that constant is 0. A zero row with a non-zero bias/BN shift is kept.

Channels that reach a model output are never removed, and groups touching layers whose
channels are not independent (LayerNorm, GroupNorm, grouped convs, loose parameters) are
left whole. After the channel cut, a linear layer that still has all-zero input columns
(e.g. an FC layer after Flatten whose group lasso zeroed single features, not whole conv
channels) keeps only its read columns and gathers its inputs (`gather_inputs_`), so its
weight and its multiply-adds shrink with the group sparsity. Every export then checks the
compact outputs against the original ones.

Export is bounded and decided up front:

* an architecture declared in `NOT_COMPACTABLE` (cross-stitch networks mix every task's
  channels through learned scalars) is refused at once with one line (`NotCompactable`),
  before any tracing;
* a model with no all-zero channel group (e.g. a λ = 0 run) is skipped (`NothingToRemove`):
  no compact file, no export metrics;
* the dependency analysis traces the model once and asks torch-pruning's graph for the
  coupled group of a layer only when a layer reading its channel component ignores some
  input; each group search (`coupled_group`) leaves a group whole once torch-pruning maps
  its channels past the largest activation of the model (cross-stitch's `tensordot` reshapes
  made it multiply indices without end), and runs under a `Budget` (wall-clock deadline,
  cap on the channel indices it may hold), so it finishes quickly or stops with a clear
  `BudgetExceeded` error.

`mtlsparse export <run_dir>` (`main`) rebuilds a run's model from `.hydra/config.yaml`,
loads a checkpoint, compacts it, checks max |Δoutput| ≤ 1e-4, saves `compact_model.pt`
and adds `params/compact` and the CPU batch-inference latency of both models (median and
interquartile range, `latency/measurable` false when the ranges overlap) to metrics.json.
`export_after_training` does the same at the end of `train.run`.

`compact_model.pt` holds the compact `state_dict` and the run's config, not a pickled
module (whole-model pickles break when code moves, see METHODS.md): `load_compact`
rebuilds the model from the config, shrinks its layers to the saved shapes and loads the
weights, so it reloads with `torch.load(weights_only=True)` and stays trainable.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch_pruning._helpers import GroupItem, _HybridIndex
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.dependency import Dependency

from mtlsparse.builders import build_run_model
from mtlsparse.io import write_json
from mtlsparse.latency import count_flops, latency_spread_ms, measurable_difference
from mtlsparse.sparsity.layers import group_norms
from mtlsparse.sparsity.masks import MASK

log = logging.getLogger("mtlsparse")

COMPACT_FILE = "compact_model.pt"
FORMAT = "mtlsparse-compact/1"
TOLERANCE = 1e-4
# wall-clock budget of one export's dependency analysis and cuts (s), and the most channel indices one
# group search may hold (torch-pruning keeps a Python object per index, ~125 bytes: ~125 MB)
BUDGET_S = 120.0
MAX_GROUP_INDICES = 1_000_000
EXPORT_DEFAULTS = {"enabled": "auto", "batch": 8, "warmup": 2, "repeats": 10, "threads": 1, "budget_s": BUDGET_S}
# architectures whose channels export cannot remove, by model class name: (config option, why)
NOT_COMPACTABLE = {
    "CrossStitch": ("cross_stitch", "mixes every task's channels with cross-stitch units, so a channel can only be "
                                    "removed from all columns at once"),
}
# layers whose channels are not independent of each other: a group touching them stays whole
UNSAFE_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention, nn.RNNBase, nn.Embedding)
INPUT_INDEX = "input_index"  # buffer of a linear layer that reads only these input features


class ExportError(RuntimeError):
    """Export cannot proceed (bad run dir, missing checkpoint, outputs that do not match, budget spent)."""


class NotCompactable(ExportError):
    """The model's architecture is declared not compactable (`NOT_COMPACTABLE`)."""


class BudgetExceeded(ExportError):
    """The dependency analysis ran past its `Budget` (time or channel indices)."""


class NothingToRemove(Exception):
    """The model has no channel group export could remove: there is nothing to export (not an error)."""


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


# ------------------------------------------------------------------ compaction


def strip_masks_(model: nn.Module) -> nn.Module:
    """Fold `weight_mask` buffers into the weights and drop them (compaction changes weight shapes)."""
    with torch.no_grad():
        for module in model.modules():
            mask = module._buffers.pop(MASK, None)
            if mask is not None:
                module.weight.mul_(mask)
    return model


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
        ignored = group_norms(weight)[idxs] == 0
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
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            outputs = tp.utils.flatten_as_list(model(x))
    finally:
        for h in handles:
            h.remove()
    return seen, max(sizes + [t[0].numel() for t in outputs if isinstance(t, Tensor) and t.dim() > 1])


def dependency_graph(model: nn.Module, x: Tensor) -> tuple[tp.DependencyGraph, set]:
    """torch-pruning's graph of `model` traced on `x`, and the nodes that produce model outputs.

    Output nodes are found from the traced outputs' autograd nodes (dicts of task outputs
    are flattened by torch-pruning), so an output also consumed inside the model still counts.
    """
    outputs: list[Tensor] = []

    def keep_outputs(out: Any) -> Any:
        outputs.extend(tp.utils.flatten_as_list(out))
        return out

    graph = tp.DependencyGraph()
    with torch.enable_grad():
        graph.build_dependency(model, example_inputs=x, forward_fn=lambda m, inp: m(inp),
                               output_transform=keep_outputs, verbose=False)
    grad_fns = {t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None}
    output_nodes = {node for node in graph.module2node.values()
                    if node.grad_fn in grad_fns or not node.outputs}
    return graph, output_nodes


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
               and bool((group_norms(m.weight.detach()) == 0).any() or input_is_zero.get(m, torch.zeros(1)).any())}
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


def apply_plan(model: nn.Module, graph: tp.DependencyGraph, plan: dict[str, list[int]],
               budget: Budget | None = None) -> None:
    """Cut the planned channels (with everything coupled to them) out of `model`, in place.

    A root layer's own output channels never shift when other groups are cut, so plans made
    on the uncut model stay valid; torch-pruning re-derives concat/flatten offsets per group.
    """
    budget = budget or Budget()
    modules = dict(model.named_modules())
    for name, drop in plan.items():
        coupled_group(graph, modules[name], drop, budget).prune()


def _cut_is_exact(reference: nn.Module, model: nn.Module, graph: tp.DependencyGraph,
                  plan: dict[str, list[int]], x: Tensor, budget: Budget) -> bool:
    """Apply `plan` to `model`; True when its outputs on `x` still match `reference`'s."""
    try:
        apply_plan(model, graph, plan, budget)
        return max_abs_diff(reference, model, x, exact=True) <= TOLERANCE
    except BudgetExceeded:
        raise  # the budget is spent: stop, do not retry
    except Exception as err:  # noqa: BLE001 - a surgery torch-pruning cannot do is a plan we drop
        log.debug("export: cutting %s failed: %s", list(plan), err)
        return False


def zero_channel_groups(model: nn.Module) -> int:
    """All-zero input groups and output rows of the model's conv/linear layers: what export could remove."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) or _is_plain_conv(module):
                weight = module.weight
                if MASK in module._buffers:
                    weight = weight * module._buffers[MASK]
                count += int((group_norms(weight) == 0).sum()) + int((weight.flatten(1).abs().amax(dim=1) == 0).sum())
    return count


def compact(model: nn.Module, x: Tensor, budget: Budget | None = None) -> tuple[nn.Module, dict[str, int]]:
    """A physically smaller copy of `model` (eval mode, CPU) with the same outputs.

    Returns the copy and the number of channels removed per root layer name; `x` is an
    example batch for tracing and for the zero-channel probe. An architecture declared not
    compactable raises `NotCompactable` before any work; the analysis runs under `budget`
    (default `Budget()`). If cutting every planned group at once changes the outputs (an op
    torch-pruning misreads, e.g. a broadcast that mixes unrelated dims), each group is tried
    alone and only the exact ones are kept.
    """
    check_compactable(model)
    budget = budget or Budget()
    reference = strip_masks_(copy.deepcopy(model)).cpu().eval()
    x = x.cpu()
    small = copy.deepcopy(reference)
    graph, plan = plan_removal(small, x, budget)
    if not _cut_is_exact(reference, small, graph, plan, x, budget):
        log.info("export: cutting all %d planned groups at once changed the outputs; checking each alone", len(plan))
        kept = {}
        for name, drop in plan.items():
            budget.check(f"checking the cut of {name} alone")
            trial = copy.deepcopy(reference)
            if _cut_is_exact(reference, trial, dependency_graph(trial, x)[0], {name: drop}, x, budget):
                kept[name] = drop
        plan, small = kept, copy.deepcopy(reference)
        if not _cut_is_exact(reference, small, dependency_graph(small, x)[0], plan, x, budget):
            raise ExportError("no exact compaction found: the groups that are exact alone are not exact together")
    removed = {name: len(drop) for name, drop in plan.items()}
    for name, module in small.named_modules():
        if isinstance(module, nn.Linear) and not hasattr(module, INPUT_INDEX):
            read = group_norms(module.weight.detach()) != 0
            if 0 < int(read.sum()) < len(read):
                gather_inputs_(module, read.nonzero().flatten())
                removed[f"{name}:inputs"] = len(read) - int(read.sum())
    return small.eval(), removed


def removal_counts(removed: dict[str, int]) -> tuple[int, int]:
    """(channels removed, linear input features dropped) from `compact`'s per-layer counts."""
    features = sum(n for name, n in removed.items() if name.endswith(":inputs"))
    return sum(removed.values()) - features, features


def _gather_input(module: nn.Linear, inputs: tuple) -> tuple:
    return (inputs[0].index_select(-1, getattr(module, INPUT_INDEX)), *inputs[1:])


def attach_input_gather_(linear: nn.Linear, index: Tensor) -> None:
    """Make `linear` read x[..., index] (its weight must already have len(index) columns)."""
    linear.register_buffer(INPUT_INDEX, index.clone())
    linear.register_forward_pre_hook(_gather_input)


def gather_inputs_(linear: nn.Linear, keep: Tensor) -> None:
    """Keep only the weight columns `keep` of `linear` and gather those input features.

    Exact whenever the dropped columns are zero: they contribute nothing to the output.
    """
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight[:, keep].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(keep)
    attach_input_gather_(linear, keep)


def max_abs_diff(a: nn.Module, b: nn.Module, x: Tensor, exact: bool = False) -> float:
    """Largest |difference| over all (task) outputs of two models on `x`.

    `exact=True` compares in float64 (models converted and converted back, losslessly), so
    float32 rounding differences from summing fewer terms cannot pass for a wrong cut or
    make a right one fail: what is left is the surgery's own error.
    """
    dtype = next((p.dtype for p in a.parameters()), torch.float32)
    if exact:
        a, b, x = a.double(), b.double(), x.double()
    try:
        with torch.inference_mode():
            out_a, out_b = tp.utils.flatten_as_list(a.eval()(x)), tp.utils.flatten_as_list(b.eval()(x))
    finally:
        if exact:
            a.to(dtype), b.to(dtype)
    if len(out_a) != len(out_b) or any(u.shape != v.shape for u, v in zip(out_a, out_b)):
        raise ExportError("compact model's outputs have different shapes than the original's")
    return max((float((u - v).abs().max()) for u, v in zip(out_a, out_b) if u.numel()), default=0.0)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ save / reload


def save_compact(model: nn.Module, path: str | Path, config: DictConfig | dict | None = None) -> None:
    """Save the compact state_dict with the config that rebuilds its architecture."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=False)
    config = {k: v for k, v in (config or {}).items() if k != "hydra"}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, "state_dict": model.state_dict(), "config": config}, tmp)
    tmp.replace(path)


def shrink_to_(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Resize `model`'s parameters/buffers to the shapes in `state_dict` and fix layer attributes."""
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name == INPUT_INDEX and isinstance(module, nn.Linear) and not hasattr(module, INPUT_INDEX):
            attach_input_gather_(module, value)
            continue
        current = getattr(module, name, None)
        if not isinstance(current, Tensor) or current.shape == value.shape:
            continue
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(torch.empty_like(value), requires_grad=current.requires_grad)
        else:
            module._buffers[name] = torch.empty_like(value)
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            module.out_channels = module.weight.shape[0]
            module.groups = module.out_channels if depthwise else module.groups
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            source = module.running_mean if module.running_mean is not None else module.weight
            if source is not None:
                module.num_features = source.shape[0]
    return model


def load_compact(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a compact model saved by `save_compact`: dense model (`model`, or built from the
    saved config) → layers shrunk to the saved shapes → weights loaded."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ExportError(f"{path} is not a compact model saved by mtlsparse export ({FORMAT})")
    if model is None:
        if not saved["config"]:
            raise ExportError(f"{path} was saved without a config: pass the dense model to rebuild")
        model, _ = build_run_model(OmegaConf.create(saved["config"]))
    shrink_to_(model, saved["state_dict"])
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.eval()


# ------------------------------------------------------------------ export of a model / run


NO_ZERO_GROUP = "no channel group is zero, nothing to remove; skipped"


def export_model(model: nn.Module, input_shape: Sequence[int], out_dir: str | Path,
                 config: DictConfig | dict | None = None, batch: int = 8, warmup: int = 2,
                 repeats: int = 10, threads: int = 1, seed: int = 0, budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Compact `model`, check its outputs, save it to `out_dir`, and time both (CPU).

    Returns the metrics to merge into metrics.json. Raises `NotCompactable` for a declared
    architecture and `NothingToRemove` (nothing saved) when no channel group is zero or none
    of the zero ones can go, both before the latency measurement.
    """
    if batch < 1:
        raise ValueError(f"export batch must be >= 1, got {batch}")
    check_compactable(model)
    if zero_channel_groups(model) == 0:
        raise NothingToRemove(NO_ZERO_GROUP)
    budget = Budget(budget_s)
    dense = strip_masks_(copy.deepcopy(model)).cpu().eval()
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    small, removed = compact(dense, x[:2], budget)
    if not removed:
        raise NothingToRemove("every zero channel group is still read by another layer or reaches an output, "
                              "nothing to remove; skipped")
    diff = max_abs_diff(dense, small, x, exact=True)
    if not diff <= TOLERANCE:
        raise ExportError(f"compact model's outputs differ from the original's by {diff:.3g} > {TOLERANCE}: "
                          "an architecture op mixes channels that torch-pruning treated as independent")
    save_compact(small, Path(out_dir) / COMPACT_FILE, config)
    channels, features = removal_counts(removed)
    spreads, samples = latency_spread_ms({"dense": dense, "compact": small}, x, warmup, repeats, threads)
    flops_dense, flops_compact = count_flops(dense, x[:1]), count_flops(small, x[:1])
    return {"params/compact": num_params(small), "params/dense": num_params(dense),
            **{f"latency/{name}_{key}": value for name, s in spreads.items()
               for key, value in (("ms", s.median), ("iqr_ms", s.iqr), ("min_ms", s.low), ("max_ms", s.high))},
            "latency/speedup": spreads["dense"].median / spreads["compact"].median,
            "latency/measurable": measurable_difference(samples["dense"], samples["compact"]),
            "latency/batch": batch, "latency/threads": threads, "latency/repeats": repeats,
            "flops/dense": flops_dense, "flops/compact": flops_compact,
            "export/max_abs_diff": diff, "export/max_abs_diff_fp32": max_abs_diff(dense, small, x),
            "export/channels_removed": channels, "export/features_gathered": features}


def latency_line(metrics: dict[str, Any]) -> str:
    """'CPU latency (batch B, T thread(s), median [IQR] of N) dense → compact ms: verdict' from export metrics."""
    verdict = f"{metrics['latency/speedup']:.2f}× speed-up" if metrics["latency/measurable"] else \
        "no measurable change (the interquartile ranges overlap)"
    return (f"CPU latency (batch {metrics['latency/batch']}, {metrics['latency/threads']} thread(s), median [IQR] of "
            f"{metrics['latency/repeats']}) {metrics['latency/dense_ms']:.3g} [{metrics['latency/dense_iqr_ms']:.2g}]"
            f" → {metrics['latency/compact_ms']:.3g} [{metrics['latency/compact_iqr_ms']:.2g}] ms: {verdict}")


def export_settings(cfg: DictConfig) -> dict[str, Any]:
    """The `export` config node with defaults filled in, checked."""
    node = cfg.get("export") or {}
    settings = {**EXPORT_DEFAULTS, **(OmegaConf.to_container(node) if OmegaConf.is_config(node) else node)}
    unknown = set(settings) - set(EXPORT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown key(s) export.{sorted(unknown)}; allowed: {sorted(EXPORT_DEFAULTS)}")
    if settings["enabled"] not in ("auto", True, False):
        raise ValueError(f"export.enabled must be one of ['auto', true, false], got {settings['enabled']!r}")
    return settings


def export_after_training(cfg: DictConfig, model: nn.Module, structured: bool, input_shape: Sequence[int],
                          run_dir: str | Path) -> dict[str, Any]:
    """Export at the end of `train.run` when `export.enabled` is true, or auto and the method is structured.

    Nothing to remove (e.g. λ = 0): one info line, no compact file and no metrics. A model
    declared not compactable: its one-line reason as a warning, recorded as `export/refused`.
    In auto mode a failure is logged and recorded as `export/error` instead of failing the
    finished run.
    """
    settings = export_settings(cfg)
    enabled = settings.pop("enabled")
    if enabled is False or (enabled == "auto" and not structured):
        return {}
    try:
        metrics = export_model(model, input_shape, run_dir, config=cfg, seed=int(cfg.get("seed", 0)), **settings)
    except NothingToRemove as skip:
        log.info("export: %s", skip)
        return {}
    except NotCompactable as refused:
        log.warning("export: %s", refused)
        return {"export/refused": str(refused)}
    except Exception as err:  # noqa: BLE001 - auto export must not lose a finished training run
        if enabled is True:
            raise
        log.warning("export failed (%s: %s); the trained checkpoints are unaffected", type(err).__name__, err)
        return {"export/error": f"{type(err).__name__}: {err}"}
    log.info("export: %d → %d params, %s; saved %s", metrics["params/dense"], metrics["params/compact"],
             latency_line(metrics), Path(run_dir) / COMPACT_FILE)
    return metrics


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """`best` (the val/select checkpoint; last.ckpt when the run kept none) or `last`."""
    ckpt_dir = run_dir / "checkpoints"
    if which == "best":
        best = sorted(ckpt_dir.glob("best-*.ckpt"))
        if best:
            return best[-1]
    last = ckpt_dir / "last.ckpt"
    if not last.is_file():
        raise ExportError(f"no {'best-*.ckpt or ' if which == 'best' else ''}last.ckpt under {ckpt_dir}: "
                          "is this a finished training run dir?")
    return last


def model_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The model's weights from a Lightning checkpoint of MultiTaskModule, with masks folded in."""
    state = {k[len("model."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
    if not state:
        raise ExportError("checkpoint holds no 'model.*' weights (not a MultiTaskModule checkpoint)")
    for key in [k for k in state if k.endswith(f".{MASK}")]:
        mask = state.pop(key)
        weight_key = key[: -len(MASK)] + "weight"
        state[weight_key] = state[weight_key] * mask
    return state


def export_run(run_dir: str | Path, ckpt: str = "best", batch: int | None = None, repeats: int | None = None,
               threads: int | None = None, budget_s: float | None = None) -> dict[str, Any]:
    """Export a finished run: compact its checkpoint, save it and merge the numbers into metrics.json.

    A model declared not compactable is refused from the config, before the model is built.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory")
    if not config_file.is_file():
        raise ExportError(f"{config_file} not found: pass a training run dir (one holding .hydra/ and checkpoints/)")
    cfg = OmegaConf.load(config_file)
    target = OmegaConf.select(cfg, "model._target_", default=None)
    if isinstance(target, str):
        check_compactable(target)
    settings = export_settings(cfg)
    settings.pop("enabled")
    for key, value in (("batch", batch), ("repeats", repeats), ("threads", threads), ("budget_s", budget_s)):
        if value is not None:
            settings[key] = value
    path = find_checkpoint(run_dir, ckpt)
    model, input_shape = build_run_model(cfg)
    model.load_state_dict(model_state(torch.load(path, map_location="cpu", weights_only=False)), strict=True)
    metrics = export_model(model, input_shape, run_dir, config=cfg, seed=int(cfg.get("seed", 0)), **settings)
    metrics["export/checkpoint"] = path.name
    update_metrics(run_dir / "metrics.json", metrics)
    return metrics


def update_metrics(path: Path, new: dict[str, Any]) -> None:
    """Merge `new` into metrics.json (created if missing), keeping every existing key; atomic write."""
    current = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**current, **new})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlsparse export", description=(
        "Physically remove all-zero channel groups of a trained run's model, check its outputs, save "
        f"<run_dir>/{COMPACT_FILE} and add params/compact and CPU latency/* to <run_dir>/metrics.json."))
    parser.add_argument("run_dir", type=Path, help="a training run dir (holds .hydra/ and checkpoints/)")
    parser.add_argument("--ckpt", choices=("best", "last"), default="best", help="checkpoint to export")
    parser.add_argument("--batch", type=int, default=None, help="batch size for latency (default: export.batch)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for latency")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"wall-clock budget of the dependency analysis (default: export.budget_s, {BUDGET_S:g})")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    """`mtlsparse export ...`: 0 on success or nothing to remove, 2 on a clear error (one line on stderr)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        metrics = export_run(args.run_dir, args.ckpt, args.batch, args.repeats, args.threads, args.budget_s)
    except NothingToRemove as skip:
        print(f"mtlsparse export: {skip}")
        return 0
    except (ExportError, ValueError) as err:
        print(f"mtlsparse export: error: {err}", file=sys.stderr)
        return 2
    print(f"{metrics['export/checkpoint']}: params {metrics['params/dense']} → {metrics['params/compact']}, "
          f"FLOPs/sample {metrics['flops/dense']:.4g} → {metrics['flops/compact']:.4g}, {latency_line(metrics)}, "
          f"max |Δout| {metrics['export/max_abs_diff']:.2g}")
    print(f"saved {args.run_dir / COMPACT_FILE}; metrics added to {args.run_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
