"""Base LightningDataModule for in-memory multi-task image classification data.

Images stay uint8 in memory; each batch is gathered by one tensor index and
normalised on the fly, so an epoch costs a few hundred tensor ops instead of one
``__getitem__`` + collate per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
)

from mtlsparse.tasks import Task


@dataclass(frozen=True)
class ImageData:
    """A dataset as loaded by a subclass: uint8 images ``[N,C,H,W]``, int64 targets ``[N,T]``.

    ``mean``/``std`` are per channel, on the 0..1 scale (pixel / 255).
    """

    train_images: Tensor
    train_targets: Tensor
    test_images: Tensor
    test_targets: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: a validation split built apart from the training samples (val_from=held_out_items), else None:
    #: the data module holds out val_fraction of the training samples
    val_images: Tensor | None = None
    val_targets: Tensor | None = None


class BatchIndexDataset(Dataset):
    """Map-style dataset indexed by a whole batch of indices at once.

    ``ds[indices]`` returns ``(x, targets)``: ``x`` float32 ``[B,C,H,W]`` normalised,
    ``targets`` a dict task name -> int64 ``[B]`` in task order. With ``shift > 0``
    each image is translated by a random integer offset in ``[-shift, shift]`` per
    axis (zero fill): cheap augmentation for the training split, drawn from
    ``generator`` so runs stay reproducible.
    """

    def __init__(self, images: Tensor, targets: Tensor, task_names: list[str], mean, std,
                 shift: int = 0, generator: torch.Generator | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (len(images), len(task_names)):
            raise ValueError(f"targets must be [N={len(images)}, T={len(task_names)}], got {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.t().contiguous()  # [T, N]: each task's batch labels come out contiguous
        self.task_names = list(task_names)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)  # (x/255 - mean)/std == x*scale - shift
        self._shift = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t
        self.shift = shift  # validated by the data module (augment_shift)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices) -> tuple[Tensor, dict[str, Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[idx]
        if self.shift:
            images = random_translate(images, self.shift, self.generator)
        x = images.float().mul_(self._scale).sub_(self._shift)
        y = self.targets[:, idx]
        return x, {name: y[t] for t, name in enumerate(self.task_names)}


#: where validation samples come from: a hold-out of the training samples, or samples built only
#: from items (images) that no training sample contains (pair datasets; elsewhere the two coincide)
VAL_SOURCES = ("training_items", "held_out_items")


def check_val_from(val_from: str, val_fraction: float) -> str:
    """Validate `dataset.val_from` (one of VAL_SOURCES; held_out_items needs a validation split)."""
    if val_from not in VAL_SOURCES:
        raise ValueError(f"dataset.val_from must be one of {', '.join(VAL_SOURCES)}, got {val_from!r}")
    if val_from == "held_out_items" and val_fraction <= 0:
        raise ValueError("dataset.val_from=held_out_items needs a validation split: set dataset.val_fraction > 0 "
                         "(e.g. 0.1)")
    return val_from


def check_loader_options(batch_size: int, eval_batch_size: int, val_fraction: float,
                         limit_train: int | None, limit_test: int | None) -> None:
    """Reject loader options that cannot work, naming the key (shared by every data module)."""
    if batch_size < 1 or eval_batch_size < 1:
        raise ValueError(f"batch_size and eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for key, value in (("limit_train", limit_train), ("limit_test", limit_test)):
        if value is not None and value < 1:
            raise ValueError(f"{key} must be a positive int or null, got {value}")


def random_translate(images: Tensor, shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image of ``[B,C,H,W]`` by its own random offset in ``[-shift, shift]`` (zero fill)."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift))
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b, 1), generator=generator)
    rows = (torch.arange(h) + dy)[:, None, :, None]  # [B,1,H,1]
    cols = (torch.arange(w) + dx)[:, None, None, :]  # [B,1,1,W]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None], rows, cols]


class MultiTaskDataModule(L.LightningDataModule):
    """Seeded train/val/test loaders over a dataset that fits in memory.

    Subclasses set ``tasks`` and ``input_shape`` in ``__init__`` (models are built
    from them before any data is loaded) and implement :meth:`load`.

    ``val_from``: ``training_items`` (default) holds out ``val_fraction`` of the training
    samples; ``held_out_items`` validates on samples made only of items no training sample
    uses. Datasets whose samples share items (two-item pairs) set ``shares_items`` and build
    that split in :meth:`load` (``ImageData.val_images``); for the others every sample is its
    own item, so the two choices give the same split.
    """

    shares_items: bool = False  # samples are composed from a pool of items that several samples reuse

    source_hint: str = ""  # how to obtain the data: the advice missing-data errors give, for docs and CLIs

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_test: int | None = None,
        augment_shift: int = 0,
        val_from: str = "training_items",
    ) -> None:
        super().__init__()
        check_loader_options(batch_size, eval_batch_size, val_fraction, limit_train, limit_test)
        self.val_from = check_val_from(val_from, val_fraction)
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.limit_train = limit_train
        self.limit_test = limit_test
        if augment_shift < 0:
            raise ValueError(f"augment_shift must be >= 0 pixels, got {augment_shift}")
        self.augment_shift = augment_shift
        self.tasks: dict[str, Task] = {}
        self.input_shape: tuple[int, int, int] = (0, 0, 0)
        self.train_indices: Tensor | None = None  # into the (limited) full training set
        self.val_indices: Tensor | None = None
        self.datasets: dict[str, BatchIndexDataset] = {}
        self._shuffle_generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Tensor]:
        """RNG streams of shuffling and augmentation, saved in checkpoints so a resumed run
        sees the same batches as an uninterrupted one."""
        state = {"shuffle": self._shuffle_generator.get_state()}
        train = self.datasets.get("train")
        if train is not None and train.generator is not None:
            state["augment"] = train.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._shuffle_generator.set_state(state["shuffle"])
        if "augment" in state:
            self.setup("fit")
            self.datasets["train"].generator.set_state(state["augment"])

    def load(self) -> ImageData:
        """Return the full train and test data (building it if needed)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load everything into memory once and make the seeded train/val split."""
        if self.datasets:
            return
        data = self.load()
        generator = torch.Generator().manual_seed(self.seed)
        train_x, train_y = _subsample(data.train_images, data.train_targets, self.limit_train, generator)
        test_x, test_y = _subsample(data.test_images, data.test_targets, self.limit_test, generator)
        for x in (train_x, test_x):
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                shape = tuple(x.shape[1:])
                raise ValueError(f"{type(self).__name__}: images {shape} != input_shape {self.input_shape}")
        names = list(self.tasks)

        def dataset(x: Tensor, y: Tensor, **augment) -> BatchIndexDataset:
            return BatchIndexDataset(x, y, names, data.mean, data.std, **augment)

        augment = {"shift": self.augment_shift, "generator": torch.Generator().manual_seed(self.seed + 1)}
        if data.val_images is not None:  # built from held-out items: every training sample trains
            # limit_train shrinks the held-out validation set in proportion (val : train as when built)
            share = len(data.val_images) / len(data.train_images)
            limit_val = None if self.limit_train is None else max(1, round(len(train_x) * share))
            val_x, val_y = _subsample(data.val_images, data.val_targets, limit_val, generator)
            self.train_indices, self.val_indices = torch.arange(len(train_x)), None
        else:
            perm = torch.randperm(len(train_x), generator=generator)
            n_val = round(len(train_x) * self.val_fraction)
            self.val_indices, self.train_indices = perm[:n_val].sort().values, perm[n_val:].sort().values
            val_x, val_y = train_x[self.val_indices], train_y[self.val_indices]
        self.datasets = {
            "train": dataset(train_x[self.train_indices], train_y[self.train_indices], **augment),
            "val": dataset(val_x, val_y),
            "test": dataset(test_x, test_y),
        }

    @property
    def num_train_samples(self) -> int:
        """Number of training samples after the val hold-out (available after setup)."""
        if not self.datasets:
            raise RuntimeError("num_train_samples is known only after setup()")
        return len(self.datasets["train"])

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if not self.datasets:
            raise RuntimeError(f"{split}_dataloader() called before setup()")
        ds = self.datasets[split]
        sampler = RandomSampler(ds, generator=self._shuffle_generator) if shuffle else SequentialSampler(ds)
        return DataLoader(
            ds,
            sampler=BatchSampler(sampler, batch_size, drop_last=False),
            batch_size=None,  # the dataset returns whole batches
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # the loader draws its workers' base seed from this, not from the global RNG: a resumed
            # run then sees the same global random stream (dropout, DST regrowth) as an uninterrupted one
            generator=self._shuffle_generator if shuffle else torch.Generator().manual_seed(self.seed),
            worker_init_fn=_reseed_worker_augmentation,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)


def _reseed_worker_augmentation(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream (derived from the loader's seed)."""
    info = torch.utils.data.get_worker_info()
    generator = getattr(info.dataset, "generator", None) if info is not None else None
    if generator is not None:
        generator.manual_seed(torch.initial_seed() % 2**63)


def _subsample(images: Tensor, targets: Tensor, limit: int | None, generator: torch.Generator):
    """A seeded random subset of ``limit`` samples (kept in original order), or everything."""
    if limit is None or limit >= len(images):
        return images, targets
    keep = torch.randperm(len(images), generator=generator)[:limit].sort().values
    return images[keep], targets[keep]
