"""The tolerance rule for numerically dead rows and units: they count as zero because they are set to zero.

A prox method leaves some weights tiny but not zero: GrOWL + Chebyshev left fc1 hidden units
whose incoming weights were ~1e-30 (dead after ReLU, with a negative bias), and input groups
can shrink the same way. A group norm that is a tiny fraction of its layer's largest one is
float round-off, not a signal, so with tolerance `tol`:

* an input-channel group (a paper "row": W[:, c], with the coupled BN's γ_c, β_c) whose norm is
  at most `tol` × the largest group norm of its layer is set to zero;
* an output unit (W[j], every weight the unit reads) whose norm is at most `tol` × the layer's
  largest output-unit norm is set to zero (its bias is kept: export removes the unit when the
  constant it then outputs is zero after the following ReLU).

The structured methods apply the rule at every epoch end (and GrOWL before it fixes the phase-2
support), before validation and checkpointing, so the metrics, phase 2 and export all read the
same exact zeros: no consumer needs a tolerance of its own. `tol = 0` switches the rule off.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtlsparse.channel_groups import ChannelGroups


@dataclass(frozen=True)
class Snapped:
    """How many groups / output units one application of the rule set to zero (were non-zero before)."""

    groups: int = 0
    units: int = 0


def dead(norms: Tensor, tol: float) -> Tensor:
    """Which norms are at most `tol` × the largest one (numerically dead; a norm that underflowed to 0
    while its entries are not all zero, e.g. entries of 1e-30 in float32, is dead too)."""
    if tol <= 0 or norms.numel() == 0:
        return torch.zeros_like(norms, dtype=torch.bool)
    return norms <= tol * norms.max()


def check_tolerance(tol: float) -> float:
    """Validate `method.dead_tol`: a relative tolerance in [0, 1)."""
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"method.dead_tol must be in [0, 1) (a fraction of the layer's largest norm; "
                         f"0 switches the rule off), got {tol}")
    return float(tol)


@torch.no_grad()
def snap_dead_groups_(layer: ChannelGroups, tol: float) -> int:
    """Zero the layer's numerically dead input groups; returns how many were not zero before."""
    rows = layer.stacked()
    nonzero = rows.detach().movedim(1, 0).reshape(rows.shape[1], -1).ne(0).any(1)  # per group (dim 1)
    mask = dead(layer.norms(), tol) & nonzero
    if mask.any():
        rows[:, mask] = 0
        layer.write_back_(rows)
    return int(mask.sum())


@torch.no_grad()
def snap_dead_units_(weight: Tensor, tol: float) -> int:
    """Zero the numerically dead output units (rows W[j]) of a weight; returns how many were not zero before."""
    flat = weight.detach().flatten(1)
    mask = dead(flat.norm(dim=1), tol) & flat.ne(0).any(1)
    if mask.any():
        weight[mask] = 0
    return int(mask.sum())


def snap_dead_(groups: Sequence[ChannelGroups], tol: float) -> Snapped:
    """Apply the rule to each layer's input groups, then to its output units; returns what it zeroed."""
    zeroed = [(snap_dead_groups_(layer, tol), snap_dead_units_(layer.weight, tol)) for layer in groups]
    return Snapped(sum(g for g, _ in zeroed), sum(u for _, u in zeroed))
