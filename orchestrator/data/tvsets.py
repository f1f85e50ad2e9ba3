"""An image-classification data set of `torchvision.datasets` (`dataset: torchvision`).

``data.source`` names the class (``FashionMNIST``, ``MNIST``, ``CIFAR10``, ``Flowers102``, ...),
``data.root`` is the root folder it is given (default: ``model-soup/torchvision`` in the user's
cache), and ``data.download`` is passed through (off by default: the files must already be on
disk, where torchvision itself looks for them, e.g. ``<root>/FashionMNIST/raw/``). Files that a
Debian ``dataset-*`` package installed (``dataset-fashion-mnist``) are copied there first, checked
against the class's own md5 list, so such a set needs no network.

Splits: a class with a ``train`` flag gives train (``train=True``) and test (``train=False``); a
class with a ``split`` argument gives train (``"train"``, else ``"trainval"`` or
``"train-standard"``), held-out (``"val"``, ``"valid"`` or ``"validation"``, when it offers one)
and test (``"test"``, when it offers one); a class with neither is all train. What is missing is
carved from train by the shared builder. Which split values a class accepts is learnt by asking
it: torchvision refuses an unknown split with a ValueError before it looks for any file.

Class names are the instance's ``classes`` (a class without them is not a classification set and
is refused; ImageNet's tuples of synonyms give their first name). Labels come from the public
``targets`` (or ``labels``) when the instance has them, else from iterating its items.

`TorchvisionReader` stores the constructor arguments and builds the torchvision instance lazily in
each process (it is pickled to DataLoader workers). Its stored bytes are the instance's in-memory
``data`` row when it has such an array (MNIST's tensor, CIFAR's numpy array), else the decoded
image's pixels.
"""

from __future__ import annotations

import gzip
import inspect
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets
from PIL import Image
from torchvision.datasets import VisionDataset
from torchvision.transforms.functional import to_pil_image

from orchestrator.config import DataConfig, ShiftSpec
from orchestrator.config.loading import one_line
from orchestrator.data.listing import Found, Listing

NAME = "torchvision"
EXAMPLES = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100", "STL10", "Flowers102", "Food101",
            "OxfordIIITPet", "DTD", "EuroSAT", "Country211")
TRAIN_SPLITS = ("train", "trainval", "train-standard")
HELDOUT_SPLITS = ("val", "valid", "validation")
TEST_SPLITS = ("test",)
DEBIAN_DATASETS = Path("/usr/share/datasets")  # where Debian's dataset-* packages install their files


def dataset_class(name: str | None) -> type:
    """The `torchvision.datasets` class called `name`; a one-line ValueError for anything else."""
    if not name:
        raise ValueError(f"data.source must name a torchvision.datasets class for dataset 'torchvision' "
                         f"(e.g. {', '.join(EXAMPLES[:6])})")
    cls = getattr(torchvision.datasets, name, None)
    if isinstance(cls, type) and issubclass(cls, VisionDataset) and cls is not VisionDataset:
        return cls
    near = [n for n in dir(torchvision.datasets) if n.lower() == name.lower()]
    hint = f"; did you mean {near[0]}?" if near else ""
    raise ValueError(f"data.source {name!r} is not an image-classification data set of torchvision.datasets "
                     f"(e.g. {', '.join(EXAMPLES)}){hint}")


def split_kind(cls: type) -> str | None:
    """How `cls` chooses its split: ``"train"`` (a bool flag), ``"split"`` (a string) or None."""
    params = inspect.signature(cls).parameters
    return "train" if "train" in params else "split" if "split" in params else None


def _label(split: Any) -> str:
    """A split argument as a word for messages: train/test for the flag, else its value."""
    if split is None:
        return "all"
    if isinstance(split, bool):
        return "train" if split else "test"
    return str(split)


def _first_name(c: Any) -> str:
    return str(c[0]) if isinstance(c, (tuple, list)) and c else str(c)


