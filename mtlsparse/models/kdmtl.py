"""Knowledge distillation for multi-task learning (Li & Bilen, 2020).

An HPS network learns, besides its task losses, to reproduce the features of frozen
single-task teachers: per-task linear adaptors A_t map the shared features f so that
A_t(f) matches teacher t's features (both L2-normalised). The distillation term is the
model's auxiliary loss, added unweighted to the balanced task losses.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlsparse.models.hps import SharedTrunkModel
from mtlsparse.models.lenet import lenet_trunk
from mtlsparse.run_dir import MODEL_PREFIX
from mtlsparse.tasks import Task

log = logging.getLogger(__name__)
STL_TRUNK_PREFIX = f"{MODEL_PREFIX}trunks."  # an STL run's per-task trunks in its checkpoint


def teachers_missing_error() -> ValueError:
    """The error for kdmtl without teachers: it spells out the two commands to run."""
    return ValueError(
        "model=kdmtl needs trained single-task teachers. First train them: "
        "`python -m mtlsparse model=stl balancer=linear <same dataset/model knobs>` "
        "(writes <run_dir>/checkpoints/best-epochNNN.ckpt), then pass that file: `python -m mtlsparse model=kdmtl "
        "model.teacher_ckpt=<run_dir>/checkpoints/best-epochNNN.ckpt`.")


def load_stl_trunks(path: str | Path, trunks: dict[str, nn.Module]) -> None:
    """Load `model.trunks.<task>.*` of an STL run's Lightning checkpoint into `trunks`, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.teacher_ckpt={path}: no such file. {teachers_missing_error()}")
    state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {})
    for task, trunk in trunks.items():
        prefix = f"{STL_TRUNK_PREFIX}{task}."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            found = sorted({k[len(STL_TRUNK_PREFIX):].split(".")[0] for k in state if k.startswith(STL_TRUNK_PREFIX)})
            raise ValueError(f"model.teacher_ckpt={path} holds no STL trunk for task '{task}' (STL trunks found: "
                             f"{found}); pass a checkpoint of a `model=stl` run on the same dataset")
        try:
            trunk.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"model.teacher_ckpt={path}: the STL trunk of task '{task}' does not match this "
                             "model's architecture; train the teachers with the same model.channels, hidden, "
                             f"kernel_size and batch_norm as model=kdmtl.\n{err}") from None


class KDMTL(SharedTrunkModel):
    """HPS LeNet + per-task adaptors distilled from frozen STL teachers.

    `auxiliary_loss()` = kd_weight · Σ_t mean_batch ‖n(A_t(f)) − n(f_t^teacher)‖², n = L2
    normalisation, computed with the shared features while training (in `encode`, so by
    `forward` and by the balancer's representation mode alike); its gradient reaches the trunk
    and the adaptors (the reference code detached it). Teachers are frozen, in eval mode
    and deliberately *not* submodules: they are absent from `parameters()` (so from the
    optimizer, sparsity methods, parameter counts and this model's `state_dict`).

    `teacher_ckpt` is a checkpoint of a `model=stl` run with the same architecture knobs.
    `allow_untrained_teachers=true` keeps randomly initialised teachers — only for smoke
    tests (`tests/test_train.py` runs kdmtl with `model.allow_untrained_teachers=true`).
    """

    def __init__(self, tasks: dict[str, Task], in_shape: Sequence[int], channels: Sequence[int] = (10, 20),
                 hidden: int = 50, kernel_size: int = 5, batch_norm: bool = False, kd_weight: float = 1.0,
                 teacher_ckpt: str | None = None, allow_untrained_teachers: bool = False) -> None:
        if kd_weight < 0:
            raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")
        trunk = lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm)
        super().__init__(tasks, trunk, {name: nn.Linear(hidden, t.out_dim) for name, t in tasks.items()})
        self.kd_weight = float(kd_weight)
        self.adaptors = nn.ModuleDict({name: nn.Linear(hidden, hidden) for name in self.tasks})
        teachers = {name: lenet_trunk(in_shape, channels, hidden, kernel_size, batch_norm) for name in self.tasks}
        if teacher_ckpt is not None:
            load_stl_trunks(teacher_ckpt, teachers)
        elif allow_untrained_teachers:
            log.warning("kdmtl: teachers are untrained (allow_untrained_teachers=true); use only for smoke tests")
        else:
            raise teachers_missing_error()
        for teacher in teachers.values():
            teacher.requires_grad_(False).eval()
        self._teachers = teachers  # a plain dict: not registered, so not in parameters() / state_dict
        self._aux: Tensor | None = None

    def teacher_features(self, x: Tensor) -> dict[str, Tensor]:
        """Frozen teachers' features of `x` (teachers follow the input's device and dtype)."""
        with torch.no_grad():
            return {name: teacher.to(x)(x) for name, teacher in self._teachers.items()}

    def distillation_loss(self, x: Tensor, shared: Tensor) -> Tensor:
        """kd_weight · Σ_t mean over the batch of ‖n(A_t(shared)) − n(teacher_t(x))‖²."""
        targets = self.teacher_features(x)
        loss = shared.new_zeros(())
        for name, adaptor in self.adaptors.items():
            diff = F.normalize(adaptor(shared), dim=1) - F.normalize(targets[name], dim=1)
            loss = loss + diff.square().sum(dim=1).mean()
        return self.kd_weight * loss

    def encode(self, x: Tensor) -> Tensor:
        """Shared features; while training also the distillation term of this batch.

        Computed here rather than in `forward`, so callers that run `encode`/`decode`
        themselves (mode=representation) get it too.
        """
        shared = self.trunk(x)
        self._aux = self.distillation_loss(x, shared) if self.training else None
        return shared

    def auxiliary_loss(self) -> Tensor | None:
        return self._aux

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.adaptors[task].parameters()
        yield from self.heads[task].parameters()
