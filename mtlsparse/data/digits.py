"""MultiDigits: Multi-MNIST-style pairs of scikit-learn's bundled 8x8 digits.

Real handwritten digits that need no download, for quick end-to-end runs. The 1797
digits are split into train/test items first, so test pairs only show unseen digits.
"""
from __future__ import annotations

from typing import Any

import torch

from mtlsparse.data.base import ImageData, MultiTaskDataModule
from mtlsparse.data.pairs import build_pairs, channel_stats, held_out_pair_counts, hold_out, subset
from mtlsparse.data.sources import ImageSet
from mtlsparse.tasks import Task

ITEM_SIZE = 8
MAX_VALUE = 16  # sklearn digits pixels are 0..16


def load_digits_items() -> ImageSet:
    """All 1797 sklearn digits as uint8 ``[N,8,8]`` scaled to 0..255, with labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).mul(255 / MAX_VALUE).round().to(torch.uint8)
    return ImageSet(images=images, labels=torch.from_numpy(bunch.target).to(torch.int64))


class MultiDigits(MultiTaskDataModule):
    """Two sklearn digits per image, left at (0,0) and right at (offset,offset); tasks ``left``/``right``."""

    shares_items = True

    source_hint = "scikit-learn's bundled digits (pip install scikit-learn); nothing to download"

    def __init__(
        self,
        root: str = "data",
        canvas: int = 12,
        offset: int = 4,
        train_pairs: int = 4000,
        test_pairs: int = 1000,
        test_item_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if offset < 0 or offset + ITEM_SIZE > canvas:
            raise ValueError(f"offset must be in [0, canvas - {ITEM_SIZE}] = [0, {canvas - ITEM_SIZE}], got {offset}")
        if not 0.0 < test_item_fraction < 1.0:
            raise ValueError(f"test_item_fraction must be in (0, 1), got {test_item_fraction}")
        if train_pairs < 1 or test_pairs < 1:
            raise ValueError(f"train_pairs and test_pairs must be >= 1, got {train_pairs}, {test_pairs}")
        self.canvas, self.offset = canvas, offset
        self.train_pairs, self.test_pairs = train_pairs, test_pairs
        self.test_item_fraction = test_item_fraction
        self.tasks = {name: Task(name, num_classes=10) for name in ("left", "right")}
        self.input_shape = (1, canvas, canvas)

    def load(self) -> ImageData:
        items = load_digits_items()
        generator = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(items.labels), generator=generator)
        n_test = round(len(perm) * self.test_item_fraction)
        split_items = {
            "test": ImageSet(items.images[perm[:n_test]], items.labels[perm[:n_test]]),
            "train": ImageSet(items.images[perm[n_test:]], items.labels[perm[n_test:]]),
        }
        counts = {"train": self.train_pairs, "test": self.test_pairs}
        draws = dict.fromkeys(counts, generator)
        if self.val_from == "held_out_items":  # as MultiPairDataModule: test pairs stay the default's
            kept, held = hold_out(len(perm) - n_test, self.val_fraction, torch.Generator().manual_seed(self.seed + 2))
            pool = split_items["train"]
            split_items["train"], split_items["val"] = subset(pool, kept), subset(pool, held)
            counts["train"], counts["val"] = held_out_pair_counts(self.train_pairs, self.val_fraction)
            draws["train"] = draws["val"] = torch.Generator().manual_seed(self.seed + 3)
            for _ in range(2):
                torch.randint(len(perm) - n_test, (self.train_pairs,), generator=generator)
        pairs = {split: build_pairs(split_items[split], split_items[split], count, self.canvas, self.offset,
                                    draws[split])
                 for split, count in counts.items()}
        mean, std = channel_stats(pairs["train"].images)
        return ImageData(
            train_images=pairs["train"].images,
            train_targets=pairs["train"].targets,
            test_images=pairs["test"].images,
            test_targets=pairs["test"].targets,
            mean=mean,
            std=std,
            val_images=pairs["val"].images if "val" in pairs else None,
            val_targets=pairs["val"].targets if "val" in pairs else None,
        )
