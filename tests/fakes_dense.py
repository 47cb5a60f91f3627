"""Tiny fake NYUv2, CelebAMask-HQ and Cityscapes written in their real on-disk formats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mtlsparse.data.celeba_mask import PARTS

CELEBA_ATTRIBUTES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
                     "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
                     "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
                     "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
                     "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie "
                     "Young").split()


def write_fake_nyuv2(root: Path, n_train: int = 8, n_test: int = 4, size: tuple[int, int] = (32, 32),
                     label40: bool = False, seed: int = 0) -> Path:
    """`<root>/nyuv2/{train,val}/{image,label,depth,normal}/<i>.npy` as MTAN's preprocessed set (float arrays)."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in (("train", n_train), ("val", n_test)):
        for i in range(n):
            image = rng.random((h, w, 3), dtype=np.float32)
            label = rng.integers(-1, 13, (h, w)).astype(np.float32)  # MTAN stores labels as floats, -1 = unlabelled
            depth = (rng.random((h, w, 1), dtype=np.float32) * 5).astype(np.float32)
            depth[0, :4] = 0  # no measurement
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[-1, :4] = 0
            arrays = {"image": image, "label": label, "depth": depth, "normal": normal}
            if label40:
                arrays["label40"] = rng.integers(-1, 40, (h, w)).astype(np.float32)
            for folder, array in arrays.items():
                (root / "nyuv2" / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / "nyuv2" / split / folder / f"{i}.npy", array)
    return root / "nyuv2"


def write_fake_celeba(root: Path, n: int = 10, image_size: int = 32, mask_size: int = 16, seed: int = 0) -> Path:
    """`<root>/CelebAMask-HQ/` with JPEG images, per-part PNG masks and the attribute file.

    Image i has skin on its left half, hair on the top rows, and (for odd i) a hat over the
    first hair row; attributes: Male = i % 2, Smiling = 1 for i % 3 == 0.
    """
    rng = np.random.default_rng(seed)
    base = root / "CelebAMask-HQ"
    (base / "CelebA-HQ-img").mkdir(parents=True)
    rows = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    for i in range(n):
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "CelebA-HQ-img" / f"{i}.jpg", quality=95)
        folder = base / "CelebAMask-HQ-mask-anno" / str(i // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        masks = {"skin": np.zeros((mask_size, mask_size), bool), "hair": np.zeros((mask_size, mask_size), bool)}
        masks["skin"][:, : mask_size // 2] = True
        masks["hair"][:2] = True
        if i % 2:
            masks["hat"] = np.zeros((mask_size, mask_size), bool)
            masks["hat"][0] = True
        for part, on in masks.items():
            assert part in PARTS
            Image.fromarray(np.where(on, 255, 0).astype(np.uint8)).save(folder / f"{i:05d}_{part}.png")
        values = ["-1"] * len(CELEBA_ATTRIBUTES)
        values[CELEBA_ATTRIBUTES.index("Male")] = "1" if i % 2 else "-1"
        values[CELEBA_ATTRIBUTES.index("Smiling")] = "1" if i % 3 == 0 else "-1"
        rows.append(f"{i}.jpg  " + " ".join(values))  # the real file separates name and values by two spaces
    (base / "CelebAMask-HQ-attribute-anno.txt").write_text("\n".join(rows) + "\n")
    return base


def write_fake_cityscapes(root: Path, per_split: dict[str, int] | None = None, size: tuple[int, int] = (16, 32),
                          seed: int = 0) -> Path:
    """`<root>/cityscapes/{leftImg8bit,gtFine,disparity}/{train,val}/<city>/...` PNGs (disparity 16-bit).

    Label ids cycle through 0..33 row-major; disparity PNG values cycle through 0..999 (0 = no measurement).
    """
    rng = np.random.default_rng(seed)
    per_split = per_split or {"train": 6, "val": 3}
    h, w = size
    base = root / "cityscapes"
    for split, n in per_split.items():
        for i in range(n):
            city = "aachen" if i % 2 == 0 else "bremen"
            prefix = f"{city}_{i:06d}_000019"
            for kind in ("leftImg8bit", "gtFine", "disparity"):
                (base / kind / split / city).mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(base / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png")
            label_ids = (np.arange(h * w) % 34).reshape(h, w).astype(np.uint8)
            Image.fromarray(label_ids).save(base / "gtFine" / split / city / f"{prefix}_gtFine_labelIds.png")
            disparity = (np.arange(h * w) % 1000).reshape(h, w).astype(np.uint16)
            Image.fromarray(disparity).save(base / "disparity" / split / city / f"{prefix}_disparity.png")
    return base


def write_fake_dense_datasets(root: Path) -> Path:
    """All three dense datasets (NYUv2 with its 40-class labels, CelebAMask-HQ, Cityscapes) under `root`."""
    write_fake_nyuv2(root, label40=True)
    write_fake_celeba(root)
    write_fake_cityscapes(root)
    return root
