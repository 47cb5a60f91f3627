"""Dynamic sparse training at constant sparsity: SET, RigL, DiSparse dynamic, min-max DST.

Training starts from random masks with ERK (default) or uniform layer densities. A
*rewire* drops, in every layer, the `fraction` of its active weights with the smallest
|w| and regrows as many positions among the inactive ones (just-dropped included, as in
RigL), so each layer's mask count never changes. Regrown weights start at exactly 0
with zeroed optimizer state (see `masks.py`). Methods differ in when they rewire and
how they score regrowth:

- SET: random (a CPU generator seeded from (seed, step): identical on every DDP rank);
- RigL: |∂L/∂w| of the last training batch, read from `.grad` in `after_optimizer_step`
  (Lightning zeroes gradients at the start of the next step's closure, so `.grad` still
  holds this step's dense gradient, masked entries included; under DDP it is all-reduced);
- DiSparse dynamic: per-task dense gradients on fresh training batches (one backward per
  task); on shared layers every task regrows its own top share, the shares OR'ed, with
  one share size for all tasks chosen so the OR regrows exactly as many as were dropped;
- min-max DST (Guo et al.): like RigL, but at epoch ends every `update_every` epochs with
  a constant fraction, until an end epoch (default: `end_fraction` of the run's epochs,
  `budget.py`; an explicit `end_epoch` replaces it and must lie within the run).

SET/RigL/DiSparse rewire after the optimizer step at every `update_interval`-th step
before `end_step` (default: `end_fraction` of the run's optimizer steps; an explicit
`end_step` must lie within the run), the fraction decaying by cosine.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mtlsparse.errors import ConfigError
from mtlsparse.models.base import MultiTaskModel
from mtlsparse.sparsity.allocation import LAYERWISE, check_allocation, layer_counts, union_topk
from mtlsparse.sparsity.budget import check_epoch, check_fraction, finite_budget, resolve_point
from mtlsparse.sparsity.layers import PrunableLayer
from mtlsparse.sparsity.masks import MaskedMethod, TaskMasks, apply_masks_, layer_tasks, mask_of, set_mask_, topk_mask
from mtlsparse.sparsity.schedules import cosine_fraction
from mtlsparse.sparsity.scope import ScopeLike
from mtlsparse.sparsity.snip import task_gradient_magnitudes
from mtlsparse.training_state import TrainingState

log = logging.getLogger(__name__)
SEED_STRIDE = 1_000_003  # (seed, step) → one generator seed; prime so nearby seeds don't share streams


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator seeded from (seed, step): the same numbers on every rank and device."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + step)


def random_masks(shapes: Sequence[torch.Size], counts: Sequence[int], generator: torch.Generator) -> list[Tensor]:
    """One mask per shape with exactly counts[i] True entries at random positions."""
    return [topk_mask(torch.rand(shape, generator=generator), k) for shape, k in zip(shapes, counts)]


def drop_smallest(mask: Tensor, weight: Tensor, k: int) -> Tensor:
    """`mask` without its k active entries of smallest |w|."""
    score = torch.where(mask, weight.abs(), torch.inf)
    return mask & ~topk_mask(-score, k)


def gradient_magnitudes(layers: Sequence[PrunableLayer]) -> list[Tensor]:
    """|.grad| of each layer's weight: the dense gradient of the last training step."""
    missing = [layer.name for layer in layers if layer.weight.grad is None]
    if missing:
        raise RuntimeError(f"gradient-based regrowth needs the last step's gradients, but {missing} have no .grad")
    return [layer.weight.grad.abs() for layer in layers]


class DynamicSparse(MaskedMethod):
    """Constant-sparsity training from random masks; subclasses say when to rewire and how to score regrowth."""

    def __init__(self, sparsity: float = 0.0, init: str = "erk", seed: int = 0, scope: ScopeLike = None) -> None:
        super().__init__(sparsity, scope)
        self.init = check_allocation(init, LAYERWISE)
        self.seed = seed
        self.register_buffer("steps", torch.tensor(0))

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        shapes = [layer.weight.shape for layer in self.layers]
        counts = layer_counts(shapes, self.density, self.init)
        self.set_masks_(random_masks(shapes, counts, step_generator(self.seed, 0)))

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().after_optimizer_step(optimizer)
        self.steps += 1

    def regrow_scores(self) -> list[Tensor]:
        """Per layer, the score of regrowing each position (higher first)."""
        raise NotImplementedError  # pragma: no cover

    def regrow(self, index: int, kept: Tensor, score: Tensor, k: int) -> Tensor:
        """The k positions of layer `index` to regrow among those not in `kept`."""
        return topk_mask(torch.where(kept, -torch.inf, score), k)

    @torch.no_grad()
    def rewire(self, fraction: float) -> None:
        """Drop `fraction` of each layer's active weights by magnitude and regrow as many."""
        for index, (layer, score) in enumerate(zip(self.layers, self.regrow_scores())):
            mask = mask_of(layer)
            k = round(fraction * int(mask.sum()))
            if k == 0:
                continue
            kept = drop_smallest(mask, layer.weight, k)
            set_mask_(layer, kept | self.regrow(index, kept, score.to(mask.device), k))