class TorchvisionReader:
    """The items of one torchvision data set instance, by index; picklable (the instance is built
    again, lazily, in each process from the stored constructor arguments)."""

    def __init__(self, name: str, root: str, kind: str | None, split: Any, dataset: Any = None):
        self.name, self.root, self.kind, self.split = name, root, kind, split
        self._ds = dataset
        self._len = len(dataset) if dataset is not None else None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ds": None}

    def kwargs(self) -> dict:
        return {} if self.kind is None else {self.kind: self.split}

    def dataset(self) -> Any:
        """The torchvision instance (built on first use in this process, never downloading)."""
        if self._ds is None:
            self._ds = dataset_class(self.name)(root=self.root, **self.kwargs())
        return self._ds

    def __len__(self) -> int:
        if self._len is None:
            self._len = len(self.dataset())
        return self._len

    def _rows(self) -> Any:
        """The instance's public in-memory array of images (one row an image), or None."""
        data = getattr(self.dataset(), "data", None)
        if isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim >= 2 and len(data) == len(self):
            return data
        return None

    def open(self, i: int) -> Image.Image:
        img = self.dataset()[i][0]
        if isinstance(img, Image.Image):
            return img
        if isinstance(img, torch.Tensor):
            return to_pil_image(img)
        if isinstance(img, np.ndarray):
            return Image.fromarray(img)
        raise ValueError(f"{self.where(i)}: not an image ({type(img).__name__})")

    def where(self, i: int) -> str:
        return f"{self.name} {_label(self.split)} row {i}"

    def size(self, i: int) -> int:
        rows = self._rows()
        if rows is not None:
            return int(rows[i].nbytes)
        return len(self.open(i).tobytes())

    def head(self, i: int, n: int) -> bytes:
        """The first `n` bytes of `content(i)` (the row is held whole: nothing saved by reading less)."""
        return self.content(i)[:n]

    def content(self, i: int) -> bytes:
        rows = self._rows()
        if rows is not None:
            row = rows[i]
            return (row.numpy() if isinstance(row, torch.Tensor) else np.asarray(row)).tobytes()
        return self.open(i).tobytes()


class UnknownSplit(ValueError):
    """A class refused a split value (torchvision checks it before looking for files)."""


def _make(cls: type, root: str, kind: str | None, split: Any, download: bool) -> Any:
    """`cls` built for one split; one-line ValueErrors for missing files and odd classes, and
    `UnknownSplit` where the class refuses the split value (the caller tries the next)."""
    name = cls.__name__
    kwargs = {} if kind is None else {kind: split}
    if download:
        if "download" not in inspect.signature(cls).parameters:
            raise ValueError(f"torchvision.datasets.{name} cannot download its files: put them under {root} "
                             "yourself and set data.download: false")
        kwargs["download"] = True
    try:
        return cls(root=root, **kwargs)
    except RuntimeError as err:
        if download:
            raise ValueError(f"torchvision.datasets.{name}: downloading into {root} failed "
                             f"(needs the network): {one_line(err)}") from None
        fetch = ("data.download: true fetches them" if "download" in inspect.signature(cls).parameters
                 else "it cannot download them: put them there yourself")
        raise ValueError(f"torchvision.datasets.{name} found no files under {root} (torchvision: "
                         f"{one_line(err)}); {fetch}") from None
    except TypeError as err:
        raise ValueError(f"torchvision.datasets.{name} needs arguments this adapter does not pass "
                         f"(it gives root and the split only): {one_line(err)}") from None
    except ValueError as err:
        if kind == "split":
            raise UnknownSplit(one_line(err)) from None
        raise ValueError(f"torchvision.datasets.{name}: {one_line(err)}") from None
    except OSError as err:
        raise ValueError(f"torchvision.datasets.{name} could not read its files under {root}: "
                         f"{one_line(err)}") from None


def _first_split(cls: type, root: str, candidates: tuple[str, ...], download: bool) -> tuple[str, Any]:
    """The first of `candidates` that `cls` accepts as its split, with its instance;
    `UnknownSplit` (torchvision's words on the last one) when it accepts none."""
    refused = UnknownSplit(f"no split among {candidates}")
    for split in candidates:
        try:
            return split, _make(cls, root, "split", split, download)
        except UnknownSplit as err:
            refused = err
    raise refused


def _listing(name: str, cls: type, root: str, kind: str | None, split: Any, ds: Any) -> Listing:
    """One split of an instance: its classes, its labels, a reader."""
    where = f"torchvision.datasets.{cls.__name__} ({_label(split)})"
    classes = getattr(ds, "classes", None)
    if not isinstance(classes, (list, tuple)) or not classes:
        raise ValueError(f"{where} has no classes attribute: not an image-classification data set; "
                         "use dataset: folder or huggingface for it")
    classes = tuple(_first_name(c) for c in classes)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    if targets is not None and len(targets) == len(ds):
        labels = tuple(int(t) for t in np.asarray(targets).reshape(-1).tolist())
    else:
        labels = tuple(int(ds[i][1]) for i in range(len(ds)))
    bad = sorted({t for t in labels if not 0 <= t < len(classes)})
    if bad:
        raise ValueError(f"{where}: labels {bad[:5]} are not indices of its {len(classes)} classes")
    reader = TorchvisionReader(cls.__name__, root, kind, split, ds)
    return Listing(name, reader, labels, classes)


