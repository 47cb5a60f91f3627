"""CelebAMask-HQ (Lee et al., CVPR 2020) as in Upadhyay et al. (seed 003): face-part segmentation
into background / hair / skin, plus the binary attributes Male and Smiling.

The 3-class mask is painted from the per-part masks in the dataset's own part order
(later parts on top, as its colour-mask script does): parts in ``skin_parts`` are skin,
parts in ``hair_parts`` hair, every other part (eyeglasses, hat, earrings, necklace,
cloth) background. All images are split at random (seeded) 60/20/20 into train/val/test.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mtlsparse.data.dense import DenseDataModule, Targets, image_tensor, missing_files_message, split_fractions
from mtlsparse.errors import MissingDataError
from mtlsparse.tasks import Task

#: the dataset's part names in painting order (CelebAMask-HQ's g_mask.py)
PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip",
         "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
SKIN_PARTS = ("skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip", "l_lip",
              "neck")
HAIR_PARTS = ("hair",)
BACKGROUND, HAIR, SKIN = 0, 1, 2
IMAGES_PER_MASK_FOLDER = 2000  # masks of image i live in CelebAMask-HQ-mask-anno/<i // 2000>/
ATTRIBUTES = {"male": "Male", "smile": "Smiling"}
LAYOUT = """  <root>/CelebAMask-HQ/
    CelebA-HQ-img/<i>.jpg                          i = 0 .. 29999 (1024x1024 RGB)
    CelebAMask-HQ-mask-anno/<i // 2000>/<i:05d>_<part>.png   512x512 part masks (white = part), e.g. 0/00000_hair.png
    CelebAMask-HQ-attribute-anno.txt               line 1: count; line 2: the 40 attribute names;
                                                   then '<i>.jpg' and 40 values in {-1, 1} per line"""
HOW_TO_GET = ("request CelebAMask-HQ from its authors (github.com/switchablenorms/CelebAMask-HQ) and unpack "
              "CelebAMask-HQ.zip into <root>/ so the three entries above exist")


class CelebAMaskHQ(DenseDataModule):
    """Tasks ``seg`` (3 classes: background/hair/skin), ``male``, ``smile`` (binary)."""

    source_hint = HOW_TO_GET
    native_size = (1024, 1024)

    def __init__(self, root: str = "data", dir_name: str = "CelebAMask-HQ",
                 split: Sequence[float] = (0.6, 0.2, 0.2), skin_parts: Sequence[str] = SKIN_PARTS,
                 hair_parts: Sequence[str] = HAIR_PARTS, **kwargs: Any) -> None:
        all_tasks = {"seg": Task("seg", kind="segmentation", num_classes=3),
                     "male": Task("male", kind="binary"), "smile": Task("smile", kind="binary")}
        super().__init__(all_tasks, root=root, **kwargs)
        split = tuple(float(f) for f in split)
        if len(split) != 3 or any(f <= 0 for f in split) or abs(sum(split) - 1) > 1e-6:
            raise ValueError(f"split must be three positive fractions [train, val, test] summing to 1, got {split}")
        unknown = sorted((set(skin_parts) | set(hair_parts)) - set(PARTS))
        if unknown or set(skin_parts) & set(hair_parts):
            raise ValueError(f"skin_parts and hair_parts must be disjoint lists of parts from {list(PARTS)}; "
                             f"unknown: {unknown}")
        self.split = split
        self.part_class = {part: SKIN if part in skin_parts else HAIR if part in hair_parts else BACKGROUND
                           for part in PARTS}
        self.directory = Path(root) / dir_name
        self.attributes: dict[int, dict[str, int]] = {}

    # the dataset has one pool of images; split_samples makes all three splits from it
    def list_samples(self, split: str) -> list[int]:
        image_dir = self.directory / "CelebA-HQ-img"
        if not image_dir.is_dir():
            raise MissingDataError(missing_files_message("CelebAMask-HQ", self.directory, LAYOUT, HOW_TO_GET,
                                                          f"no folder {image_dir}"))
        ids = sorted(int(p.stem) for p in image_dir.glob("*.jpg") if p.stem.isdigit())
        if not ids:
            raise MissingDataError(missing_files_message("CelebAMask-HQ", self.directory, LAYOUT, HOW_TO_GET,
                                                          f"{image_dir} holds no <i>.jpg files"))
        if any(t in ATTRIBUTES for t in self.tasks):
            self.attributes = self._read_attributes()
            missing = [i for i in ids if i not in self.attributes]
            if missing:
                raise ValueError(f"CelebAMask-HQ: no attributes for {len(missing)} images, e.g. {missing[:3]}")
        if "seg" in self.tasks:
            folder = self.directory / "CelebAMask-HQ-mask-anno"
            if not folder.is_dir():
                raise MissingDataError(missing_files_message("CelebAMask-HQ", self.directory, LAYOUT, HOW_TO_GET,
                                                              f"no folder {folder}"))
        return ids

    def split_samples(self) -> dict[str, list[int]]:
        """Seeded 60/20/20 split of all images; limit_train caps train (and val at the same ratio), limit_test test."""
        generator = torch.Generator().manual_seed(self.seed)
        train, val, test = split_fractions(self.list_samples("train"), self.split, generator)
        if self.limit_train is not None:
            val_limit = max(1, round(self.limit_train * self.split[1] / self.split[0]))
            train, val = train[:self.limit_train], val[:val_limit]
        if self.limit_test is not None:
            test = test[:self.limit_test]
        return {"train": train, "val": val, "test": test}

    def _read_attributes(self) -> dict[int, dict[str, int]]:
        """{image id: {task: 0/1}} for the chosen attribute tasks, from the annotation file."""
        path = self.directory / "CelebAMask-HQ-attribute-anno.txt"
        if not path.is_file():
            raise MissingDataError(missing_files_message("CelebAMask-HQ", self.directory, LAYOUT, HOW_TO_GET,
                                                          f"no file {path}"))
        lines = path.read_text().splitlines()
        header = lines[1].split()
        wanted = {task: attr for task, attr in ATTRIBUTES.items() if task in self.tasks}
        missing = [attr for attr in wanted.values() if attr not in header]
        if missing:
            raise ValueError(f"{path}: attributes {missing} not in the header line {header[:5]}...")
        columns = {task: header.index(attr) for task, attr in wanted.items()}
        out = {}
        for line in lines[2:]:
            fields = line.split()
            if not fields:
                continue
            values = fields[1:]
            out[int(Path(fields[0]).stem)] = {task: int(values[c] == "1") for task, c in columns.items()}
        return out

    def read_sample(self, sample: int) -> tuple[Tensor, Targets]:
        with Image.open(self.directory / "CelebA-HQ-img" / f"{sample}.jpg") as img:
            image = image_tensor(np.asarray(img.convert("RGB")))
        targets: Targets = {}
        if "seg" in self.tasks:
            targets["seg"] = self._mask(sample)
        for task in ATTRIBUTES:
            if task in self.tasks:
                targets[task] = torch.tensor(float(self.attributes[sample][task]))
        return image, targets

    def _mask(self, sample: int) -> Tensor:
        """Background/hair/skin ids `[H,W]` painted from the part masks that exist for this image."""
        folder = self.directory / "CelebAMask-HQ-mask-anno" / str(sample // IMAGES_PER_MASK_FOLDER)
        mask: np.ndarray | None = None
        for part in PARTS:
            path = folder / f"{sample:05d}_{part}.png"
            if not path.is_file():
                continue  # an image has only the parts it shows
            with Image.open(path) as img:
                on = np.asarray(img.convert("L")) > 127
            if mask is None:
                mask = np.zeros(on.shape, dtype=np.int64)
            mask[on] = self.part_class[part]
        if mask is None:
            raise MissingDataError(f"CelebAMask-HQ: no part masks {folder}/{sample:05d}_<part>.png for image {sample}")
        return torch.from_numpy(mask)
