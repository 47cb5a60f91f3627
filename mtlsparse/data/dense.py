"""Base LightningDataModule for dense-prediction datasets read from disk sample by sample.

NYUv2, CelebAMask-HQ and Cityscapes are too large to hold in memory like the Multi-*
sets, so they use an ordinary map-style Dataset + DataLoader (``num_workers`` worker
processes decode files in parallel). A batch is ``(x [B,3,H,W], {task: target})``, the
same structure as the in-memory datamodules, so models, methods and the
LightningModule treat both alike.

Augmentation (training split only) is one joint transform: resize → random crop →
horizontal flip, with the same crop window and flip for the image and every target
(flip also negates the x component of surface normals). Random draws use torch's
global RNG, which Lightning seeds per worker (``seed_everything(workers=True)``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mtlsparse.data.base import check_loader_options
from mtlsparse.metrics.dense import check_reference
from mtlsparse.tasks import DENSE_KINDS, Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's pretrained ResNets expect this normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
Targets = dict[str, Tensor]


def to_size(value: Sequence[int] | int | None, key: str) -> tuple[int, int] | None:
    """(H, W) from an int (square), a pair, or None; raises ValueError naming the key."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{key} must be a positive int or [height, width], got {value!r}")
    return pair  # type: ignore[return-value]


