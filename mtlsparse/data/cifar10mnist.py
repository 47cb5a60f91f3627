"""Cifar10Mnist (Hotegni et al.; docs/methods/growl_mdmtn.md): a translucent MNIST digit on a CIFAR-10 image.

Image i of a split is CIFAR-10 image i of that split with MNIST digit i of the same
split (28x28, resized to 32x32) laid over it, per RGB channel:

    out = (1 − a)·cifar + a·digit,    a = alpha where the resized digit is > 0, else 0

so the background of the digit leaves the CIFAR image untouched and its ink is a
grey stroke at opacity ``alpha``. The paper says only that the first 50000 MNIST
training digits are "padded ... over the CIFAR-10 images after making them slightly
translucent" (and the 10000 test digits over the 10000 test images); the formula is
the authors' construction (a 128/255 ≈ 0.5 opacity mask on the digit's non-zero
pixels), with the opacity exposed as ``alpha``. Tasks: ``cifar`` (CIFAR-10 class)
and ``digit`` (MNIST class); 50000 train images, 10000 test.

Reads torchvision's CIFAR-10 format ``<root>/cifar-10-batches-py/`` and MNIST through
:func:`mtlsparse.data.sources.load_source`; built once (no randomness) and cached
as uint8 tensors under ``<root>/mtlsparse_cache/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlsparse.data.base import ImageData, MultiTaskDataModule
from mtlsparse.data.cache import build_cached, cache_path, save_atomic
from mtlsparse.data.cifar100_20 import read_pickle
from mtlsparse.data.pairs import channel_stats, resize_images
from mtlsparse.data.sources import SOURCES, ImageSet, load_source, locate_pickled
from mtlsparse.tasks import Task

DIR_NAME = "cifar-10-batches-py"
SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
IMAGE_SHAPE = (3, 32, 32)
TASKS = ("cifar", "digit")
BUILD_VERSION = 1  # bump when the build changes, so old caches are not reused
BLEND_CHUNK = 4096  # images blended at once: bounds the float32 working memory to ~50 MB
HOW_TO_GET = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into the data root "
    "(data_root=... or $MTLSPARSE_DATA), or set dataset.download=true on a machine that is online"
)


def read_batch(path: Path) -> tuple[Tensor, Tensor]:
    """uint8 images ``[N,3,32,32]`` and int64 labels ``[N]`` of one CIFAR-10 batch pickle."""
    raw = read_pickle(path)
    data = np.asarray(raw["data"])
    labels = torch.as_tensor(raw["labels"], dtype=torch.int64)
    row = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row or len(data) != len(labels):
        raise ValueError(f"{path}: expected uint8 data [N, {row}] with N labels, got data {data.dtype} "
                         f"{data.shape} and {len(labels)} labels")
    return torch.from_numpy(data.copy()).view(-1, *IMAGE_SHAPE), labels  # rows hold R, G, B planes


def locate(root: str | Path, download: bool = False) -> Path:
    """The ``cifar-10-batches-py`` directory under ``root`` holding all six batches (downloading if asked)."""
    files = [name for split_files in SPLIT_FILES.values() for name in split_files]
    return locate_pickled(root, DIR_NAME, files, "CIFAR-10", "CIFAR10", HOW_TO_GET, download)


def load_cifar10(root: str | Path, download: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train": (images, labels), "test": (images, labels)}``, train batches concatenated in order."""
    directory = locate(root, download)
    out = {}
    for split, files in SPLIT_FILES.items():
        batches = [read_batch(directory / name) for name in files]
        out[split] = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return out


def blend(cifar: Tensor, digits: Tensor, alpha: float) -> Tensor:
    """``(1 − a)·cifar + a·digit`` per channel, ``a = alpha`` where ``digits > 0``; uint8 ``[N,3,H,W]``."""
    out = torch.empty_like(cifar)
    for start in range(0, len(cifar), BLEND_CHUNK):
        block = slice(start, start + BLEND_CHUNK)
        background = cifar[block].float()
        digit = digits[block].unsqueeze(1).float()  # [n,1,H,W]: the grey digit on every channel
        a = alpha * (digit > 0)
        out[block] = background.add_(a * (digit - background)).round_().clamp_(0, 255).to(torch.uint8)
    return out


