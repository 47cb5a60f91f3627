"""Pruning at initialisation from connection sensitivity: SNIP and DiSparse static.

Before training, per-task sensitivities |w ⊙ ∂L_t/∂w| are accumulated over a few
training batches (per batch, as in DiSparse) by `mtlsparse.gradients.task_gradients`, so
no gradient is left in `.grad`. SNIP keeps the global top scores of Σ_t; DiSparse keeps a
weight if ANY task keeps it in its own global top-q of the weights it uses (shared
layers: every task; task-specific layers: only their task), q chosen so the union hits
the target exactly. Both keep the per-task masks for the mask-IoU analysis.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.gradients import task_gradients
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.allocation import global_masks, union_topk
from mtlsparse.sparsity.layers import PrunableLayer
from mtlsparse.sparsity.masks import MaskedMethod, TaskMasks, layer_tasks, topk_mask
from mtlsparse.sparsity.scope import ScopeLike
from mtlsparse.training_state import TrainingState


def task_gradient_magnitudes(state: TrainingState, layers: Sequence[PrunableLayer],
                             num_batches: int = 1) -> dict[str, list[Tensor]]:
    """Σ over `num_batches` training batches of |∂L_t/∂W| per task and layer (dense: masked entries too).

    Batches come from a fresh pass over the training data (`state.batches`, identical on every
    DDP rank); the forward runs on the unwrapped model, leaving `.grad` untouched.
    """
    weights = [layer.weight for layer in layers]
    tasks = state.model.tasks
    totals = {task: [torch.zeros_like(w) for w in weights] for task in tasks}
    with torch.enable_grad():
        for x, y in state.batches(num_batches):
            out = state.model(x)
            losses = [task.loss(out[name], y[name]) for name, task in tasks.items()]
            for name, grads in zip(tasks, task_gradients(losses, weights, retain_graph=False)):
                for total, grad in zip(totals[name], grads):
                    if grad is not None:
                        total.add_(grad.abs())
    return totals


def task_score_vectors(scores: dict[str, list[Tensor]], tasks: Sequence[tuple[str, ...]]) -> list[Tensor]:
    """One flat score vector per task over all layers, −inf where the task does not use the layer."""
    return [torch.cat([s.flatten() if task in owners else torch.full((s.numel(),), -torch.inf, device=s.device)
                       for s, owners in zip(scores[task], tasks)])
            for task in scores]


def split_like(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped like `like`."""
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in like]), like)]


class SNIP(MaskedMethod):
    """SNIP (Lee et al.) on the multi-task loss: keep the global top Σ_t |w ⊙ ∂L_t/∂w| before training."""

    def __init__(self, sparsity: float = 0.0, num_batches: int = 1, scope: ScopeLike = None) -> None:
        super().__init__(sparsity, scope)
        if num_batches < 1:
            raise ValueError(f"method.num_batches must be >= 1, got {num_batches}")
        self.num_batches = num_batches
        self.register_buffer("initialized", torch.tensor(False))

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        self.per_task_masks = TaskMasks(self.layers, layer_tasks(model, self.layers))

    def task_masks(self) -> dict[str, dict[str, Tensor]]:
        """{layer name: {task: mask}} for the tasks that use each layer."""
        return self.per_task_masks.as_dict()

    def on_fit_start(self, state: TrainingState) -> None:
        super().on_fit_start(state)
        if bool(self.initialized):  # resumed: masks came with the checkpoint
            return
        grads = task_gradient_magnitudes(state, self.layers, self.num_batches)
        scores = {task: [g * layer.weight.detach().abs() for g, layer in zip(gs, self.layers)]
                  for task, gs in grads.items()}
        masks, task_masks = self.select(scores)
        self.set_masks_(masks)
        for i, task_mask in enumerate(task_masks):
            self.per_task_masks.set_(i, task_mask)
        self.initialized.fill_(True)

    def select(self, scores: dict[str, list[Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """(layer masks, per-layer stacked per-task masks) from per-task sensitivities."""
        total = [sum(layer_scores) for layer_scores in zip(*scores.values())]
        vectors = task_score_vectors(scores, self.per_task_masks.tasks)
        per_task = {task: split_like(topk_mask(v, round(self.density * int(torch.isfinite(v).sum()))), total)
                    for task, v in zip(scores, vectors)}
        return global_masks(total, self.density), self.stack_task_masks(per_task)

    def stack_task_masks(self, per_task: dict[str, list[Tensor]]) -> list[Tensor]:
        """Per layer, the masks of the tasks that use it, stacked in `TaskMasks` order."""
        return [torch.stack([per_task[t][i] for t in owners]) for i, owners in enumerate(self.per_task_masks.tasks)]


class DiSparseStatic(SNIP):
    """DiSparse static (Sun et al.): per-task SNIP masks; a weight is kept if any task that uses it keeps it.

    `keep_ratio` (the per-task share q each task keeps) is found so the union hits the target.
    """

    def __init__(self, sparsity: float = 0.0, num_batches: int = 1, scope: ScopeLike = None) -> None:
        super().__init__(sparsity, num_batches, scope)
        self.register_buffer("keep_ratio", torch.tensor(1.0, dtype=torch.float64))

    def select(self, scores: dict[str, list[Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        like = scores[next(iter(scores))]
        vectors = task_score_vectors(scores, self.per_task_masks.tasks)
        keep, task_keeps, q = union_topk(vectors, round(self.density * vectors[0].numel()))
        self.keep_ratio.fill_(q)
        per_task = {task: split_like(m, like) for task, m in zip(scores, task_keeps)}
        return split_like(keep, like), self.stack_task_masks(per_task)