def resize_map(x: Tensor, size: tuple[int, int], smooth: bool) -> Tensor:
    """Resize a `[C,H,W]` (or `[H,W]`) map: bilinear with antialiasing for images, nearest for targets.

    Nearest keeps label ids, and keeps invalid depth/normal pixels (zeros) from blending into valid ones.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.dim() == 2
    batch = (x[None] if squeeze else x)[None].float()
    if smooth:
        out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(batch, size=size, mode="nearest-exact")
    out = out[0, 0] if squeeze else out[0]
    return out.to(x.dtype)


@dataclass(frozen=True)
class JointTransform:
    """Resize / random crop / flip applied identically to an image and its dense targets, then normalise.

    ``kinds`` maps task name → task kind; image-level targets (binary, classification) pass
    through untouched. Evaluation (``train=False``) only resizes and normalises.
    """

    kinds: Mapping[str, str]
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    flip_prob: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, image: Tensor, targets: Targets, train: bool) -> tuple[Tensor, Targets]:
        size = self.size or tuple(image.shape[-2:])
        image = resize_map(image, size, smooth=True)
        dense = {k: resize_map(v, size, smooth=False) for k, v in targets.items() if self.kinds[k] in DENSE_KINDS}
        if train and self.crop is not None:
            if self.crop[0] > size[0] or self.crop[1] > size[1]:
                raise ValueError(f"crop_size {list(self.crop)} is larger than the image {list(size)}")
            top = int(torch.randint(size[0] - self.crop[0] + 1, ()))
            left = int(torch.randint(size[1] - self.crop[1] + 1, ()))
            window = (..., slice(top, top + self.crop[0]), slice(left, left + self.crop[1]))
            image, dense = image[window], {k: v[window] for k, v in dense.items()}
        if train and self.flip_prob > 0 and float(torch.rand(())) < self.flip_prob:
            image, dense = image.flip(-1), {k: v.flip(-1) for k, v in dense.items()}
            for k, v in dense.items():
                if self.kinds[k] == "normal":
                    v[0].neg_()  # mirrored scene: the normal's horizontal component changes sign
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        image = (image - mean) / std
        return image.contiguous(), {k: dense[k].contiguous() if k in dense else v for k, v in targets.items()}



class DenseDataset(Dataset):
    """Map-style dataset: `read(sample)` loads one (image in [0,1] `[3,H,W]`, targets), then `transform`."""

    def __init__(self, samples: Sequence[Any], read: Callable[[Any], tuple[Tensor, Targets]],
                 transform: JointTransform, train: bool) -> None:
        self.samples = list(samples)
        self.read = read
        self.transform = transform
        self.train = train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Targets]:
        image, targets = self.read(self.samples[index])
        return self.transform(image, targets, self.train)


def subsample(samples: Sequence[Any], limit: int | None, generator: torch.Generator) -> list[Any]:
    """A seeded random subset of `limit` samples in their original order, or all of them."""
    if limit is None or limit >= len(samples):
        return list(samples)
    keep = torch.randperm(len(samples), generator=generator)[:limit].sort().values
    return [samples[i] for i in keep.tolist()]


def split_fractions(samples: Sequence[Any], fractions: Sequence[float],
                    generator: torch.Generator) -> list[list[Any]]:
    """Seeded disjoint random parts of `samples` with the given fractions (sizes rounded, remainder last)."""
    perm = torch.randperm(len(samples), generator=generator).tolist()
    parts, start = [], 0
    for i, fraction in enumerate(fractions):
        end = len(perm) if i == len(fractions) - 1 else start + round(len(perm) * fraction)
        parts.append([samples[j] for j in sorted(perm[start:end])])
        start = end
    return parts


def image_tensor(array: np.ndarray) -> Tensor:
    """HxWx3 image (uint8 0..255, or float 0..1) → float32 `[3,H,W]` in [0, 1]."""
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    if array.dtype != np.uint8 and float(array.max()) > 1.0 + 1e-3:
        raise ValueError(f"float images must be in [0, 1], got values up to {float(array.max()):.4g} "
                         "(store uint8 for the 0..255 range)")
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float() / scale


class DenseDataModule(L.LightningDataModule):
    """Seeded train/val/test loaders over files on disk; subclasses list and read the samples.

    Subclasses build ``all_tasks`` (every task the dataset offers) and pass it up; ``tasks``
    picks a subset (e.g. single-task reference runs). They implement :meth:`list_samples`
    (raising FileNotFoundError with the expected layout when files are missing) and
    :meth:`read_sample`; :meth:`split_samples` holds out ``val_fraction`` of the training
    samples unless a subclass splits differently. ``reference`` gives single-task numbers
    for Δm (``{'seg/miou': 0.5, 'depth/abs_err': 0.6}`` or nested ``{seg: {miou: 0.5}}``).
    """

    source_hint: str = ""  # how to obtain the data, for errors and docs
    native_size: tuple[int, int] = (256, 256)  # image size on disk, for `input_shape` when image_size is null

    def __init__(self, all_tasks: Mapping[str, Task], root: str = "data", tasks: Sequence[str] | None = None,
                 batch_size: int = 8, eval_batch_size: int = 8, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0, limit_train: int | None = None, limit_test: int | None = None,
                 image_size: Sequence[int] | int | None = None, crop_size: Sequence[int] | int | None = None,
                 hflip_prob: float = 0.5, reference: Mapping | None = None) -> None:
        super().__init__()
        check_loader_options(batch_size, eval_batch_size, val_fraction, limit_train, limit_test)
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        chosen = list(all_tasks) if tasks is None else list(tasks)
        unknown = [t for t in chosen if t not in all_tasks]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"tasks must be a non-empty list of distinct names from {list(all_tasks)}, got {chosen}")
        self.tasks: dict[str, Task] = {name: all_tasks[name] for name in chosen}
        self.root = root
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.seed, self.num_workers = val_fraction, seed, num_workers
        self.limit_train, self.limit_test = limit_train, limit_test
        self.image_size = to_size(image_size, "image_size")
        self.crop_size = to_size(crop_size, "crop_size")
        if self.crop_size and self.image_size and any(c > s for c, s in zip(self.crop_size, self.image_size)):
            raise ValueError(f"crop_size {list(self.crop_size)} must fit in image_size {list(self.image_size)}")
        self.input_shape = (3, *(self.image_size or self.native_size))
        modes = {f"{n}/{m}": mode for n, t in self.tasks.items() for m, mode in t.metric_modes.items()}
        self.reference = check_reference(reference, modes)
        self.transform = JointTransform({n: t.kind for n, t in self.tasks.items()}, self.image_size,
                                        self.crop_size, hflip_prob)
        self.datasets: dict[str, DenseDataset] = {}
        self._shuffle_generator = torch.Generator().manual_seed(seed)

    # ---------------------------------------------------------------- subclass API
    def list_samples(self, split: str) -> list[Any]:
        """Sample descriptors of the on-disk split `split` ('train' or 'test'), in a fixed order."""
        raise NotImplementedError

    def read_sample(self, sample: Any) -> tuple[Tensor, Targets]:
        """Image float `[3,H,W]` in [0,1] and the chosen tasks' targets at native resolution."""
        raise NotImplementedError

    def split_samples(self) -> dict[str, list[Any]]:
        """Seeded train / val / test sample lists: val is a hold-out of the (limited) training samples."""
        generator = torch.Generator().manual_seed(self.seed)
        train = subsample(self.list_samples("train"), self.limit_train, generator)
        test = subsample(self.list_samples("test"), self.limit_test, generator)
        val, train = split_fractions(train, (self.val_fraction, 1 - self.val_fraction), generator)
        return {"train": train, "val": val, "test": test}

    # ------------------------------------------------------------------ lightning
    def setup(self, stage: str | None = None) -> None:
        """List the files once (raising if any are missing) and build the three datasets."""
        if self.datasets:
            return
        splits = self.split_samples()
        if not splits["train"]:
            raise ValueError(f"{type(self).__name__}: no training samples left after the val hold-out")
        self.datasets = {split: DenseDataset(samples, self.read_sample, self.transform, train=split == "train")
                         for split, samples in splits.items()}

    @property
    def num_train_samples(self) -> int:
        if not self.datasets:
            raise RuntimeError("num_train_samples is known only after setup()")
        return len(self.datasets["train"])

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        if not self.datasets:
            raise RuntimeError(f"{split}_dataloader() called before setup()")
        ds, train = self.datasets[split], split == "train"
        return DataLoader(
            ds, batch_size=batch_size, shuffle=train, generator=self._shuffle_generator if train else None,
            # a last training batch of one sample would break BatchNorm in the heads' image pooling
            drop_last=train and len(ds) > batch_size,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)


def missing_files_message(title: str, directory: Any, layout: str, how_to_get: str, detail: str = "") -> str:
    """The error text for a dataset whose files are not where they must be."""
    detail = f" ({detail})" if detail else ""
    return (f"{title} not found under {directory}{detail}.\nExpected layout:\n{layout}\nTo get it: {how_to_get}")
