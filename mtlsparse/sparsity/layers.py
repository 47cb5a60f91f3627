"""Which weights a sparsity method acts on; their channel groups are `mtlsparse.channel_groups`."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mtlsparse.channel_groups import group_norms, group_shape, group_view
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.scope import Scope

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
__all__ = ["PRUNABLE_TYPES", "PrunableLayer", "group_norms", "group_shape", "group_view", "prunable_layers"]


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
