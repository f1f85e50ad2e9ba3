"""A user's data as an adapter finds it, before any image is decoded: what the own-task builder
(`owntask`), the trust checks (`trust`) and `soup init` read.

An adapter (`folder`, `tvsets`, `hfsets`) answers one question: for each split it has (train, and
held-out and test when the data set brings them), which images are there, with which labels,
under which class names. It returns `Found`; everything after that (carving missing splits,
checking, resizing, shifts) is shared and knows no data set.

A `Reader` opens one source's images by index. It is picklable (DataLoader workers receive it),
and offers the stored bytes and their size without decoding, so that duplicates across splits
are found by size first and hashed only where sizes collide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class Reader(Protocol):
    """The images of one source (a folder's files, a data set's rows), by index."""

    def __len__(self) -> int: ...

    def open(self, i: int) -> Image.Image:
        """Image `i`, decoded (any mode; the builder converts to RGB). Raises (OSError,
        ValueError, ...) when it cannot be decoded."""
        ...

    def where(self, i: int) -> str:
        """Where image `i` is, for a message: a file path, or ``<data set> <split> row 17``."""
        ...

    def size(self, i: int) -> int:
        """The stored size of image `i` in bytes, without reading it when the store can say
        (a file's stat); equal contents always have equal sizes."""
        ...

    def content(self, i: int) -> bytes:
        """The stored bytes of image `i` (a file's bytes, an encoded row's bytes, or the raw
        pixels of an in-memory array): equal images, equal bytes."""
        ...

    def head(self, i: int, n: int) -> bytes:
        """The first `n` bytes of `content(i)`, reading no more than that where the store can
        (a file's first bytes): the leakage check's cheap first look."""
        ...


@dataclass(frozen=True)
class Listing:
    """One split as found: a reader, a label per image (an index into `classes`), and the class
    names this split itself declares (a folder's class folders, a data set's ``ClassLabel``), in
    label order, so that splits that disagree on their classes can be told apart."""

    name: str  # train, heldout, test or a shift's name
    reader: Reader
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __post_init__(self):
        if len(self.labels) != len(self.reader):
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {len(self.reader)} images")


@dataclass(frozen=True)
class Found:
    """What an adapter found: the splits it has (held-out and test may be missing: the builder
    carves them from train), the classes' display names (in `train.classes` order), and where the
    data came from (a folder, a data set name) for the records."""

    train: Listing
    heldout: Listing | None
    test: Listing | None
    display: tuple[str, ...]
    source: str
    unreadable: tuple[str, ...] = ()  # what an adapter skipped itself (none do today)

    def splits(self) -> dict[str, Listing]:
        """The splits found, by name."""
        return {s.name: s for s in (self.train, self.heldout, self.test) if s is not None}


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class FileReader:
    """Image files by index (`Reader`): a stat gives the size, the file its bytes."""

    def __init__(self, paths: tuple[str, ...]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as f:
            return f.convert("RGB")  # decodes the whole image (a truncated file raises here)

    def where(self, i: int) -> str:
        return self.paths[i]

    def size(self, i: int) -> int:
        return os.stat(self.paths[i]).st_size

    def content(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def head(self, i: int, n: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read(n)


class Slice:
    """Images `start`..`stop`-1 of another reader (`Reader`): ``data.train_range``; picklable."""

    def __init__(self, reader: Reader, start: int, stop: int):
        self.reader, self.start, self.stop = reader, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def open(self, i: int) -> Image.Image:
        return self.reader.open(self.start + i)

    def where(self, i: int) -> str:
        return self.reader.where(self.start + i)

    def size(self, i: int) -> int:
        return self.reader.size(self.start + i)

    def content(self, i: int) -> bytes:
        return self.reader.content(self.start + i)

    def head(self, i: int, n: int) -> bytes:
        return self.reader.head(self.start + i, n)


def sliced(found: Found, start: int, stop: int) -> Found:
    """`found` with only train's images `start`..`stop`-1; a ValueError past its end."""
    n = len(found.train.labels)
    if stop > n:
        raise ValueError(f"data.train_range [{start}, {stop}] reaches past the {n} images of train")
    train = Listing("train", Slice(found.train.reader, start, stop), found.train.labels[start:stop],
                    found.train.classes)
    return replace(found, train=train, source=f"{found.source}, train images {start}..{stop - 1}")
