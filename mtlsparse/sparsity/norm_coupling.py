"""Couple a layer's input-channel groups with the BatchNorm that produces those channels.

With Conv → BN → (pool, ReLU) → Conv, the second conv's input group c can shrink forever
without reaching zero: BN's free scale γ_c grows to compensate, and the group's gradient
grows with γ_c, so a prox that zeroes it sees it revive. Adding γ_c and β_c to group c
(one group = the conv's input slice W[:, c] plus its producer's BN affine pair) removes
that escape: the whole channel then goes to zero together, and export can drop the
producer's output channel, which is where the compute of a conv trunk is.

A layer is coupled only when torch-pruning's dependency graph shows a one-to-one chain:
its input channel c is read by this layer alone, written by one conv/linear, and passes
through exactly one BatchNorm with as many channels as the layer has input groups.
Residual streams (several readers), Flatten → Linear (many features per channel) and
concatenations are left uncoupled.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from mtlsparse.sparsity.layers import PrunableLayer, group_view
from mtlsparse.training_state import TrainingState

log = logging.getLogger("mtlsparse")

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def _in_channel_fn(module: nn.Module):
    return tp.prune_linear_in_channels if isinstance(module, nn.Linear) else tp.prune_conv_in_channels


def input_norms(model: nn.Module, layers: Sequence[PrunableLayer], input_shape: Sequence[int]) -> dict[str, nn.Module]:
    """Layer name → the affine BatchNorm whose channels feed that layer's input groups one-to-one.

    Traces `model` once on zeros of `input_shape` (batch 2, eval mode, so BN statistics
    and the model's train/eval state are untouched).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros(2, *input_shape, device=device),
                forward_fn=lambda m, x: m(x), output_transform=tp.utils.flatten_as_list, verbose=False)
    finally:
        model.train(was_training)
    coupled = {}
    for layer in layers:
        group = graph.get_pruning_group(layer.module, _in_channel_fn(layer.module), idxs=[0])
        modules = [item.dep.target.module for item in group]
        weighted = [m for m in modules if isinstance(m, _WEIGHTED)]
        norms = [m for m in modules if isinstance(m, _NORMS)]
        if (len(weighted) == 2 and len(norms) == 1 and norms[0].affine
                and norms[0].num_features == layer.num_groups):
            coupled[layer.name] = norms[0]
    return coupled


def coupled_params(layer: PrunableLayer, norm: nn.Module | None) -> list[Tensor]:
    """The tensors one group spans: the layer's weight, then the norm's γ and β if coupled."""
    return [layer.weight] if norm is None else [layer.weight, norm.weight, norm.bias]


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


class NormCoupling:
    """Mixin for group methods with a `couple_norms` option (group lasso, GrOWL).

    `grouped(layer)` is the tensor a group operator acts on (groups along dim 1): the weight
    itself, or its `stack_groups` with the coupled BatchNorm's γ, β; `write_back_` stores a
    changed stacked tensor back. Coupling is found at fit start, when the input shape is known.
    """

    couple_norms: bool
    norms: dict[str, nn.Module]
    layers: list[PrunableLayer]

    def init_coupling(self, couple_norms: bool) -> None:
        """Validate and store the option (call from `__init__`, after `nn.Module.__init__`)."""
        if not isinstance(couple_norms, bool):
            raise ValueError(f"method.couple_norms must be true or false, got {couple_norms!r}")
        self.couple_norms = couple_norms
        self.norms = {}  # layer name → coupled BatchNorm, found by `couple` at fit start

    def couple_at_fit_start(self, state: TrainingState) -> None:
        if not self.couple_norms:
            return
        if state.model is None or state.input_shape is None:
            raise ValueError("method.couple_norms=true traces the model on the datamodule's input_shape; "
                             "fit with a datamodule that has one, or set method.couple_norms=false")
        self.couple(state.model, state.input_shape)

    def couple(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        """Find each layer's producer BatchNorm; its γ, β join the layer's input groups."""
        self.norms = input_norms(model, self.layers, input_shape)
        uncoupled = [layer.name for layer in self.layers if layer.name not in self.norms]
        if not self.norms:
            log.warning("method.couple_norms=true but no layer reads a BatchNorm one-to-one (layers: %s): the "
                        "groups stay the weights alone", uncoupled)
            return
        log.info("%s: BN-coupled groups in %s; uncoupled (no one-to-one BatchNorm): %s", type(self).__name__,
                 sorted(self.norms), uncoupled or "none")

    def group_tensors(self, layer: PrunableLayer) -> list[Tensor]:
        return coupled_params(layer, self.norms.get(layer.name))

    def group_size(self, layer: PrunableLayer) -> int:
        """Entries per group: the layer's own group size, + 2 when coupled."""
        return sum(t.numel() for t in self.group_tensors(layer)) // layer.num_groups

    def grouped(self, layer: PrunableLayer) -> Tensor:
        """The weight (uncoupled) or a fresh (group size, groups) stack of weight and γ, β."""
        tensors = self.group_tensors(layer)
        return tensors[0] if len(tensors) == 1 else stack_groups(tensors)

    def write_back_(self, layer: PrunableLayer, grouped: Tensor) -> None:
        """Store a changed `grouped(layer)` tensor (no-op when it is the weight itself)."""
        if grouped is not layer.weight:
            unstack_groups_(grouped, self.group_tensors(layer))
