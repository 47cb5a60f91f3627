"""Cutting the planned channels out of a model, exactly: the compact copy and its check.

`compact(model, x)` returns a physically smaller copy with the same outputs: the channel
groups `graph.plan_removal` finds are cut with torch-pruning; after the channel cut, a
linear layer that still has all-zero input columns (e.g. an FC layer after Flatten whose
group lasso zeroed single features, not whole conv channels) keeps only its read columns
and gathers its inputs (`gather_inputs_`), so its weight and its multiply-adds shrink with
the group sparsity. Submodules that the model declares no output reads (a fixed LTB tree's
unused nodes: `MultiTaskModel.unreachable_modules`) are removed whole, leaving an `Unreached`
placeholder. Every cut is checked against the original's outputs (`max_abs_diff`).
"""
from __future__ import annotations

import copy
import logging

import torch
import torch_pruning as tp
from torch import Tensor, nn

from mtlsparse.channel_groups import ChannelGroups
from mtlsparse.compaction.errors import BudgetExceeded, ExportError
from mtlsparse.compaction.graph import Budget, check_compactable, coupled_group, dependency_graph, plan_removal
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.masks import MASK

log = logging.getLogger("mtlsparse")

TOLERANCE = 1e-4
INPUT_INDEX = "input_index"  # buffer of a linear layer that reads only these input features
UNREACHED = "unreached"  # `compact`'s count key suffix of a submodule no output reads, removed whole


class Unreached(nn.Module):
    """Stands in for a submodule that no model output reads, removed by export; calling it is an error."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: object, **kwargs: object) -> None:
        raise ExportError(f"{self.name} was removed by export (no model output reads it), but something called it")


def unreached_modules(model: nn.Module) -> list[str]:
    """The submodules `model` declares that no output reads (`MultiTaskModel.unreachable_modules`)."""
    return model.unreachable_modules() if isinstance(model, MultiTaskModel) else []


def remove_modules_(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Replace the named submodules by `Unreached` placeholders; returns each one's parameter count."""
    counts = {}
    for name in names:
        owner, _, child = name.rpartition(".")
        parent = model.get_submodule(owner)
        counts[name] = sum(p.numel() for p in parent.get_submodule(child).parameters())
        setattr(parent, child, Unreached(name))
    return counts


def strip_masks_(model: nn.Module) -> nn.Module:
    """Fold `weight_mask` buffers into the weights and drop them (compaction changes weight shapes)."""
    with torch.no_grad():
        for module in model.modules():
            mask = module._buffers.pop(MASK, None)
            if mask is not None:
                module.weight.mul_(mask)
    return model


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
    unreached = remove_modules_(reference, unreached_modules(reference))  # every copy below starts without them
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
            read = ~ChannelGroups.of(module.weight.detach()).zero()
            if 0 < int(read.sum()) < len(read):
                gather_inputs_(module, read.nonzero().flatten())
                removed[f"{name}:inputs"] = len(read) - int(read.sum())
    removed |= {f"{name}:{UNREACHED}": count for name, count in unreached.items()}
    return small.eval(), removed


def removal_counts(removed: dict[str, int]) -> tuple[int, int]:
    """(channels removed, linear input features dropped) from `compact`'s per-layer counts."""
    features = sum(n for name, n in removed.items() if name.endswith(":inputs"))
    return sum(n for name, n in removed.items() if ":" not in name), features


def unreached_params(removed: dict[str, int]) -> int:
    """Parameters of the submodules that no output reads, which `compact` removed whole."""
    return sum(n for name, n in removed.items() if name.endswith(f":{UNREACHED}"))


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
