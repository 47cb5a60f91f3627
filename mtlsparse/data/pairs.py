"""Vectorised construction of two-item images (Multi-MNIST style) and pixel statistics.

Shared by the Multi-* datasets and MultiDigits: two square items are pasted on a
canvas, the left at (0, 0) and the right at (offset, offset), overlapping pixels
combined by maximum; the labels are the two items' labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlsparse.data.sources import ImageSet


@dataclass(frozen=True)
class Pairs:
    """Built pairs: uint8 images ``[N,1,H,W]``, int64 targets ``[N,2]`` (left, right) and provenance."""

    images: Tensor
    targets: Tensor
    left_index: Tensor  # index of each pair's left item in the left source split
    right_index: Tensor


def paste_max(left: Tensor, right: Tensor, canvas: int, offset: int) -> Tensor:
    """Paste ``left`` at (0,0) and ``right`` at (offset,offset) of a zero canvas, pixelwise max."""
    n, h, w = left.shape
    if right.shape != left.shape:
        raise ValueError(f"left items {tuple(left.shape)} and right items {tuple(right.shape)} differ in shape")
    if offset < 0 or offset + max(h, w) > canvas:
        raise ValueError(f"offset {offset} puts a {h}x{w} item outside a {canvas}x{canvas} canvas")
    out = left.new_zeros(n, canvas, canvas)
    out[:, :h, :w] = left
    region = out[:, offset : offset + h, offset : offset + w]
    region.copy_(torch.maximum(region, right))
    return out


def resize_images(images: Tensor, size: int, chunk: int = 8192) -> Tensor:
    """Resize uint8 ``[N,H,W]`` to ``[N,size,size]`` (bilinear, antialiased), chunked to bound memory."""
    out = torch.empty(len(images), size, size, dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].unsqueeze(1).float()
        block = F.interpolate(block, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = block.squeeze(1).round_().clamp_(0, 255).to(torch.uint8)
    return out


def hold_out(n: int, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices (kept, held out) of n items split at random, ``round(fraction·n)`` held out (at least 1)."""
    perm = torch.randperm(n, generator=generator)
    n_held = max(1, round(n * fraction))
    if n_held >= n:
        raise ValueError(f"dataset.val_fraction={fraction} holds out all {n} items: lower dataset.val_fraction")
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def held_out_pair_counts(train_pairs: int, fraction: float) -> tuple[int, int]:
    """(train, val) pair counts when the val pairs come out of ``train_pairs``: ``round(fraction·n)`` (at least 1)."""
    n_val = max(1, round(train_pairs * fraction))
    if n_val >= train_pairs:
        raise ValueError(f"dataset.val_fraction={fraction} leaves no training pairs of train_pairs={train_pairs}: "
                         "lower dataset.val_fraction")
    return train_pairs - n_val, n_val


def subset(items: ImageSet, index: Tensor) -> ImageSet:
    """The items at ``index``."""
    return ImageSet(items.images[index], items.labels[index])


def build_pairs(
    left: ImageSet,
    right: ImageSet,
    count: int,
    canvas: int,
    offset: int,
    generator: torch.Generator,
    resize: int | None = None,
) -> Pairs:
    """Draw ``count`` pairs with independent uniform item indices and compose their images."""
    i = torch.randint(len(left.images), (count,), generator=generator)
    j = torch.randint(len(right.images), (count,), generator=generator)
    images = paste_max(left.images[i], right.images[j], canvas, offset)
    if resize is not None:
        images = resize_images(images, resize)
    targets = torch.stack([left.labels[i], right.labels[j]], dim=1)
    return Pairs(images=images.unsqueeze(1), targets=targets, left_index=i, right_index=j)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 ``[N,C,H,W]`` on the 0..1 scale, via histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * values.square()).sum() / total - mean.square()
        means.append(mean.item())
        stds.append(var.clamp_min(0).sqrt().item())
    return tuple(means), tuple(stds)