def default_root() -> Path:
    """Where a space that names no ``data.root`` keeps torchvision's files: the user's cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "model-soup" / "torchvision"


def _root(root: str | None, cls: type) -> str:
    root = str(Path(root).expanduser()) if root else str(default_root())
    debian_copy(cls, root)
    return root


def debian_copy(cls: type, root: str, packages: Path | None = None) -> bool:
    """Put the files a Debian ``dataset-*`` package installed (``/usr/share/datasets/<name>/``,
    e.g. ``dataset-fashion-mnist``) where `cls` looks for them, ``<root>/<Class>/raw/``,
    decompressed (gzip checks each file's CRC), under the names the class itself lists (its public
    ``resources``): no download needed. Debian recompresses the files, so their md5 differ from
    that list; torchvision checks what it reads (the idx headers' sizes). True when every file is
    in place afterwards."""
    resources = getattr(cls, "resources", None)
    if not isinstance(resources, (list, tuple)) or not resources:
        return False
    src = (packages or DEBIAN_DATASETS) / re.sub(r"(?<=[a-z])(?=[A-Z])", "-", cls.__name__).lower()
    raw = Path(root) / cls.__name__ / "raw"
    names = [str(entry[0]).rsplit("/", 1)[-1] for entry in resources]
    todo = [(src / n, raw / n.removesuffix(".gz")) for n in names]
    todo = [(packed, target) for packed, target in todo if not target.exists()]
    if not all(packed.is_file() for packed, _ in todo):
        return False  # a package without every file: nothing copied
    for packed, target in todo:
        raw.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f"{target.name}.{os.getpid()}.part")
        with (gzip.open(packed) if packed.suffix == ".gz" else open(packed, "rb")) as f, open(part, "wb") as out:
            shutil.copyfileobj(f, out)
        os.replace(part, target)  # trials building the task at once each write their own part
    return True


def find(cfg: DataConfig) -> Found:
    """The splits that ``data.source`` offers under ``data.root`` (train; held-out and test when
    the class has them)."""
    cls = dataset_class(cfg.source)
    root = _root(cfg.root, cls)
    kind = split_kind(cls)
    heldout = test = None
    if kind == "train":
        train = _listing("train", cls, root, kind, True, _make(cls, root, kind, True, cfg.download))
        test = _listing("test", cls, root, kind, False, _make(cls, root, kind, False, cfg.download))
    elif kind == "split":
        try:
            first = _first_split(cls, root, TRAIN_SPLITS, cfg.download)
        except UnknownSplit as err:
            raise ValueError(f"torchvision.datasets.{cls.__name__} has no train split (tried "
                             f"{', '.join(TRAIN_SPLITS)}; torchvision: {err}): not a data set this adapter reads") from None
        train = _listing("train", cls, root, kind, *first)
        found: dict[str, Listing] = {}
        for name, candidates in (("heldout", HELDOUT_SPLITS), ("test", TEST_SPLITS)):
            try:
                found[name] = _listing(name, cls, root, kind, *_first_split(cls, root, candidates, cfg.download))
            except UnknownSplit:
                pass  # the class has no such split: the builder carves it from train
        heldout, test = found.get("heldout"), found.get("test")
    else:
        train = _listing("train", cls, root, kind, None, _make(cls, root, kind, None, cfg.download))
    return Found(train, heldout, test, train.classes, source=f"torchvision.datasets.{cls.__name__} at {root}")


def find_shift(cfg: DataConfig, spec: ShiftSpec) -> Listing:
    """A shift that is another torchvision data set: ``spec.source`` (else ``data.source``) under
    ``spec.root`` (else ``data.root``), its split ``spec.split`` (else test: ``train=False``, or
    ``split="test"``; ``train`` and ``heldout`` name those splits too, any other word is passed to
    a class that takes a split string). A class without splits is read whole."""
    cls = dataset_class(spec.source or cfg.source)
    root = _root(spec.root or cfg.root, cls)
    kind = split_kind(cls)
    want = spec.split or "test"
    what = f"shift {spec.name!r}: torchvision.datasets.{cls.__name__}"
    if kind == "train":
        if want not in ("train", "test"):
            raise ValueError(f"{what} has the splits train and test, not {want!r}")
        split = want == "train"
        return _listing(spec.name, cls, root, kind, split, _make(cls, root, kind, split, cfg.download))
    if kind == "split":
        candidates = {"train": TRAIN_SPLITS, "heldout": HELDOUT_SPLITS}.get(want, (want,))
        try:
            got = _first_split(cls, root, candidates, cfg.download)
        except UnknownSplit as err:
            raise ValueError(f"{what} has no split {want!r} (tried {', '.join(candidates)}; "
                             f"torchvision: {err})") from None
        return _listing(spec.name, cls, root, kind, *got)
    if spec.split is not None:
        raise ValueError(f"{what} has no splits: leave the shift's split out to read it whole")
    return _listing(spec.name, cls, root, kind, None, _make(cls, root, kind, None, cfg.download))
