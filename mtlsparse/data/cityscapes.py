"""Cityscapes (Cordts et al. 2016) in torchvision's layout plus the disparity maps: ``seg`` and ``depth``.

Segmentation uses the official label table (torchvision's ``Cityscapes.classes``):
19 classes = the train ids; 7 classes = the categories flat, construction, object,
nature, sky, human, vehicle. Labels the benchmark ignores in evaluation (and void) are
unlabelled (-1) in both. Depth comes from the disparity PNGs as in the dataset's own
preprocessing: disparity d = (p − 1) / 256 for p > 0, depth = baseline · focal / d
(metres; p = 0 is no measurement → 0), or the disparity itself with
``depth_mode=disparity``. The public test split has no labels, so, as in MTAN and
DiSparse, ``val/`` is the test split and validation is a seeded hold-out of ``train/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets import Cityscapes as TorchvisionCityscapes

from mtlsparse.data.dense import DenseDataModule, Targets, image_tensor, missing_files_message
from mtlsparse.errors import MissingDataError
from mtlsparse.tasks import Task

SPLIT_DIRS = {"train": "train", "test": "val"}
IGNORE = -1
BASELINE_M, FOCAL_PX = 0.209313, 2262.52  # the Cityscapes stereo rig (camera/*.json: extrinsic baseline, fx)
DEPTH_MODES = ("depth", "disparity")
LAYOUT = """  <root>/cityscapes/
    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png     (for seg)
    disparity/{train,val}/<city>/<city>_<seq>_<frame>_disparity.png        (for depth; 16-bit)"""
HOW_TO_GET = ("register at cityscapes-dataset.com and download leftImg8bit_trainvaltest.zip, "
              "gtFine_trainvaltest.zip and disparity_trainvaltest.zip; unzip all three into <root>/cityscapes/")


def label_lookup(num_classes: int) -> Tensor:
    """Map of label id (0..255) → class id for 19 (train ids) or 7 (categories) classes, -1 = unlabelled."""
    lookup = torch.full((256,), IGNORE, dtype=torch.long)
    for c in TorchvisionCityscapes.classes:
        if 0 <= c.id < 256 and not c.ignore_in_eval:
            lookup[c.id] = c.train_id if num_classes == 19 else c.category_id - 1
    return lookup


class Cityscapes(DenseDataModule):
    """Cityscapes ``seg`` (19 or 7 classes) and ``depth`` from ``<root>/<dir_name>``."""

    source_hint = HOW_TO_GET
    native_size = (1024, 2048)

    def __init__(self, root: str = "data", dir_name: str = "cityscapes", seg_classes: int = 19,
                 depth_mode: str = "depth", depth_loss: str = "l1", baseline: float = BASELINE_M,
                 focal: float = FOCAL_PX, **kwargs: Any) -> None:
        if seg_classes not in (19, 7):
            raise ValueError(f"seg_classes must be 19 or 7, got {seg_classes}")
        if depth_mode not in DEPTH_MODES:
            raise ValueError(f"depth_mode must be one of {DEPTH_MODES}, got '{depth_mode}'")
        if baseline <= 0 or focal <= 0:
            raise ValueError(f"baseline and focal must be > 0, got {baseline}, {focal}")
        all_tasks = {"seg": Task("seg", kind="segmentation", num_classes=seg_classes, ignore_index=IGNORE),
                     "depth": Task("depth", kind="depth", loss_type=depth_loss)}
        super().__init__(all_tasks, root=root, **kwargs)
        self.directory = Path(root) / dir_name
        self.depth_mode, self.baseline, self.focal = depth_mode, baseline, focal
        self.lookup = label_lookup(seg_classes)

    def _paths(self, image: Path, split_dir: str) -> dict[str, Path]:
        """The label / disparity files belonging to one leftImg8bit image."""
        prefix = image.name[: -len("_leftImg8bit.png")]
        city = image.parent.name
        return {"seg": self.directory / "gtFine" / split_dir / city / f"{prefix}_gtFine_labelIds.png",
                "depth": self.directory / "disparity" / split_dir / city / f"{prefix}_disparity.png"}

    def list_samples(self, split: str) -> list[Path]:
        split_dir = SPLIT_DIRS[split]
        image_dir = self.directory / "leftImg8bit" / split_dir
        images = sorted(image_dir.glob("*/*_leftImg8bit.png")) if image_dir.is_dir() else []
        if not images:
            raise MissingDataError(missing_files_message("Cityscapes", self.directory, LAYOUT, HOW_TO_GET,
                                                          f"no <city>/*_leftImg8bit.png under {image_dir}"))
        for task in self.tasks:
            missing = [p for p in (self._paths(img, split_dir)[task] for img in images) if not p.is_file()]
            if missing:
                raise MissingDataError(missing_files_message(
                    "Cityscapes", self.directory, LAYOUT, HOW_TO_GET,
                    f"task '{task}': {len(missing)} of {len(images)} files missing, e.g. {missing[0]}"))
        return images

    def read_sample(self, sample: Path) -> tuple[Tensor, Targets]:
        with Image.open(sample) as img:
            image = image_tensor(np.asarray(img.convert("RGB")))
        paths = self._paths(sample, sample.parent.parent.name)
        targets: Targets = {}
        if "seg" in self.tasks:
            with Image.open(paths["seg"]) as img:
                ids = torch.from_numpy(np.asarray(img, dtype=np.int64))
            targets["seg"] = self.lookup[ids]
        if "depth" in self.tasks:
            with Image.open(paths["depth"]) as img:
                raw = np.asarray(img, dtype=np.float32)
            targets["depth"] = torch.from_numpy(self._depth(raw))[None]
        return image, targets

    def _depth(self, raw: np.ndarray) -> np.ndarray:
        """Depth (or disparity) in float32 from the 16-bit disparity PNG values; 0 where unmeasured."""
        disparity = np.where(raw > 0, (raw - 1.0) / 256.0, 0.0).astype(np.float32)
        if self.depth_mode == "disparity":
            return disparity
        with np.errstate(divide="ignore"):
            return np.where(disparity > 0, self.baseline * self.focal / disparity, 0.0).astype(np.float32)
