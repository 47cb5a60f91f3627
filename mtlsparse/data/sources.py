"""Locate and load the 28x28 base datasets (Fashion-MNIST, MNIST) from disk.

Each source is searched in a fixed list of directories (torchvision's layout under
the data root first, then plain folders, then system packages); torchvision's
downloader is only used when asked, because most machines here are offline.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mtlsparse.data.idx import read_idx
from mtlsparse.errors import MissingDataError

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES = tuple(name for pair in SPLIT_FILES.values() for name in pair)


@dataclass(frozen=True)
class ImageSet:
    """Images (uint8 ``[N, H, W]``) with their class labels (int64 ``[N]``)."""

    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class Source:
    """Where one MNIST-format dataset may live and how to obtain it."""

    title: str
    root_dirs: tuple[str, ...]  # relative to the data root, in search order
    system_dirs: tuple[str, ...]  # absolute, searched after the data root
    torchvision_class: str
    how_to_get: str

    def search_dirs(self, root: str | Path) -> list[Path]:
        """Directories searched for the four IDX files, in order."""
        return [Path(root) / d for d in self.root_dirs] + [Path(d) for d in self.system_dirs]


SOURCES = {
    "fashion_mnist": Source(
        title="Fashion-MNIST",
        root_dirs=("FashionMNIST/raw", "fashion-mnist"),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        torchvision_class="FashionMNIST",
        how_to_get=(
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the files in "
            "<root>/FashionMNIST/raw/, or set dataset.download=true on a machine that is online"
        ),
    ),
    "mnist": Source(
        title="MNIST",
        root_dirs=("MNIST/raw", "mnist"),
        system_dirs=(),
        torchvision_class="MNIST",
        how_to_get=(
            "put the files in <root>/MNIST/raw/, or set dataset.download=true on a machine "
            "that is online"
        ),
    ),
}


def _find(directory: Path, name: str) -> Path | None:
    """The raw or gzipped file ``name`` in ``directory``, preferring the faster raw one."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate(source: Source, root: str | Path) -> dict[str, Path] | None:
    """Paths of the four files from the first directory holding all of them."""
    for directory in source.search_dirs(root):
        found = {name: _find(directory, name) for name in FILE_NAMES}
        if all(found.values()):
            return found
    return None


def _download(source: Source, root: str | Path) -> None:
    import torchvision

    dataset_class = getattr(torchvision.datasets, source.torchvision_class)
    try:
        dataset_class(root=str(root), train=True, download=True)
    except Exception as err:
        raise RuntimeError(
            f"downloading {source.title} into {root} failed ({err}); to get it: {source.how_to_get}"
        ) from err


def _missing_message(source: Source, root: str | Path) -> str:
    searched = "\n".join(f"  {d}" for d in source.search_dirs(root))
    files = ", ".join(FILE_NAMES)
    return (
        f"{source.title} not found. Searched (raw or .gz files):\n{searched}\n"
        f"Expected files: {files}.\nTo get them: {source.how_to_get}."
    )


def _read_split(images_path: Path, labels_path: Path) -> ImageSet:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{images_path} (shape {tuple(images.shape)}) and {labels_path} "
            f"(shape {tuple(labels.shape)}) are not a matching [N,H,W] images / [N] labels pair"
        )
    return ImageSet(images=images, labels=labels.to(torch.int64))


def load_source(name: str, root: str | Path, download: bool = False) -> dict[str, ImageSet]:
    """Load ``{"train": ImageSet, "test": ImageSet}`` of the source ``name`` (a key of SOURCES)."""
    source = SOURCES[name]
    paths = _locate(source, root)
    if paths is None and download:
        _download(source, root)
        paths = _locate(source, root)
    if paths is None:
        raise MissingDataError(_missing_message(source, root))
    return {split: _read_split(paths[img], paths[lbl]) for split, (img, lbl) in SPLIT_FILES.items()}


def locate_pickled(root: str | Path, dir_name: str, files: Sequence[str], title: str, torchvision_class: str,
                   how_to_get: str, download: bool = False) -> Path:
    """`<root>/<dir_name>` holding `files` (torchvision's python-pickle layout), downloading if asked.

    Used by the CIFAR datasets; a missing file is a FileNotFoundError naming the
    directory, the missing files and how to get them.
    """
    directory = Path(root) / dir_name
    if download and not all((directory / name).is_file() for name in files):
        import torchvision

        try:
            getattr(torchvision.datasets, torchvision_class)(root=str(root), train=True, download=True)
        except Exception as err:
            raise RuntimeError(f"downloading {title} into {root} failed ({err}); to get it: {how_to_get}") from err
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise MissingDataError(
            f"{title} not found: {directory} lacks {missing} (torchvision's python format: "
            f"{dir_name}/{{{','.join(files)}}}).\nTo get it: {how_to_get}.")
    return directory
