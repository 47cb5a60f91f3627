"""Schedules of pruning methods: how much to prune or rewire at a given point of training."""
from __future__ import annotations

import math


def cubic_sparsity(progress: float, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual pruning: s = s_f + (s_i − s_f)(1 − progress)³, progress clamped to [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def gradual_sparsity(epoch: int, start_epoch: int, end_epoch: int, final: float) -> float | None:
    """Target after `epoch` ends for pruning at the ends of epochs start..end (None outside).

    Progress is (epoch − start + 1) / (end − start + 1), so the first prune is already
    non-zero and the end of `end_epoch` reaches `final`.
    """
    if not start_epoch <= epoch <= end_epoch:
        return None
    return cubic_sparsity((epoch - start_epoch + 1) / (end_epoch - start_epoch + 1), final)


def cosine_fraction(step: int, end_step: int, initial: float) -> float:
    """RigL's drop fraction: initial/2 · (1 + cos(π·step/end_step)), 0 from end_step on."""
    if step >= end_step:
        return 0.0
    return initial / 2 * (1 + math.cos(math.pi * step / end_step))
