"""Tiny fake datasets written in their real on-disk formats (IDX for MNIST/Fashion-MNIST,
torchvision's pickles for CIFAR-10 and CIFAR-100), shared by the data, model and end-to-end tests."""
from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mtlsparse.data.idx import write_idx
from mtlsparse.data.sources import FILE_NAMES

N_TRAIN, N_TEST = 200, 50


def fake_items(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """28x28 uint8 images with a bright bar at a label-dependent row over low noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=g, dtype=torch.uint8)
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for k, label in enumerate(labels.tolist()):
        images[k, 2 + 2 * label : 4 + 2 * label, 4:24] = 200 + k % 50
    return images, labels


def write_fake_source(directory: Path, seed: int, gz: bool = True) -> dict[str, torch.Tensor]:
    """Write the four MNIST-format files to ``directory``; return what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    train_x, train_y = fake_items(N_TRAIN, seed)
    test_x, test_y = fake_items(N_TEST, seed + 1)
    written = dict(zip(FILE_NAMES, (train_x, train_y, test_x, test_y)))
    for name, tensor in written.items():
        write_idx(directory / f"{name}{suffix}", tensor)
    return written


def _pickle(path: Path, obj: dict, key: Callable[[str], str | bytes]) -> None:
    with open(path, "wb") as f:
        pickle.dump({key(k): v for k, v in obj.items()}, f, protocol=2)


def write_fake_cifar100(root: Path, n_train: int = 200, n_test: int = 100,
                        key: Callable[[str], str | bytes] = str.encode) -> np.ndarray:
    """Random images whose fine labels cycle through 0..99, under a made-up 20×5 superclass mapping.

    Returns the mapping (superclass of each fine label); ``key`` makes bytes (b'data') or str keys.
    """
    rng = np.random.default_rng(0)
    superclass_of_fine = rng.permutation(100) // 5  # not fine // 5: the loader must derive it
    directory = root / "cifar-100-python"
    directory.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        _pickle(directory / name, {
            "filenames": [f"{name}_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": fine.tolist(),
            "coarse_labels": superclass_of_fine[fine].tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }, key)
    _pickle(directory / "meta", {"fine_label_names": [f"fine{f}" for f in range(100)],
                                 "coarse_label_names": [f"super{k}" for k in range(20)]}, key)
    return superclass_of_fine


def write_fake_cifar10(root: Path, n_train: int = 100, n_test: int = 40,
                       key: Callable[[str], str | bytes] = str.encode) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random images and labels as torchvision's ``cifar-10-batches-py`` (train split over 5 batches).

    Returns ``{"train": (data [N,3072], labels [N]), "test": ...}``, train batches concatenated in order.
    """
    rng = np.random.default_rng(1)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    written = {split: (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n))
               for split, n in (("train", n_train), ("test", n_test))}
    train_parts = zip(*(np.array_split(a, 5) for a in written["train"]))
    batches = {f"data_batch_{i}": part for i, part in enumerate(train_parts, start=1)} | {"test_batch": written["test"]}
    for name, (data, labels) in batches.items():
        _pickle(directory / name, {"batch_label": name, "labels": labels.tolist(), "data": data,
                                   "filenames": [f"{name}_{i}.png" for i in range(len(data))]}, key)
    _pickle(directory / "batches.meta", {"label_names": [f"class{c}" for c in range(10)],
                                         "num_cases_per_batch": n_train // 5, "num_vis": 3072}, key)
    return written
