"""A user's own task, whichever adapter found it (`folder`, `tvsets`, `hfsets`): the data checked,
the missing splits carved, the images sized for the model, the shifts made.

An adapter returns `listing.Found` (what is there, nothing decoded). `build` then:

1. checks it (`trust.check_found`): class lists that agree, no empty class, every class in
   held-out and test, every image decodable (or skipped and counted with
   ``data.skip_unreadable``), no image both in train and in held-out, test or a shift;
2. carves held-out and test from train when the data set has none, seeded and stratified, with
   ``data.heldout_fraction`` and ``data.test_fraction`` of each class (of train's images
   ``data.train_range`` when given), and fine-tunes on ``data.train_size`` of the rest when given;
3. makes each split a `FolderSplit` whose images are read on demand, resized (shorter side to
   ``data.image_size``, bicubic) and centre-cropped, uint8 like ImageNet's;
4. adds the shifts: a corruption of the test split (`corruptions`), or another data set of the
   same kind with the task's classes or a subset of them (scored on that subset's logits).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from orchestrator.config import DataConfig, ShiftSpec
from orchestrator.data import trust
from orchestrator.data.listing import Found, Listing, sliced
from orchestrator.data.splits import FolderSplit, SubsetProjection, TaskData


class ReaderImages(torch.utils.data.Dataset):
    """Images `index` of a reader: item k is (uint8 image (3, S, S), label); picklable."""

    def __init__(self, reader, index: tuple[int, ...], labels: tuple[int, ...], size: int):
        self.reader, self.index, self.labels, self.size = reader, index, labels, size
        self.paths = tuple(reader.where(i) for i in index)  # what `splits.fingerprint` digests

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        img = self.reader.open(self.index[k]).convert("RGB")
        img = TF.resize(img, self.size, interpolation=TF.InterpolationMode.BICUBIC)
        img = TF.center_crop(img, [self.size, self.size])
        return TF.pil_to_tensor(img), self.labels[k]


def carve(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices 0..N-1 class by class: for each fraction f, round(f * n_c) of each class's
    n_c images (at least one while the class has two or more left), the rest last; seeded."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, f in enumerate(fractions):
            n = min(max(1, round(len(idx) * f)), max(0, len(idx) - start - 1))
            parts[k].append(idx[start:start + n])
            start += n
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _subset(index: np.ndarray, labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded, class-stratified subset of about `size` of `index` (``data.train_size``)."""
    if size > len(index):
        raise trust.DataError(f"data.train_size {size} is more than the {len(index)} training images "
                              "left once held-out and test are carved")
    return index[carve(labels[index], (size / len(index),), seed + 1)[0]]


def _split(name: str, listing: Listing, index, size: int, remap=None, project=None) -> FolderSplit:
    index = tuple(int(i) for i in index)
    labels = tuple(listing.labels[i] if remap is None else remap[listing.labels[i]] for i in index)
    if not index:
        raise trust.DataError(f"data: the {name} split has no images")
    return FolderSplit(name, ReaderImages(listing.reader, index, labels, size),
                       torch.tensor(labels, dtype=torch.int64), project)


def cache_dir() -> Path:
    """Where the trust checks remember data sets they found readable (`trust.check_readable`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "model-soup" / "checked"


def _shift(spec: ShiftSpec, listing: Listing, keep: np.ndarray, classes: tuple[str, ...],
           size: int) -> FolderSplit:
    """A shift data set scored on the task's classes it holds (all of them, or a subset: then
    on that subset's logits, as ImageNet-R's 200 classes are)."""
    unknown = [c for c in listing.classes if c not in classes]
    if unknown:
        raise trust.DataError(f"data: shift {spec.name!r} has classes the task does not: {unknown[:5]} "
                              f"(a shift holds the task's classes or a subset of them)")
    held = sorted({listing.labels[i] for i in keep})
    position = {c: i for i, c in enumerate(classes)}
    if len(held) == len(classes):
        return _split(spec.name, listing, keep, size, remap={k: position[listing.classes[k]] for k in held})
    project = SubsetProjection(tuple(position[listing.classes[k]] for k in held), len(classes))
    return _split(spec.name, listing, keep, size, remap={k: j for j, k in enumerate(held)}, project=project)


def build(found: Found, cfg: DataConfig, shifts: dict[str, tuple[ShiftSpec, Listing]] | None = None,
          progress=None) -> TaskData:
    """The task `found` describes, checked (see the module docstring); `shifts` are the shift data
    sets the adapter listed, by name (corruptions are added by `orchestrator.data`)."""
    shifts = shifts or {}
    if cfg.train_range is not None:
        try:
            found = sliced(found, *cfg.train_range)
        except ValueError as err:
            raise trust.DataError(str(err)) from None
    shift_sets = {name: listing for name, (_, listing) in shifts.items()}
    listed = {**found.splits(), **shift_sets}
    report = trust.check_found(found, cfg.skip_unreadable, cache_dir=cache_dir(), progress=progress,
                               shifts=shift_sets)
    keep = {name: trust.kept(len(s.labels), report.unreadable.get(name, ())) for name, s in listed.items()}
    train = found.train
    missing = [s for s in ("heldout", "test") if s not in keep]
    fractions = tuple(cfg.heldout_fraction if s == "heldout" else cfg.test_fraction for s in missing)
    parts = carve(np.asarray(train.labels)[keep["train"]], fractions, cfg.split_seed)
    index = {s: keep["train"][p] for s, p in zip(missing, parts)}
    index["train"] = keep["train"][parts[-1]]
    if cfg.train_size is not None:
        index["train"] = _subset(index["train"], np.asarray(train.labels), cfg.train_size, cfg.split_seed)
    for s in missing:
        short = sorted(set(range(len(train.classes))) - set(np.asarray(train.labels)[index[s]].tolist()))
        if short:
            raise trust.DataError(
                f"data: class {found.display[short[0]]!r} has too few training images to carve a "
                f"{'held-out' if s == 'heldout' else 'test'} split from train; add images, or give "
                f"the data set its own {s} split")
    splits = {s: _split(s, listed.get(s, train), index.get(s, keep.get(s)), cfg.image_size)
              for s in ("train", "heldout", "test")}
    named = {name: _shift(spec, listing, keep[name], train.classes, cfg.image_size)
             for name, (spec, listing) in shifts.items()}
    names = found.display if cfg.classnames is None else cfg.classnames
    if len(names) != len(train.classes):
        raise trust.DataError(f"data.classnames: {len(names)} names for the data set's {len(train.classes)} classes "
                              f"({', '.join(train.classes[:5])}{', ...' if len(train.classes) > 5 else ''})")
    return TaskData(tuple(names), splits["train"], splits["heldout"], splits["test"], named,
                    source=found.source)
