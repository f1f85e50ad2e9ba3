"""The torchvision adapter on a tiny FashionMNIST written in torchvision's own on-disk layout, and
on a toy `VisionDataset` with string splits (no network, no decoding of real data sets)."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torchvision.datasets
from PIL import Image
from torchvision.datasets import VisionDataset

from orchestrator.config import DataConfig, ShiftSpec
from orchestrator.data import tvsets
from orchestrator.data.listing import Reader


def _images(labels: list[int], seed: int) -> np.ndarray:
    """One 28x28 uint8 image per label: the class's grey level plus a seeded speckle."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    for k, c in enumerate(labels):
        out[k] = 20 * c
        out[k, rng.integers(0, 28), rng.integers(0, 28)] = 255
    return out


def _write_idx(raw, prefix: str, images: np.ndarray, labels: list[int]) -> None:
    """`images` and `labels` as torchvision's idx files (big-endian magic 2051 / 2049, counts)."""
    raw.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n)
                                                     + np.asarray(labels, dtype=np.uint8).tobytes())


@pytest.fixture(autouse=True)
def no_debian_packages(tmp_path_factory, monkeypatch):
    """These tests write their own files: none come from the machine's Debian packages."""
    monkeypatch.setattr(tvsets, "DEBIAN_DATASETS", tmp_path_factory.mktemp("no-debian-packages"))


@pytest.fixture
def fashion(tmp_path):
    """A FashionMNIST root: train 3 images a class (train's rows 0 and 10 equal), test 2 a class."""
    raw = tmp_path / "FashionMNIST" / "raw"
    train_labels = [c for _ in range(3) for c in range(10)]
    train = _images(train_labels, 0)
    train[10] = train[0]  # rows 0 and 10 (both class 0): the same image
    test_labels = [c for _ in range(2) for c in range(10)]
    test = _images(test_labels, 1)
    _write_idx(raw, "train", train, train_labels)
    _write_idx(raw, "t10k", test, test_labels)
    return tmp_path, train, train_labels, test, test_labels


def test_finds_fashionmnist_train_and_test(fashion):
    root, train, train_labels, test, test_labels = fashion
    found = tvsets.find(DataConfig(dataset="torchvision", source="FashionMNIST", root=str(root)))
    classes = tuple(torchvision.datasets.FashionMNIST.classes)
    assert len(classes) == 10
    assert found.heldout is None  # FashionMNIST has none: the builder carves it
    assert found.train.classes == found.test.classes == found.display == classes
    assert found.train.labels == tuple(train_labels) and found.test.labels == tuple(test_labels)
    assert found.source == f"torchvision.datasets.FashionMNIST at {root}"
    reader = found.train.reader
    assert isinstance(reader, Reader) and len(reader) == 30
    for i in (0, 7, 29):
        assert np.array_equal(np.asarray(reader.open(i)), train[i])
    assert np.array_equal(np.asarray(found.test.reader.open(5)), test[5])
    assert reader.where(17) == "FashionMNIST train row 17"
    assert found.test.reader.where(3) == "FashionMNIST test row 3"
    assert reader.content(0) == reader.content(10) == train[0].tobytes()
    assert reader.content(0) != reader.content(1)
    assert reader.size(0) == 28 * 28 == len(reader.content(3))


def test_reader_pickles_without_the_data_and_reopens(fashion):
    root, train, *_ = fashion
    reader = tvsets.find(DataConfig(dataset="torchvision", source="FashionMNIST", root=str(root))).train.reader
    blob = pickle.dumps(reader)
    assert len(blob) < 1000  # the arguments, not the images
    copy = pickle.loads(blob)
    assert len(copy) == 30
    assert np.array_equal(np.asarray(copy.open(12)), train[12])
    assert copy.content(10) == reader.content(0)


def test_missing_files_without_download_is_one_line(tmp_path):
    with pytest.raises(ValueError) as err:
        tvsets.find(DataConfig(dataset="torchvision", source="FashionMNIST", root=str(tmp_path)))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and "data.download: true" in msg and "FashionMNIST" in msg