class ScheduledDST(DynamicSparse):
    """RigL's schedule: rewire every `update_interval` steps before `end_step`, fraction cosine-decayed to 0."""

    def __init__(self, sparsity: float = 0.0, drop_fraction: float = 0.3, update_interval: int = 100,
                 end_step: int | None = None, end_fraction: float = 0.75, init: str = "erk", seed: int = 0,
                 scope: ScopeLike = None) -> None:
        super().__init__(sparsity, init, seed, scope)
        if not 0 <= drop_fraction <= 1 or update_interval < 1 or not 0 <= end_fraction <= 1:
            raise ValueError("need method.drop_fraction in [0, 1], method.update_interval >= 1, method.end_fraction "
                             f"in [0, 1], got {drop_fraction}, {update_interval}, {end_fraction}")
        self.drop_fraction, self.update_interval = drop_fraction, update_interval
        self.end_step, self.end_fraction = end_step, end_fraction
        self.rewire_until = end_step  # resolved from end_fraction at fit start when end_step is None

    def on_fit_start(self, state: TrainingState) -> None:
        """Resolve the last rewire step from the run's optimizer steps (known only once data is set up)."""
        super().on_fit_start(state)
        total = state.total_steps
        if self.end_step is None:
            if not math.isfinite(total):
                raise ConfigError("method.end_fraction needs a finite run length (trainer.max_epochs or max_steps); "
                                  "set method.end_step instead")
            self.rewire_until = int(self.end_fraction * total)
        elif math.isfinite(total) and self.end_step > total:
            raise ConfigError(f"method.end_step={self.end_step} is past the last optimizer step of this run "
                              f"({int(total)} steps: trainer.max_epochs / max_steps, limit_train_batches): lower "
                              "method.end_step or drop it (method.end_step=null) to use method.end_fraction, "
                              "a fraction of the run (e.g. method.end_fraction=0.75)")
        if self.drop_fraction > 0 and (self.rewire_until or 0) <= self.update_interval:
            log.warning("%s does no rewire in this run: the first is due at step method.update_interval=%d but "
                        "rewiring ends at step %s of %s; it trains its initial random masks (lower "
                        "method.update_interval for dynamic sparse training)", type(self).__name__,
                        self.update_interval, self.rewire_until, total)

    def fraction_at(self, step: int) -> float:
        """Drop fraction of a rewire after optimizer step `step` (0 when no rewire is due)."""
        if self.rewire_until is None or step % self.update_interval:
            return 0.0
        return cosine_fraction(step, self.rewire_until, self.drop_fraction)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().after_optimizer_step(optimizer)
        fraction = self.fraction_at(int(self.steps))
        if fraction > 0:
            self.rewire(fraction)
            apply_masks_(self.layers, optimizer)


class SET(ScheduledDST):
    """Sparse Evolutionary Training (Mocanu et al.): random regrowth."""

    def regrow_scores(self) -> list[Tensor]:
        generator = step_generator(self.seed, int(self.steps))
        return [torch.rand(layer.weight.shape, generator=generator) for layer in self.layers]


class RigL(ScheduledDST):
    """Rigged Lottery (Evci et al.): regrow where the dense gradient of the last step is largest."""

    def regrow_scores(self) -> list[Tensor]:
        return gradient_magnitudes(self.layers)


