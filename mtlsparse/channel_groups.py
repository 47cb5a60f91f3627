"""One notion of a channel group, shared by the sparsity methods, the metrics and compaction.

A *group* (docs/methods/group_lasso.md) is everything connected to one input channel c of a
consumer layer: column W[:, c] of a Linear (out, in) weight, slice W[:, c, :, :] of a Conv
weight (out, in, kh, kw), plus, where the layer reads a BatchNorm one-to-one (norm
coupling), that norm's γ_c and β_c. `ChannelGroups` is one layer's groups as that unit:
group lasso and GrOWL act on `stacked()`, the metrics count `zero()`, compaction removes
the zero ones. `group_view` exposes a weight as (in, rest) without mixing output filters
(the reference code's `weight.view(in_ch, -1)` bug). torch-pruning's dependency graph,
which tells which norm produces a layer's input channels, is built here only.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
WEIGHTED_TYPES = (nn.Linear, nn.modules.conv._ConvNd)  # layers whose weight has channel groups


def group_view(weight: Tensor) -> Tensor:
    """(in, out·kh·kw) view: row i holds every weight reading input channel i."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1)


def group_norms(weight: Tensor) -> Tensor:
    """L2 norm of each input-channel group, shape (in,)."""
    dims = [d for d in range(weight.dim()) if d != 1]
    return torch.linalg.vector_norm(weight, dim=dims)


def group_shape(weight: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts one value per input channel against `weight`."""
    return (1, weight.shape[1]) + (1,) * (weight.dim() - 2)


def stack_groups(tensors: Sequence[Tensor]) -> Tensor:
    """(group size, groups) matrix: column c holds W[:, c] then γ_c, β_c (groups along dim 1)."""
    return torch.cat([group_view(tensors[0]), *(t.reshape(-1, 1) for t in tensors[1:])], dim=1).T


@torch.no_grad()
def unstack_groups_(stacked: Tensor, tensors: Sequence[Tensor]) -> None:
    """Write a `stack_groups` matrix back into the tensors it came from."""
    weight = tensors[0]
    rest = weight[:, 0].numel()
    rows = stacked[:rest].T.reshape(weight.shape[1], weight.shape[0], *weight.shape[2:])
    weight.copy_(rows.transpose(0, 1))
    for i, t in enumerate(tensors[1:]):
        t.copy_(stacked[rest + i].view_as(t))


@dataclass(frozen=True, eq=False)
class ChannelGroups:
    """The input-channel groups of one consumer layer, with the producing norm's γ, β where coupled."""

    name: str
    weight: Tensor
    norm: nn.Module | None = None  # the BatchNorm whose channels feed `weight`'s inputs one-to-one

    @classmethod
    def of(cls, groups: ChannelGroups | Tensor) -> ChannelGroups:
        """`groups` itself, or the uncoupled groups of a bare weight."""
        return groups if isinstance(groups, ChannelGroups) else cls("", groups)

    @property
    def tensors(self) -> list[Tensor]:
        """What one group spans: the weight, then γ and β of the coupled norm."""
        return [self.weight] if self.norm is None else [self.weight, self.norm.weight, self.norm.bias]

    @property
    def count(self) -> int:
        return self.weight.shape[1]

    @property
    def size(self) -> int:
        """Entries per group: W[:, c].numel(), + 2 when coupled."""
        return self.weight[:, 0].numel() + (0 if self.norm is None else 2)

    def stacked(self) -> Tensor:
        """The tensor a group operator acts on (groups along dim 1): the weight itself when
        uncoupled, else a fresh (size, count) stack of W[:, c], γ_c, β_c (store it with `write_back_`)."""
        return self.weight if self.norm is None else stack_groups(self.tensors)

    def write_back_(self, stacked: Tensor) -> None:
        """Store a changed `stacked()` tensor (no-op when it is the weight itself)."""
        if stacked is not self.weight:
            unstack_groups_(stacked, self.tensors)

    def norms(self) -> Tensor:
        """L2 norm of each whole group, shape (count,)."""
        return group_norms(self.stacked().detach())

    def zero(self) -> Tensor:
        """Which groups are entirely zero (coupled: W[:, c], γ_c and β_c all zero)."""
        return self.norms() == 0


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


def _in_channel_fn(module: nn.Module):
    return tp.prune_linear_in_channels if isinstance(module, nn.Linear) else tp.prune_conv_in_channels


def producer_norms(model: nn.Module, consumers: Iterable[tuple[str, nn.Module]],
                   input_shape: Sequence[int]) -> dict[str, nn.Module]:
    """Consumer name → the affine BatchNorm whose channels feed that layer's input groups one-to-one.

    One-to-one: input channel c is read by this layer alone, written by one conv/linear, and
    passes through exactly one BatchNorm with as many channels as the layer has inputs.
    Residual streams (several readers), Flatten → Linear (many features per channel) and
    concatenations stay uncoupled. Traces `model` once on zeros of `input_shape` (batch 2,
    eval mode, so BN statistics and the model's train/eval state are untouched).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        graph, _ = dependency_graph(model, torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
    coupled = {}
    for name, module in consumers:
        group = graph.get_pruning_group(module, _in_channel_fn(module), idxs=[0])
        modules = [item.dep.target.module for item in group]
        weighted = [m for m in modules if isinstance(m, WEIGHTED_TYPES)]
        norms = [m for m in modules if isinstance(m, NORM_TYPES)]
        if (len(weighted) == 2 and len(norms) == 1 and norms[0].affine
                and norms[0].num_features == module.weight.shape[1]):
            coupled[name] = norms[0]
    return coupled
