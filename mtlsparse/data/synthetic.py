"""Synthetic: procedural multi-task images for fast tests, deterministic from the seed.

Each task owns ``num_classes`` Gaussian-blob templates at random positions; an
image is the sum of the templates its labels select, plus noise. Labels are
therefore independent across tasks and linearly decodable, so a tiny model gets
well above chance within a few epochs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlsparse.data.base import ImageData, MultiTaskDataModule
from mtlsparse.data.pairs import channel_stats
from mtlsparse.tasks import Task

BLOB_PEAK = 160.0
NOISE_STD = 20.0


class Synthetic(MultiTaskDataModule):
    """``num_tasks`` classification tasks ``t0, t1, ...`` with ``num_classes`` classes each."""

    source_hint = "generated in memory; nothing to download"

    def __init__(
        self,
        root: str = "data",
        num_tasks: int = 2,
        num_classes: int = 4,
        image_size: int = 16,
        channels: int = 1,
        train_samples: int = 512,
        test_samples: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if min(num_tasks, channels, train_samples, test_samples) < 1 or num_classes < 2 or image_size < 4:
            raise ValueError(
                "need num_tasks, channels, train_samples, test_samples >= 1, num_classes >= 2, image_size >= 4"
            )
        self.num_tasks, self.num_classes = num_tasks, num_classes
        self.image_size, self.channels = image_size, channels
        self.train_samples, self.test_samples = train_samples, test_samples
        self.tasks = {f"t{t}": Task(f"t{t}", num_classes=num_classes) for t in range(num_tasks)}
        self.input_shape = (channels, image_size, image_size)

    def _templates(self, generator: torch.Generator) -> Tensor:
        """Blob templates ``[T, K, C, S, S]``: one random centre and channel weighting per (task, class)."""
        size, sigma = self.image_size, self.image_size / 8
        centres = torch.rand(self.num_tasks, self.num_classes, 2, generator=generator) * (size - 4) + 2
        grid = torch.arange(size, dtype=torch.float32)
        dy = (grid.view(1, 1, size) - centres[..., 0, None]).square()  # [T,K,S]
        dx = (grid.view(1, 1, size) - centres[..., 1, None]).square()
        blobs = torch.exp(-(dy[..., :, None] + dx[..., None, :]) / (2 * sigma**2))  # [T,K,S,S]
        weights = 0.5 + 0.5 * torch.rand(self.num_tasks, self.num_classes, self.channels, generator=generator)
        return BLOB_PEAK * weights[..., None, None] * blobs[:, :, None]

    def _sample(self, templates: Tensor, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.randint(self.num_classes, (count, self.num_tasks), generator=generator)
        images = templates[torch.arange(self.num_tasks), labels].sum(dim=1)  # [N,C,S,S]
        images += NOISE_STD * torch.randn(images.shape, generator=generator)
        return images.round_().clamp_(0, 255).to(torch.uint8), labels

    def load(self) -> ImageData:
        generator = torch.Generator().manual_seed(self.seed)
        templates = self._templates(generator)
        train_x, train_y = self._sample(templates, self.train_samples, generator)
        test_x, test_y = self._sample(templates, self.test_samples, generator)
        mean, std = channel_stats(train_x)
        return ImageData(train_x, train_y, test_x, test_y, mean, std)
