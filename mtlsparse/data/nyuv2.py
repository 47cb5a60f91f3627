"""NYUv2 (Silberman et al. 2012) in the widely used preprocessed .npy layout (MTAN, LibMTL, DiSparse).

Tasks: ``seg`` (13 classes, or 40 with ``seg_classes=40``), ``depth``, ``normal``.
The preprocessed set has two directories, ``train/`` (795 images) and ``val/`` (654):
as in those papers the ``val/`` directory is the **test** split, and our validation
split (checkpoint selection) is a seeded hold-out of ``train/`` (``val_fraction``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlsparse.data.dense import DenseDataModule, Targets, image_tensor, missing_files_message
from mtlsparse.errors import MissingDataError
from mtlsparse.tasks import Task

SPLIT_DIRS = {"train": "train", "test": "val"}  # our split → directory on disk
LABEL_DIRS = {13: "label", 40: "label40"}
IGNORE = -1
LAYOUT = """  <root>/nyuv2/
    train/image/<i>.npy    HxWx3 float in [0,1] (or uint8)   i = 0, 1, 2, ...
    train/label/<i>.npy    HxW 13-class ids 0..12, -1 = unlabelled (label40/ for seg_classes=40: ids 0..39)
    train/depth/<i>.npy    HxW or HxWx1 depth in metres, 0 = no measurement
    train/normal/<i>.npy   HxWx3 unit surface normals (x right, y, z), 0 = no measurement
    val/...                the same four folders: the test split"""
HOW_TO_GET = ("download the preprocessed NYUv2 of MTAN (Liu et al., github.com/lorenmt/mtan: 'nyuv2.zip', "
              "288x384) and unpack it so <root>/nyuv2/{train,val}/{image,label,depth,normal}/ exist; for 40 "
              "classes add label40/ folders with the 40-class ids in the same format")


class NYUv2(DenseDataModule):
    """NYUv2 seg / depth / normal from ``<root>/<dir_name>/{train,val}/{image,label,depth,normal}/<i>.npy``."""

    source_hint = HOW_TO_GET
    native_size = (288, 384)

    def __init__(self, root: str = "data", dir_name: str = "nyuv2", seg_classes: int = 13,
                 label_dir: str | None = None, depth_loss: str = "l1", **kwargs: Any) -> None:
        if seg_classes not in LABEL_DIRS:
            raise ValueError(f"seg_classes must be one of {list(LABEL_DIRS)}, got {seg_classes}")
        all_tasks = {
            "seg": Task("seg", kind="segmentation", num_classes=seg_classes, ignore_index=IGNORE),
            "depth": Task("depth", kind="depth", loss_type=depth_loss),
            "normal": Task("normal", kind="normal"),
        }
        super().__init__(all_tasks, root=root, **kwargs)
        self.directory = Path(root) / dir_name
        self.seg_classes = seg_classes
        self.folders = {"seg": label_dir or LABEL_DIRS[seg_classes], "depth": "depth", "normal": "normal"}

    def list_samples(self, split: str) -> list[tuple[Path, str]]:
        """(split directory, file name) of every image whose target files exist for all chosen tasks."""
        split_dir = self.directory / SPLIT_DIRS[split]
        image_dir = split_dir / "image"
        if not image_dir.is_dir():
            raise MissingDataError(missing_files_message("NYUv2", self.directory, LAYOUT, HOW_TO_GET,
                                                          f"no folder {image_dir}"))
        names = sorted((p.name for p in image_dir.glob("*.npy")), key=_index_order)
        if not names:
            raise MissingDataError(missing_files_message("NYUv2", self.directory, LAYOUT, HOW_TO_GET,
                                                          f"{image_dir} holds no .npy files"))
        for task in self.tasks:
            folder = split_dir / self.folders[task]
            present = {p.name for p in folder.glob("*.npy")} if folder.is_dir() else set()
            missing = [n for n in names if n not in present]
            if missing:
                raise MissingDataError(missing_files_message(
                    "NYUv2", self.directory, LAYOUT, HOW_TO_GET,
                    f"task '{task}' needs {folder}/<i>.npy for every image; {len(missing)} missing, "
                    f"e.g. {missing[:3]}"))
        return [(split_dir, name) for name in names]

    def read_sample(self, sample: tuple[Path, str]) -> tuple[Tensor, Targets]:
        split_dir, name = sample
        image = image_tensor(np.load(split_dir / "image" / name))
        targets: Targets = {}
        if "seg" in self.tasks:
            label = np.load(split_dir / self.folders["seg"] / name)
            targets["seg"] = self._label(label, split_dir / self.folders["seg"] / name)
        if "depth" in self.tasks:
            depth = np.load(split_dir / "depth" / name).astype(np.float32)
            targets["depth"] = torch.from_numpy(depth.reshape(1, *depth.shape[:2]))
        if "normal" in self.tasks:
            normal = np.load(split_dir / "normal" / name).astype(np.float32)
            targets["normal"] = torch.from_numpy(np.ascontiguousarray(normal.transpose(2, 0, 1)))
        return image, targets

    def _label(self, label: np.ndarray, path: Path) -> Tensor:
        """Class ids as int64 `[H,W]`; negative values and 255 are unlabelled (-1)."""
        ids = torch.from_numpy(np.rint(label).astype(np.int64)).reshape(label.shape[:2])
        ids[(ids < 0) | (ids == 255)] = IGNORE
        if int(ids.max()) >= self.seg_classes:
            raise ValueError(f"{path}: label id {int(ids.max())} >= seg_classes={self.seg_classes} "
                             f"(40-class labels need seg_classes=40 and label40/ folders)")
        return ids


def _index_order(name: str) -> tuple[int, str]:
    """Sort '<i>.npy' numerically (2 before 10), other names after, alphabetically."""
    stem = name.rsplit(".", 1)[0]
    return (int(stem), "") if stem.isdigit() else (1 << 62, stem)
