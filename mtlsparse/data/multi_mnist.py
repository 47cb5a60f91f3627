"""Multi-MNIST-style two-item datasets: Multi-Fashion, Multi-MNIST, Multi-Fashion+MNIST.

Defaults follow the ParetoMTL/COSMOS protocol (36x36 canvas, items at (0,0) and
(8,8), 120k/20k pairs); the MDMTN protocol is ``offset=6, resize=28``. Built once
per parameter set from the 28x28 base datasets and cached as uint8 tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtlsparse.data.base import ImageData, MultiTaskDataModule
from mtlsparse.data.cache import build_cached, cache_path, save_atomic
from mtlsparse.data.pairs import build_pairs, channel_stats, held_out_pair_counts, hold_out, subset
from mtlsparse.data.sources import SOURCES, load_source
from mtlsparse.tasks import Task

ITEM_SIZE = 28
BUILD_VERSION = 1  # bump when the build changes, so old caches are not reused


class MultiPairDataModule(MultiTaskDataModule):
    """Pairs of 28x28 items (left from ``left_source``, right from ``right_source``); tasks ``left``/``right``.

    With ``val_from=held_out_items`` the sources' training items are split first (the same
    split for both sides when they share a source): ``val_fraction`` of the items are held out,
    and ``val_fraction`` of ``train_pairs`` are built from them as the validation pairs, the rest
    from the other items. So no validation image contains an item seen in training, and the
    train/val pair counts equal the default split's.
    """

    shares_items = True

    left_source = "mnist"
    right_source = "mnist"
    cache_name = "multi_mnist"

    def __init__(
        self,
        root: str = "data",
        canvas: int = 36,
        offset: int = 8,
        resize: int | None = None,
        train_pairs: int = 120_000,
        test_pairs: int = 20_000,
        download: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if offset < 0 or offset + ITEM_SIZE > canvas:
            raise ValueError(f"offset must be in [0, canvas - {ITEM_SIZE}] = [0, {canvas - ITEM_SIZE}], got {offset}")
        if resize is not None and resize < 1:
            raise ValueError(f"resize must be a positive int or null, got {resize}")
        if train_pairs < 1 or test_pairs < 1:
            raise ValueError(f"train_pairs and test_pairs must be >= 1, got {train_pairs}, {test_pairs}")
        self.canvas, self.offset, self.resize = canvas, offset, resize
        self.train_pairs, self.test_pairs = train_pairs, test_pairs
        self.download = download
        self.tasks = {name: Task(name, num_classes=10) for name in ("left", "right")}
        side = resize or canvas
        self.input_shape = (1, side, side)

    @property
    def build_params(self) -> dict[str, Any]:
        """Everything the built tensors depend on; its hash names the cache file."""
        return {
            "version": BUILD_VERSION,
            "left": self.left_source,
            "right": self.right_source,
            "canvas": self.canvas,
            "offset": self.offset,
            "resize": self.resize,
            "train_pairs": self.train_pairs,
            "test_pairs": self.test_pairs,
            "seed": self.seed,
        } | self._held_out_params()

    def _held_out_params(self) -> dict[str, Any]:
        """Build keys of the held-out-items validation split (none for the default split, whose caches stay valid)."""
        return {"val_from": self.val_from, "val_fraction": self.val_fraction} if self.held_out else {}

    @property
    def held_out(self) -> bool:
        return self.val_from == "held_out_items"

    @property
    def splits(self) -> dict[str, int]:
        """Pairs to build per split: the val pairs come out of train_pairs when they are built apart."""
        if not self.held_out:
            return {"train": self.train_pairs, "test": self.test_pairs}
        n_train, n_val = held_out_pair_counts(self.train_pairs, self.val_fraction)
        return {"train": n_train, "val": n_val, "test": self.test_pairs}

    @property
    def cache_path(self) -> Path:
        return cache_path(self.root, self.cache_name, self.build_params)

    def prepare_data(self) -> None:
        """Build and cache the pairs unless a cache file exists (setup() rebuilds a corrupt one)."""
        if not self.cache_path.exists():
            save_atomic(self.build(), self.cache_path)

    def load(self) -> ImageData:
        c = build_cached(self.cache_path, self.build, self._check_cache)
        return ImageData(
            train_images=c["train_images"],
            train_targets=c["train_targets"],
            test_images=c["test_images"],
            test_targets=c["test_targets"],
            mean=tuple(c["mean"]),
            std=tuple(c["std"]),
            val_images=c.get("val_images"),
            val_targets=c.get("val_targets"),
        )

    def build(self) -> dict[str, Any]:
        """Build train pairs from the sources' train items and test pairs from their test items
        (and, for held_out_items, val pairs from train items that no train pair uses)."""
        sources = {name: load_source(name, self.root, self.download) for name in (self.left_source, self.right_source)}
        generator = torch.Generator().manual_seed(self.seed)
        # per split: which items of which source split each side draws from, and the random stream
        everything = {name: torch.arange(len(source["train"].images)) for name, source in sources.items()}
        plan = {"train": ("train", everything, generator), "test": ("test", None, generator)}
        if self.held_out:
            # items held out once per source (shared sides share the split); train/val pairs get their own
            # stream, and the main stream skips the default train draws, so the test pairs stay the default's
            item_generator = torch.Generator().manual_seed(self.seed + 2)
            parts = {name: hold_out(len(index), self.val_fraction, item_generator)
                     for name, index in everything.items()}
            pair_generator = torch.Generator().manual_seed(self.seed + 3)
            plan["train"] = ("train", {name: kept for name, (kept, _) in parts.items()}, pair_generator)
            plan["val"] = ("train", {name: held for name, (_, held) in parts.items()}, pair_generator)
            for name in (self.left_source, self.right_source):
                torch.randint(len(everything[name]), (self.train_pairs,), generator=generator)
        out: dict[str, Any] = {"params": self.build_params}
        for split, count in self.splits.items():
            source_split, pools, draws = plan[split]
            sides = [sources[name][source_split] for name in (self.left_source, self.right_source)]
            index = [torch.arange(len(side.images)) if pools is None else pools[name]
                     for side, name in zip(sides, (self.left_source, self.right_source))]
            pairs = build_pairs(subset(sides[0], index[0]), subset(sides[1], index[1]), count, self.canvas,
                                self.offset, draws, self.resize)
            out |= {
                f"{split}_images": pairs.images,
                f"{split}_targets": pairs.targets,
                f"{split}_left_index": index[0][pairs.left_index],  # into the source split's items
                f"{split}_right_index": index[1][pairs.right_index],
            }
        mean, std = channel_stats(out["train_images"])
        return out | {"mean": list(mean), "std": list(std)}

    def _check_cache(self, c: dict[str, Any]) -> None:
        """Raise if a loaded cache does not match what build() would produce."""
        if c["params"] != self.build_params:
            raise ValueError(f"built with {c['params']}, expected {self.build_params}")
        for split, count in self.splits.items():
            images, targets = c[f"{split}_images"], c[f"{split}_targets"]
            if images.dtype != torch.uint8 or tuple(images.shape) != (count, *self.input_shape):
                raise ValueError(f"{split}_images is {images.dtype} {tuple(images.shape)}")
            if targets.dtype != torch.int64 or tuple(targets.shape) != (count, 2):
                raise ValueError(f"{split}_targets is {targets.dtype} {tuple(targets.shape)}")
        if len(c["mean"]) != 1 or len(c["std"]) != 1:
            raise ValueError("mean/std must have one entry per channel")


class MultiMNIST(MultiPairDataModule):
    """Two MNIST digits per image."""

    source_hint = f"MNIST: {SOURCES['mnist'].how_to_get}"


class MultiFashion(MultiPairDataModule):
    """Two Fashion-MNIST items per image (the default benchmark)."""

    left_source = right_source = "fashion_mnist"
    cache_name = "multi_fashion"
    source_hint = f"Fashion-MNIST: {SOURCES['fashion_mnist'].how_to_get}"


class MultiFashionMNIST(MultiPairDataModule):
    """Fashion-MNIST item on the left, MNIST digit on the right."""

    left_source, right_source = "fashion_mnist", "mnist"
    cache_name = "multi_fashion_mnist"
    source_hint = f"{MultiFashion.source_hint}; {MultiMNIST.source_hint}"
