"""What every split offers, and the two kinds there are: held in memory, or read from folders.

A split is a named set of images with integer labels, of shape (N, 3, H, W): float in [0, 1] in
memory, uint8 as read from folders (a quarter of the bytes through the loader; `Accel.to_device`
makes them floats on the device), and float from `tensors` whatever the kind. Normalisation belongs
to the model, so that a served soup takes plain pixels. Code that reads a split uses only the
`Split` protocol and never needs to know which kind it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

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
                augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None, opts: LoaderOptions = LoaderOptions(),
                sizes: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches in `order` (default: as stored), augmented image by image:
        ``augment(image, index)`` gets each image with its index in the split, so that a seeded
        augmentation depends on the image and not on which worker or batch it lands in.
        `sizes`, when given, are the batches' sizes in turn (summing to the length of `order`),
        instead of `batch_size` each."""
        ...

    def tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `limit` images and labels as tensors (all of them by default)."""
        ...


def _slices(n: int, batch_size: int, sizes: Sequence[int] | None) -> list[tuple[int, int]]:
    """(start, length) of each batch over `n` items: `sizes` in turn, else `batch_size` each."""
    if sizes is None:
        return [(i, min(batch_size, n - i)) for i in range(0, n, batch_size)]
    if sum(sizes) != n or any(k <= 0 for k in sizes):
        raise ValueError(f"batch sizes must be positive and sum to {n} (got {len(sizes)} summing to {sum(sizes)})")
    starts = [0]
    for k in sizes[:-1]:
        starts.append(starts[-1] + k)
    return list(zip(starts, sizes))


class _Counted:
    """A split's length: how many labelled examples it holds (both kinds of split)."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TensorSplit(_Counted):
    """A named set of images and integer labels, held in memory (the tiny world)."""

    name: str
    images: torch.Tensor  # (N, 3, H, W) float in [0, 1], or uint8 0..255 (`resident`: as files give them)
    labels: torch.Tensor  # (N,) int64
    project: Callable[[torch.Tensor], torch.Tensor] | None = None  # model logits -> split's classes

    def batches(self, batch_size: int, order: torch.Tensor | None = None,
                augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None, opts: LoaderOptions = LoaderOptions(),
                sizes: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches in `order` (default: as stored), augmented image by image."""
        order = torch.arange(len(self)) if order is None else order
        for i, n in _slices(len(order), batch_size, sizes):
            idx = order[i:i + n]
            x = self.images[idx]
            if augment is not None:
                x = torch.stack([augment(img, int(k)) for img, k in zip(x, idx)])
            yield x, self.labels[idx]

    def tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `limit` images and labels as tensors (all of them by default)."""
        return to_float_images(self.images[:limit]), self.labels[:limit]


def to_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) as float32 in [0, 1]; float images unchanged.

    The one definition of that conversion, shared by `FolderSplit.tensors` and `Accel.to_device`
    (which applies it after the move, so only uint8 bytes cross to the device).
    """
    return x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x


class _Augmented(torch.utils.data.Dataset):
    """A data set whose images pass through `augment` (in the loader's worker processes).

    For a `FolderSplit` the image `augment` gets is uint8 (3, H, W), as its data set yields it:
    augmenting before the float conversion keeps the workers' output a quarter of the size.
    """

    def __init__(self, dataset, augment: Callable | None):
        self.dataset, self.augment = dataset, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return (x if self.augment is None else self.augment(x, i)), y


@dataclass(frozen=True)
class FolderSplit(_Counted):
    """A split read from image files on demand (ImageNet and its shifts).

    `dataset[i]` is ``(uint8 image of shape (3, H, W), label)`` and `batches` yields uint8 image
    batches: the float conversion happens on the device (`Accel.to_device`), so the loader moves a
    quarter of the bytes. `tensors` returns float in [0, 1] like every split's. `labels` holds
    every label up front (known from the folder listing) so accuracy needs no second pass.
    """

    name: str
    dataset: torch.utils.data.Dataset
    labels: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor] | None = None

    def batches(self, batch_size: int, order: torch.Tensor | None = None,
                augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None, opts: LoaderOptions = LoaderOptions(),
                sizes: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 batches through one DataLoader (pinned when `opts.pin_memory`): `order` and
        `sizes` as its batch sampler, augmentation in the workers; consumers convert with
        `Accel.to_device`."""
        ds = _Augmented(self.dataset, augment)
        order = list(range(len(self))) if order is None else order.tolist()
        batches = [order[i:i + n] for i, n in _slices(len(order), batch_size, sizes)]
        yield from torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=opts.workers,
            pin_memory=opts.pin_memory, persistent_workers=False)

    def tensors(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `limit` images (float in [0, 1], as from every split) and labels, in memory."""
        n = len(self) if limit is None else min(limit, len(self))
        xs = [self.dataset[i][0] for i in range(n)]
        return to_float_images(torch.stack(xs)), self.labels[:n]


@dataclass(frozen=True)
class SubsetProjection:
    """Keep the logit columns of a class subset (a shift of fewer classes than the model's:
    ImageNet-R, ImageNet-A, a user's shift folder), in the subset's order."""

    index: tuple[int, ...]  # model class index of each of the split's classes
    n_model_classes: int

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        check_width(logits, self.n_model_classes)
        return logits[:, torch.tensor(self.index, device=logits.device)]


def check_width(logits: torch.Tensor, n: int) -> None:
    """Refuse logits that are not (batch, `n`): a projection made for another class count."""
    if logits.ndim != 2 or logits.shape[1] != n:
        raise ValueError(f"expected logits of shape (batch, {n}), got {tuple(logits.shape)}")


@dataclass(frozen=True)
class TaskData:
    """Everything one fine-tuning run sees: training, selection, reporting and shift splits."""

    classnames: tuple[str, ...]
    train: Split
    heldout: Split
    test: Split
    shifts: dict[str, Split]
    source: str = ""  # where the data comes from (a folder, a data set), for the records

    def reporting(self) -> dict[str, Split]:
        """The splits results are reported on: test, then each shift."""
        return {"test": self.test, **self.shifts}


def fingerprint(split: Split) -> str:
    """A short digest of what a split holds (its labels, and its images or image files), so the
    same data under two names (a held-out split reused as a test split) shows one digest."""
    import hashlib

    h = hashlib.sha256(split.labels.cpu().numpy().tobytes())
    if isinstance(split, TensorSplit):
        h.update(split.images.contiguous().cpu().numpy().tobytes())
    else:
        paths = getattr(getattr(split, "dataset", None), "paths", ())
        h.update("\n".join(map(str, paths)).encode())
    return h.hexdigest()[:16]

RESIDENT_BYTES = 1 << 30  # evaluation splits held in memory by `resident` up to this size together


def resident(task: TaskData, max_bytes: int = RESIDENT_BYTES) -> TaskData:
    """`task` with its held-out, test and shift splits read into memory once (uint8, as read),
    when they fit `max_bytes` together; else `task` itself. A cook evaluates every soup on the
    same splits: reading (decoding, corrupting) each image once beats once a soup. The same on
    any device (ImageNet's splits do not fit and are read from their files as before); train is
    left as it is. The pixels are the ones the files give, so every figure is unchanged."""
    evals = {"heldout": task.heldout, "test": task.test, **task.shifts}
    on_files = {k: s for k, s in evals.items() if isinstance(s, FolderSplit)}
    if not on_files:
        return task
    size = sum(len(s) * (x := s.dataset[0][0]).numel() * x.element_size() for s in on_files.values())
    if size > max_bytes:
        return task
    held = {k: TensorSplit(s.name, torch.stack([s.dataset[i][0] for i in range(len(s))]), s.labels, s.project)
            for k, s in on_files.items()}
    held = {**evals, **held}
    return replace(task, heldout=held["heldout"], test=held["test"],
                   shifts={k: held[k] for k in task.shifts})