def test_unknown_class_name_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError) as err:
        tvsets.find(DataConfig(dataset="torchvision", source="NotADataSet", root=str(tmp_path)))
    msg = str(err.value)
    assert "\n" not in msg and "'NotADataSet'" in msg and "FashionMNIST" in msg and "CIFAR10" in msg
    with pytest.raises(ValueError, match="did you mean FashionMNIST"):
        tvsets.find(DataConfig(dataset="torchvision", source="fashionmnist", root=str(tmp_path)))
    with pytest.raises(ValueError, match="data.source must name"):
        tvsets.find(DataConfig(dataset="torchvision", root=str(tmp_path)))


def test_shift_reads_another_root_test_split(fashion, tmp_path_factory):
    root, *_ = fashion
    other = tmp_path_factory.mktemp("other")
    labels = [3, 4, 3, 4]
    images = _images(labels, 7)
    _write_idx(other / "FashionMNIST" / "raw", "train", images, labels)
    _write_idx(other / "FashionMNIST" / "raw", "t10k", images[::-1].copy(), labels[::-1])
    cfg = DataConfig(dataset="torchvision", source="FashionMNIST", root=str(root))
    shift = tvsets.find_shift(cfg, ShiftSpec(name="other", source="FashionMNIST", root=str(other)))
    assert shift.name == "other" and shift.labels == (4, 3, 4, 3) and len(shift.classes) == 10
    assert np.array_equal(np.asarray(shift.reader.open(0)), images[3])
    train = tvsets.find_shift(cfg, ShiftSpec(name="o2", root=str(other), split="train"))
    assert train.labels == tuple(labels)
    with pytest.raises(ValueError, match="splits train and test"):
        tvsets.find_shift(cfg, ShiftSpec(name="o3", root=str(other), split="val"))


# --- a data set with string splits and images only (no array, no targets) ----------------------

class ToySplits(VisionDataset):
    """Splits train / val / test of RGB images whose colour is the label; no `targets`."""

    def __init__(self, root, split: str = "train", transform=None, download: bool = False):
        super().__init__(root, transform=transform)
        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown value '{split}' for argument split. Valid values are {{train, val, test}}.")
        self.split = split
        self.items = [(c, k) for k in range({"train": 3, "val": 1, "test": 2}[split]) for c in range(2)]
        self.classes = ["red", "green"]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        c, k = self.items[i]
        colour = (200, 10 * k, 0) if c == 0 else (10 * k, 200, 0)
        return Image.new("RGB", (5, 4), colour), c


class ToyNoClasses(ToySplits):
    def __init__(self, root, split: str = "train"):
        super().__init__(root, split)
        del self.classes


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "ToySplits", ToySplits, raising=False)
    monkeypatch.setattr(torchvision.datasets, "ToyNoClasses", ToyNoClasses, raising=False)


def test_string_splits_give_heldout_from_val_and_decoded_content(toys, tmp_path):
    found = tvsets.find(DataConfig(dataset="torchvision", source="ToySplits", root=str(tmp_path)))
    assert (len(found.train.reader), len(found.heldout.reader), len(found.test.reader)) == (6, 2, 4)
    assert found.train.labels == (0, 1, 0, 1, 0, 1) and found.display == ("red", "green")
    reader = found.heldout.reader
    assert reader.where(1) == "ToySplits val row 1"
    assert reader.open(0).getpixel((0, 0)) == (200, 0, 0)
    assert reader.content(0) == Image.new("RGB", (5, 4), (200, 0, 0)).tobytes() and reader.size(0) == 5 * 4 * 3
    assert pickle.loads(pickle.dumps(found.test.reader)).open(3).getpixel((0, 0)) == (10, 200, 0)
    shift = tvsets.find_shift(DataConfig(dataset="torchvision", source="ToySplits", root=str(tmp_path)),
                              ShiftSpec(name="s", source="ToySplits", split="heldout"))
    assert shift.reader.where(0) == "ToySplits val row 0"
    with pytest.raises(ValueError, match="no split 'extra'.*Valid values"):
        tvsets.find_shift(DataConfig(dataset="torchvision", source="ToySplits", root=str(tmp_path)),
                          ShiftSpec(name="s", source="ToySplits", split="extra"))


def test_class_without_classes_is_refused(toys, tmp_path):
    with pytest.raises(ValueError, match="no classes attribute: not an image-classification data set"):
        tvsets.find(DataConfig(dataset="torchvision", source="ToyNoClasses", root=str(tmp_path)))
