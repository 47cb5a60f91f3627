"""Binary weight masks that live on the model, and the base class of every masked method.

A mask is a persistent bool buffer `weight_mask` registered on the conv/linear module
itself, so it is part of `module.model`'s state_dict (checkpoints, resume, export) and
DDP broadcasts it with the other buffers. Masked weights are kept exactly zero by
re-applying the mask after every optimizer step and zeroing the optimizer's per-weight
state (Adam moments, SGD momentum) there, so neither momentum can revive a masked weight
nor stale state carry over when a dynamic method regrows it: regrown weights start at 0
with fresh state. Gradients are left untouched, so `.grad` keeps the dense gradient
(masked entries included) that RigL-style regrowth reads.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.base import SparsityMethod
from mtlsparse.sparsity.layers import PrunableLayer
from mtlsparse.sparsity.scope import ScopeLike

MASK = "weight_mask"
#: checkpoints below target − this many points of sparsity/param never count as best
SPARSITY_TOLERANCE = 0.5


def add_mask(module: nn.Module) -> Tensor:
    """Register an all-ones `weight_mask` buffer on `module` (idempotent) and return it."""
    if not hasattr(module, MASK):
        module.register_buffer(MASK, torch.ones_like(module.weight, dtype=torch.bool), persistent=True)
    return getattr(module, MASK)


def mask_of(layer: PrunableLayer) -> Tensor:
    """The layer's current mask (True = weight kept)."""
    return getattr(layer.module, MASK)


@torch.no_grad()
def set_mask_(layer: PrunableLayer, mask: Tensor) -> None:
    """Replace the layer's mask and zero the weights it removes."""
    mask_of(layer).copy_(mask)
    layer.weight.mul_(mask_of(layer))


@torch.no_grad()
def apply_masks_(layers: Sequence[PrunableLayer], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero masked weights and, when given an optimizer, their per-weight optimizer state."""
    for layer in layers:
        mask = mask_of(layer)
        layer.weight.mul_(mask)
        if optimizer is None:
            continue
        for value in optimizer.state.get(layer.weight, {}).values():
            if isinstance(value, Tensor) and value.shape == mask.shape:
                value.mul_(mask)


def topk_mask(score: Tensor, k: int) -> Tensor:
    """Bool mask of `score`'s shape with True at its k largest entries (ties: lowest index first)."""
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    flat[torch.argsort(score.flatten(), descending=True, stable=True)[:k]] = True
    return flat.view_as(score)


def layer_tasks(model: MultiTaskModel, layers: Sequence[PrunableLayer]) -> list[tuple[str, ...]]:
    """Tasks whose loss depends on each layer: every task for shared layers, else the owning task."""
    shared = {id(p) for p in model.shared_parameters()}
    owner = {id(p): task for task in model.tasks for p in model.task_parameters(task)}
    every = tuple(model.tasks)
    return [(owner[id(layer.weight)],) if id(layer.weight) not in shared and id(layer.weight) in owner else every
            for layer in layers]


class TaskMasks(nn.Module):
    """Per-task masks of each prunable layer, for the tasks that use it (persistent buffers).

    Methods that decide per task (SNIP per task, DiSparse) keep them for the mask-IoU
    analysis; buffers make them survive checkpoints like the layer masks do.
    """

    def __init__(self, layers: Sequence[PrunableLayer], tasks: Sequence[tuple[str, ...]]) -> None:
        super().__init__()
        self.names = [layer.name for layer in layers]
        self.tasks = list(tasks)
        for i, (layer, owners) in enumerate(zip(layers, tasks)):
            shape = (len(owners), *layer.weight.shape)
            self.register_buffer(f"layer{i}", torch.ones(shape, dtype=torch.bool, device=layer.weight.device))

    def stacked(self, i: int) -> Tensor:
        """Masks of layer i, one row per task of `self.tasks[i]`."""
        return getattr(self, f"layer{i}")

    @torch.no_grad()
    def set_(self, i: int, masks: Tensor) -> None:
        self.stacked(i).copy_(masks)

    def as_dict(self) -> dict[str, dict[str, Tensor]]:
        """{layer name: {task: mask}}."""
        return {name: dict(zip(owners, self.stacked(i)))
                for i, (name, owners) in enumerate(zip(self.names, self.tasks))}


class MaskedMethod(SparsityMethod):
    """Base of prune-and-finetune and dynamic-sparse methods: one mask per prunable layer.

    `sparsity` is the target fraction of prunable weights set to zero. Epochs whose
    sparsity is below the target (e.g. dense pretraining) never count as best checkpoint.
    """

    def __init__(self, sparsity: float = 0.0, scope: ScopeLike = None) -> None:
        super().__init__(scope)
        if not 0 <= sparsity < 1:
            raise ValueError(f"method.sparsity must be in [0, 1), got {sparsity}")
        self.sparsity = float(sparsity)
        self.min_sparsity = max(0.0, 100 * self.sparsity - SPARSITY_TOLERANCE)

    @property
    def density(self) -> float:
        """Target fraction of prunable weights kept."""
        return 1.0 - self.sparsity

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        for layer in self.layers:
            add_mask(layer.module)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        apply_masks_(self.layers, optimizer)

    def masks(self) -> dict[str, Tensor]:
        return {layer.name: mask_of(layer) for layer in self.layers}

    def set_masks_(self, masks: Sequence[Tensor]) -> None:
        """Install one mask per prunable layer (in `self.layers` order)."""
        for layer, mask in zip(self.layers, masks):
            set_mask_(layer, mask)
