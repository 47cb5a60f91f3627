"""Sparsity metrics: parameter and channel-group sparsity, MDMTN's row metrics SR/CR/PS.

All functions read weights as they are (masked weights are exactly zero), so every
family of method is measured the same way. Percentages are in [0, 100].
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from mtlsparse.channel_groups import ChannelGroups, group_view


def param_sparsity(weights: Iterable[Tensor]) -> float:
    """% of entries that are exactly zero."""
    weights = list(weights)
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return 100.0 * zeros / total if total else 0.0


def group_sparsity(groups: Iterable[ChannelGroups | Tensor]) -> float:
    """% of channel groups that are entirely zero (a bare weight: its groups W[:, i] / W[:, i, :, :];
    BN-coupled `ChannelGroups`: W[:, i] with the producer's γ_i, β_i)."""
    groups = [ChannelGroups.of(g) for g in groups]
    total = sum(g.count for g in groups)
    zeros = sum(int(g.zero().sum()) for g in groups)
    return 100.0 * zeros / total if total else 0.0


def layer_group_sparsity(named_weights: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
    """Per-layer % of zero input-channel groups (for per-layer plots)."""
    return {name: group_sparsity([w]) for name, w in named_weights}


def row_stats(weight: Tensor) -> tuple[int, int, int]:
    """(#rows, #zero rows, #unique rows) of one weight; all zero rows count as one unique row."""
    rows = group_view(weight.detach())
    zero = rows.abs().sum(dim=1) == 0
    unique = int(torch.unique(rows[~zero], dim=0).shape[0]) + int(zero.any())
    return rows.shape[0], int(zero.sum()), unique


def row_metrics(weights: Iterable[Tensor]) -> dict[str, float]:
    """MDMTN row metrics: SR = % zero rows, CR = #rows/#unique, PS = #non-zero rows/#unique."""
    n_rows = n_zero = n_unique = 0
    for w in weights:
        r, z, u = row_stats(w)
        n_rows, n_zero, n_unique = n_rows + r, n_zero + z, n_unique + u
    if n_rows == 0:
        return {"sr": 0.0, "cr": 1.0, "ps": 1.0}
    return {"sr": 100.0 * n_zero / n_rows, "cr": n_rows / n_unique, "ps": (n_rows - n_zero) / n_unique}


def matrix_weights(model: nn.Module) -> list[Tensor]:
    """All weight matrices/kernels (ndim > 1) of a model: the set SR/CR/PS are defined on."""
    return [p for name, p in model.named_parameters() if p.dim() > 1 and name.endswith("weight")]


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total and non-zero parameter counts of the model."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "nonzero": sum(int((p != 0).sum()) for p in params)}
