"""What every split offers, and the two kinds there are: held in memory, or read from folders.

A split is a named set of images with integer labels. Images are float tensors in [0, 1] of shape
(N, 3, H, W); normalisation belongs to the model, so that a served soup takes plain pixels. Code
that reads a split uses only the `Split` protocol and never needs to know which kind it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class LoaderOptions:
    """How batches reach the model: worker processes and pinned memory (the GPU path)."""

    workers: int = 0
    pin_memory: bool = False


@runtime_checkable
class Split(Protocol):
    """What every split offers, whether its images are in memory or on disk."""

    # read-only properties, so that frozen dataclasses satisfy the protocol
    @property
    def name(self) -> str:
        """The split's name: the key its results are reported under."""
        ...

    @property
    def labels(self) -> torch.Tensor:
        """(N,) int64, every label up front so accuracy needs no pass over the images."""
        ...

    @property
    def project(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Maps model logits onto the split's own classes; None when they are the model's."""
        ...

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, order: torch.Tensor | None = None,
                augment: Callable | None = None, opts: LoaderOptions = LoaderOptions()
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches in `order` (default: as stored), augmented image by image."""
        ...

    def tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `limit` images and labels as tensors (all of them by default)."""
        ...


@dataclass(frozen=True)
class TensorSplit:
    """A named set of images and integer labels, held in memory (the tiny world)."""

    name: str
    images: torch.Tensor  # (N, 3, H, W) float in [0, 1]
    labels: torch.Tensor  # (N,) int64
    project: Callable[[torch.Tensor], torch.Tensor] | None = None  # model logits -> split's classes

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: torch.Tensor | None = None,
                augment: Callable | None = None, opts: LoaderOptions = LoaderOptions()
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches in `order` (default: as stored), augmented image by image."""
        order = torch.arange(len(self)) if order is None else order
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x = self.images[idx]
            yield (x if augment is None else torch.stack([augment(img) for img in x])), self.labels[idx]

    def tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `limit` images and labels as tensors (all of them by default)."""
        return self.images[:limit], self.labels[:limit]


class _Augmented(torch.utils.data.Dataset):
    """A data set whose images pass through `augment` (in the loader's worker processes)."""

    def __init__(self, dataset, augment: Callable | None):
        self.dataset, self.augment = dataset, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return (x if self.augment is None else self.augment(x)), y


@dataclass(frozen=True)
class FolderSplit:
    """A split read from image files on demand (ImageNet and its shifts).

    `dataset[i]` is ``(float image in [0, 1] of shape (3, H, W), label)``; `labels` holds every
    label up front (known from the folder listing) so accuracy needs no second pass.
    """

    name: str
    dataset: torch.utils.data.Dataset
    labels: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: torch.Tensor | None = None,
                augment: Callable | None = None, opts: LoaderOptions = LoaderOptions()
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches through a DataLoader: `order` as its sampler, augmentation in the workers."""
        ds = _Augmented(self.dataset, augment)
        sampler = None if order is None else order.tolist()
        yield from torch.utils.data.DataLoader(
            ds, batch_size=batch_size, sampler=sampler, num_workers=opts.workers,
            pin_memory=opts.pin_memory, persistent_workers=False)

    def tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `limit` images and labels, read into memory."""
        n = len(self) if limit is None else min(limit, len(self))
        xs = [self.dataset[i][0] for i in range(n)]
        return torch.stack(xs), self.labels[:n]


@dataclass(frozen=True)
class TaskData:
    """Everything one fine-tuning run sees: training, selection, reporting and shift splits."""

    classnames: tuple[str, ...]
    train: Split
    heldout: Split
    test: Split
    shifts: dict[str, Split]

    def reporting(self) -> dict[str, Split]:
        """The splits results are reported on: test, then each shift."""
        return {"test": self.test, **self.shifts}