def compose(cifar_images: Tensor, cifar_labels: Tensor, mnist: ImageSet, alpha: float) -> tuple[Tensor, Tensor]:
    """Lay MNIST digit i on CIFAR image i for every CIFAR image; targets ``[N,2]`` = (cifar class, digit)."""
    n = len(cifar_images)
    if len(mnist.images) < n:
        raise ValueError(f"Cifar10Mnist pairs the i-th digit with the i-th CIFAR-10 image, but MNIST has "
                         f"{len(mnist.images)} digits for {n} CIFAR-10 images")
    digits = resize_images(mnist.images[:n], IMAGE_SHAPE[1])
    return blend(cifar_images, digits, alpha), torch.stack([cifar_labels, mnist.labels[:n]], dim=1)


class Cifar10Mnist(MultiTaskDataModule):
    """Tasks ``cifar`` and ``digit`` (10 classes each) on 3x32x32 blends; 20% of train held out for val."""

    source_hint = f"CIFAR-10 (python version): {HOW_TO_GET}; MNIST: {SOURCES['mnist'].how_to_get}"

    def __init__(self, root: str = "data", alpha: float = 0.5, val_fraction: float = 0.2,
                 download: bool = False, **kwargs: Any) -> None:
        super().__init__(root=root, val_fraction=val_fraction, **kwargs)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha (opacity of the digit's ink) must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.download = download
        self.tasks = {name: Task(name, num_classes=10) for name in TASKS}
        self.input_shape = IMAGE_SHAPE

    @property
    def build_params(self) -> dict[str, Any]:
        """Everything the built tensors depend on; its hash names the cache file."""
        return {"version": BUILD_VERSION, "alpha": self.alpha}

    @property
    def cache_path(self) -> Path:
        return cache_path(self.root, "cifar10mnist", self.build_params)

    def prepare_data(self) -> None:
        """Build and cache the blends unless a cache file exists (setup() rebuilds a corrupt one)."""
        if not self.cache_path.exists():
            save_atomic(self.build(), self.cache_path)

    def load(self) -> ImageData:
        c = build_cached(self.cache_path, self.build, self._check_cache)
        return ImageData(c["train_images"], c["train_targets"], c["test_images"], c["test_targets"],
                         tuple(c["mean"]), tuple(c["std"]))

    def build(self) -> dict[str, Any]:
        """Blend each split's MNIST digits onto the same split's CIFAR-10 images, in order."""
        cifar = load_cifar10(self.root, self.download)
        mnist = load_source("mnist", self.root, self.download)
        out: dict[str, Any] = {"params": self.build_params}
        for split, (images, labels) in cifar.items():
            out[f"{split}_images"], out[f"{split}_targets"] = compose(images, labels, mnist[split], self.alpha)
        mean, std = channel_stats(out["train_images"])
        return out | {"mean": list(mean), "std": list(std)}

    def _check_cache(self, c: dict[str, Any]) -> None:
        """Raise if a loaded cache does not match what build() would produce."""
        if c["params"] != self.build_params:
            raise ValueError(f"built with {c['params']}, expected {self.build_params}")
        for split in SPLIT_FILES:
            images, targets = c[f"{split}_images"], c[f"{split}_targets"]
            if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
                raise ValueError(f"{split}_images is {images.dtype} {tuple(images.shape)}")
            if targets.dtype != torch.int64 or tuple(targets.shape) != (len(images), len(TASKS)):
                raise ValueError(f"{split}_targets is {targets.dtype} {tuple(targets.shape)}")
        if len(c["mean"]) != IMAGE_SHAPE[0] or len(c["std"]) != IMAGE_SHAPE[0]:
            raise ValueError("mean/std must have one entry per channel")
