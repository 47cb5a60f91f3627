"""Which weights a sparsity method acts on, and how they split into channel groups.

A *group* (docs/methods/group_lasso.md) is everything connected to one input neuron/channel:
column W[:, i] of a Linear (out, in) weight, slice W[:, i, :, :] of a Conv weight
(out, in, kh, kw). `group_view` exposes a weight as (in, rest) without mixing output
filters (the reference code's `weight.view(in_ch, -1)` bug).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.scope import Scope

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class PrunableLayer:
    """A named conv/linear layer whose `weight` a method may sparsify."""

    name: str
    module: nn.Module

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def num_groups(self) -> int:
        return self.weight.shape[1]

    @property
    def group_size(self) -> int:
        return self.weight[:, 0].numel()


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


def prunable_layers(model: MultiTaskModel, scope: Scope | None = None) -> list[PrunableLayer]:
    """Conv/linear layers of the model's backbones (plus input layers and heads when `scope` says so).

    Names are the modules' qualified names in `model`, so they are stable across
    checkpoints and identical on every DDP rank.
    """
    scope = scope or Scope()
    chosen: set[int] = set()
    for root in model.backbone_modules():
        chosen |= {id(m) for m in root.modules() if isinstance(m, PRUNABLE_TYPES)}
    if not scope.input_layers:
        chosen -= {id(m) for m in model.input_layers()}
    if scope.heads:
        for head in model.head_modules():
            chosen |= {id(m) for m in head.modules() if isinstance(m, PRUNABLE_TYPES)}
    else:
        for head in model.head_modules():
            chosen -= {id(m) for m in head.modules()}
    return [PrunableLayer(name, m) for name, m in model.named_modules() if id(m) in chosen]