class DiSparseDynamic(ScheduledDST):
    """DiSparse dynamic (Sun et al.): per-task gradient regrowth, OR'ed over the tasks of shared layers.

    Per-task masks (`task_masks()`) hold the active weights each task brought in: the
    initial mask for every task, then each regrown weight for the tasks that chose it.
    """

    def __init__(self, sparsity: float = 0.0, drop_fraction: float = 0.5, update_interval: int = 100,
                 end_step: int | None = None, end_fraction: float = 0.75, num_batches: int = 1, init: str = "erk",
                 seed: int = 0, scope: ScopeLike = None) -> None:
        super().__init__(sparsity, drop_fraction, update_interval, end_step, end_fraction, init, seed, scope)
        if num_batches < 1:
            raise ValueError(f"method.num_batches must be >= 1, got {num_batches}")
        self.num_batches = num_batches
        self._train_state: TrainingState | None = None  # kept from on_fit_start: rewires draw batches

    def setup(self, model: MultiTaskModel) -> None:
        super().setup(model)
        self.per_task_masks = TaskMasks(self.layers, layer_tasks(model, self.layers))
        for index, (layer, owners) in enumerate(zip(self.layers, self.per_task_masks.tasks)):
            self.per_task_masks.set_(index, mask_of(layer).expand(len(owners), *layer.weight.shape))

    def task_masks(self) -> dict[str, dict[str, Tensor]]:
        """{layer name: {task: mask}} for the tasks that use each layer."""
        return self.per_task_masks.as_dict()

    def on_fit_start(self, state: TrainingState) -> None:
        super().on_fit_start(state)
        self._train_state = state

    def regrow_scores(self) -> list[Tensor]:
        if self._train_state is None:
            raise RuntimeError("DiSparseDynamic needs on_fit_start(state) before rewiring (it reads training batches)")
        grads = task_gradient_magnitudes(self._train_state, self.layers, self.num_batches)
        return [torch.stack([grads[task][index] for task in owners])
                for index, owners in enumerate(self.per_task_masks.tasks)]

    def regrow(self, index: int, kept: Tensor, score: Tensor, k: int) -> Tensor:
        candidates = [torch.where(kept, -torch.inf, s).flatten() for s in score]
        grow, task_grows, _ = union_topk(candidates, k)
        own = self.per_task_masks.stacked(index)
        self.per_task_masks.set_(index, (own & kept) | torch.stack(task_grows).view_as(own))
        return grow.view_as(kept)


class MinMaxDST(DynamicSparse):
    """Min-max sparse MTL's DST (Guo et al.): every `update_every` epochs, drop `regrow_fraction` of each
    layer's weights by magnitude and regrow as many zero weights with the largest |grad| (last step)."""

    def __init__(self, sparsity: float = 0.0, regrow_fraction: float = 0.1, update_every: int = 2,
                 end_fraction: float = 0.7333, end_epoch: int | None = None, init: str = "erk", seed: int = 0,
                 scope: ScopeLike = None) -> None:
        super().__init__(sparsity, init, seed, scope)
        if not 0 <= regrow_fraction <= 1 or update_every < 1:
            raise ValueError("need method.regrow_fraction in [0, 1] and method.update_every >= 1, "
                             f"got {regrow_fraction}, {update_every}")
        self.regrow_fraction, self.update_every = regrow_fraction, update_every
        self.end_fraction = check_fraction("end_fraction", end_fraction)
        self.end_epoch = check_epoch("end_epoch", end_epoch, "end_fraction")
        self.last_rewire_epoch: int | None = None  # resolved by set_budget

    def set_budget(self, max_epochs: int | None) -> None:
        super().set_budget(max_epochs)
        self.last_rewire_epoch = resolve_point("end_epoch", self.end_epoch, "end_fraction", self.end_fraction,
                                               finite_budget(max_epochs))
        if self.regrow_fraction > 0 and self.last_rewire_epoch + 1 < self.update_every:
            log.warning("MinMaxDST does no rewire in this run: the first is due after epoch %d "
                        "(method.update_every=%d) but rewiring ends after epoch %d; it trains its initial random "
                        "masks (lower method.update_every for dynamic sparse training)", self.update_every - 1,
                        self.update_every, self.last_rewire_epoch)

    def rewires_after(self, epoch: int) -> bool:
        """Whether the end of `epoch` (0-based) rewires."""
        if self.last_rewire_epoch is None:
            raise RuntimeError("MinMaxDST: call set_budget(trainer.max_epochs) before the schedule is used")
        return epoch <= self.last_rewire_epoch and (epoch + 1) % self.update_every == 0

    def regrow_scores(self) -> list[Tensor]:
        return gradient_magnitudes(self.layers)

    def on_train_epoch_end(self, state: TrainingState) -> None:
        if self.rewires_after(state.epoch):
            self.rewire(self.regrow_fraction)
