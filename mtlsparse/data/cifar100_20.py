"""CIFAR-100 as 20 tasks (Guo et al.; docs/methods/minmax.md): one 5-way task per coarse superclass.

Task ``c<k>`` classifies the fine label of images of superclass k among that
superclass's 5 fine labels (in increasing fine-label order). Every image belongs to
exactly one superclass, so each task sees only its own superclass's images: the other
19 targets of an image are ``IGNORE_INDEX`` (−100), which the task loss and accuracy skip.
The fine → (superclass, index) mapping is derived from the data's label pairs.

Reads torchvision's on-disk format ``<root>/cifar-100-python/{train,test,meta}``; the
pickles load in about a second, so no tensor cache is built.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlsparse.data.base import ImageData, MultiTaskDataModule
from mtlsparse.data.pairs import channel_stats
from mtlsparse.data.sources import locate_pickled
from mtlsparse.tasks import Task

DIR_NAME = "cifar-100-python"
FILES = ("train", "test", "meta")
NUM_SUPERCLASSES = 20
CLASSES_PER_SUPERCLASS = 5
IMAGE_SHAPE = (3, 32, 32)
IGNORE_INDEX = -100
HOW_TO_GET = (
    "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into the data root "
    "(data_root=... or $MTLSPARSE_DATA), or set dataset.download=true on a machine that is online"
)


@dataclass(frozen=True)
class Cifar100Split:
    """One split: uint8 images ``[N,3,32,32]`` with int64 fine and coarse labels ``[N]``."""

    images: Tensor
    fine: Tensor
    coarse: Tensor


@dataclass(frozen=True)
class SuperclassMapping:
    """Per fine label: its superclass and its index among that superclass's fine labels."""

    superclass: Tensor  # int64 [100]
    index: Tensor  # int64 [100], in 0..4


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the originals are Python 2 pickles)."""
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="latin1")
    return {_text(key): value for key, value in obj.items()}


def read_split(path: Path) -> Cifar100Split:
    """Images and labels of the ``train`` or ``test`` pickle."""
    raw = read_pickle(path)
    data = np.asarray(raw["data"])
    fine = torch.as_tensor(raw["fine_labels"], dtype=torch.int64)
    coarse = torch.as_tensor(raw["coarse_labels"], dtype=torch.int64)
    row = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row or not len(data) == len(fine) == len(coarse):
        raise ValueError(f"{path}: expected uint8 data [N, {row}] with N fine and coarse labels, got data "
                         f"{data.dtype} {data.shape}, {len(fine)} fine and {len(coarse)} coarse labels")
    images = torch.from_numpy(data.copy()).view(-1, *IMAGE_SHAPE)  # rows are channel-major: R, G, B planes
    return Cifar100Split(images=images, fine=fine, coarse=coarse)


def read_label_names(path: Path) -> tuple[list[str], list[str]]:
    """(fine label names, coarse label names) from the ``meta`` pickle."""
    raw = read_pickle(path)
    return [_text(n) for n in raw["fine_label_names"]], [_text(n) for n in raw["coarse_label_names"]]


def locate(root: str | Path, download: bool = False) -> Path:
    """The ``cifar-100-python`` directory under ``root`` holding train/test/meta (downloading if asked)."""
    return locate_pickled(root, DIR_NAME, FILES, "CIFAR-100", "CIFAR100", HOW_TO_GET, download)


def superclass_mapping(fine: Tensor, coarse: Tensor) -> SuperclassMapping:
    """Derive fine → (superclass, index within superclass) from paired labels.

    Raises if a fine label occurs under two superclasses or a superclass does not own
    exactly 5 fine labels.
    """
    num_fine = NUM_SUPERCLASSES * CLASSES_PER_SUPERCLASS
    pairs = torch.unique(torch.stack([fine, coarse], dim=1), dim=0)  # sorted by fine, then coarse
    if (pairs[:, 0].unique(return_counts=True)[1] > 1).any():
        raise ValueError("inconsistent CIFAR-100 labels: some fine label occurs under two coarse labels")
    if pairs[:, 0].tolist() != list(range(num_fine)):
        raise ValueError(f"expected each fine label 0..{num_fine - 1} to occur, found {len(pairs)} distinct ones "
                         f"in [{int(pairs[0, 0])}, {int(pairs[-1, 0])}]")
    superclass = pairs[:, 1]
    sizes = torch.bincount(superclass, minlength=NUM_SUPERCLASSES)
    if len(sizes) != NUM_SUPERCLASSES or (sizes != CLASSES_PER_SUPERCLASS).any():
        raise ValueError(f"expected {NUM_SUPERCLASSES} coarse labels with {CLASSES_PER_SUPERCLASS} fine labels each, "
                         f"got sizes {sizes.tolist()}")
    # fine labels are in increasing order, so a fine label's index is the number of earlier ones in its superclass
    same = superclass[:, None] == superclass[None, :]
    index = torch.tril(same, diagonal=-1).sum(dim=1)
    return SuperclassMapping(superclass=superclass, index=index)


def superclass_targets(fine: Tensor, mapping: SuperclassMapping) -> Tensor:
    """int64 ``[N, 20]``: column k is the within-superclass index for images of superclass k, else −100."""
    targets = torch.full((len(fine), NUM_SUPERCLASSES), IGNORE_INDEX, dtype=torch.int64)
    targets[torch.arange(len(fine)), mapping.superclass[fine]] = mapping.index[fine]
    return targets


def task_name(superclass: int) -> str:
    """Name of the task of coarse label ``superclass``."""
    return f"c{superclass}"


class Cifar100Superclasses(MultiTaskDataModule):
    """20 tasks ``c0..c19`` (coarse label k → task ``c<k>``), 5 classes each, −100 outside the superclass.

    After setup, ``superclass_names`` maps each task to its superclass name and
    ``class_names`` to its 5 fine-label names in output order.
    """

    source_hint = f"CIFAR-100 (python version): {HOW_TO_GET}"

    def __init__(self, root: str = "data", download: bool = False, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.download = download
        self.tasks = {
            task_name(k): Task(task_name(k), num_classes=CLASSES_PER_SUPERCLASS, ignore_index=IGNORE_INDEX)
            for k in range(NUM_SUPERCLASSES)
        }
        self.input_shape = IMAGE_SHAPE
        self.superclass_names: dict[str, str] = {}
        self.class_names: dict[str, list[str]] = {}

    def prepare_data(self) -> None:
        """Download once (rank 0 only under DDP) when asked."""
        if self.download:
            locate(self.root, download=True)

    def load(self) -> ImageData:
        directory = locate(self.root, self.download)
        train, test = read_split(directory / "train"), read_split(directory / "test")
        mapping = superclass_mapping(torch.cat([train.fine, test.fine]), torch.cat([train.coarse, test.coarse]))
        self._set_names(directory / "meta", mapping)
        mean, std = channel_stats(train.images)
        return ImageData(train.images, superclass_targets(train.fine, mapping),
                         test.images, superclass_targets(test.fine, mapping), mean, std)

    def _set_names(self, meta: Path, mapping: SuperclassMapping) -> None:
        fine_names, coarse_names = read_label_names(meta)
        for k in range(NUM_SUPERCLASSES):
            members = (mapping.superclass == k).nonzero().flatten().tolist()  # increasing = output order
            self.superclass_names[task_name(k)] = coarse_names[k]
            self.class_names[task_name(k)] = [fine_names[f] for f in members]
