"""How a global density budget splits across layers, and score → mask selection.

Allocations: `uniform` (same density in every layer), `erk` (Erdős–Rényi-Kernel, RigL:
density ∝ Σ shape / Π shape, capped at 1 with the excess redistributed) and `global`
(one score threshold across all layers). Kept counts are integers that sum exactly to
round(density · total), so the achieved sparsity is the target up to one weight.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import torch
from torch import Tensor

from mtlsparse.sparsity.masks import topk_mask

ALLOCATIONS = ("uniform", "global", "erk")
LAYERWISE = ("uniform", "erk")


def check_allocation(allocation: str, allowed: Sequence[str] = ALLOCATIONS) -> str:
    """Validate an allocation name against the allowed ones."""
    if allocation not in allowed:
        raise ValueError(f"method.allocation must be one of {tuple(allowed)}, got '{allocation}'")
    return allocation


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Erdős–Rényi-Kernel densities whose weighted mean is `density`; layers that would exceed 1 are dense."""
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(numels) - sum(numels[i] for i in dense)
        divisor = sum(raw[i] * numels[i] for i in range(len(shapes)) if i not in dense)
        eps = budget / divisor if divisor else 0.0
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def kept_counts(numels: Sequence[int], densities: Sequence[float], density: float) -> list[int]:
    """Integer kept counts near densities·numels summing to round(density·Σ numels) (largest remainder)."""
    target = round(density * sum(numels))
    exact = [min(d, 1.0) * n for d, n in zip(densities, numels)]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(numels)), key=lambda i: exact[i] - counts[i], reverse=True)
    shortfall = target - sum(counts)
    while shortfall > 0:
        for i in by_remainder:
            if shortfall > 0 and counts[i] < numels[i]:
                counts[i] += 1
                shortfall -= 1
    return counts


def layer_counts(shapes: Sequence[Sequence[int]], density: float, allocation: str) -> list[int]:
    """Kept weights per layer for a layer-wise allocation (`uniform` or `erk`)."""
    check_allocation(allocation, LAYERWISE)
    numels = [math.prod(s) for s in shapes]
    densities = erk_densities(shapes, density) if allocation == "erk" else [density] * len(shapes)
    return kept_counts(numels, densities, density)


def global_masks(scores: Sequence[Tensor], density: float) -> list[Tensor]:
    """Keep the round(density·total) highest scores across all layers (one threshold)."""
    flat = torch.cat([s.flatten() for s in scores])
    keep = topk_mask(flat, round(density * flat.numel()))
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def score_masks(scores: Sequence[Tensor], density: float, allocation: str) -> list[Tensor]:
    """Masks keeping the highest scores, `density` overall, split across layers by `allocation`."""
    if check_allocation(allocation) == "global":
        return global_masks(scores, density)
    counts = layer_counts([s.shape for s in scores], density, allocation)
    return [topk_mask(s, k) for s, k in zip(scores, counts)]


def keep_ratios(score: Tensor) -> Tensor:
    """For each entry, the smallest top-q share of `score` that contains it: (rank + 1) / #scored.

    Entries scored −inf are not scored (ratio +inf: never kept).
    """
    scored = torch.isfinite(score)
    order = torch.argsort(score, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(score.numel(), device=score.device)
    ratios = (ranks + 1).to(torch.float64) / max(int(scored.sum()), 1)
    return torch.where(scored, ratios, torch.full_like(ratios, math.inf))


def union_topk(task_scores: Sequence[Tensor], k: int) -> tuple[Tensor, list[Tensor], float]:
    """Per-task top-q sets whose union has exactly k entries ("keep if ANY task keeps").

    Every task keeps the top-q share of the entries it scores (−inf = not scored), with
    one q for all tasks. The union grows monotonically with q, so the smallest q whose
    union holds k entries is the k-th smallest over entries of min_t ratio_t: the
    bisection over q solved exactly by one sort. Returns (union mask, per-task masks, q);
    the per-task masks are subsets of the union and together cover it.
    """
    best = reduce(torch.minimum, (keep_ratios(s) for s in task_scores))
    keep = topk_mask(-best, k) & torch.isfinite(best)
    q = float(best[keep].max()) if keep.any() else 0.0
    return keep, [keep & (keep_ratios(s) <= q) for s in task_scores], q
