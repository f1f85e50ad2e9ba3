"""A user's own data, made up: three classes of coloured shapes as PNG files, in each layout an
adapter reads (a folder of class folders, torchvision's FashionMNIST files, a Hugging Face data
set saved to disk). Shared by the data, init and end-to-end tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("red_square", "green_disc", "blue_bar")  # folder names
DISPLAY = ("red square", "green disc", "blue bar")


def shape(k: int, seed: int, size: int = 32) -> Image.Image:
    """An image of class `k`: its shape and colour, jittered by `seed` (every image differs)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    o = int(rng.integers(2, 8))
    colour = [(220, 40, 40), (40, 200, 60), (50, 80, 230)][k]
    box = (o, o, size - o - int(rng.integers(0, 6)), size - o)
    if k == 0:
        d.rectangle(box, fill=colour)
    elif k == 1:
        d.ellipse(box, fill=colour)
    else:
        d.rectangle((o, size // 3, size - o, 2 * size // 3), fill=colour)
    return img


def write_folder(root: Path, per_class: dict[str, int], classes=CLASSES, seed: int = 0,
                 names: bool = True) -> Path:
    """`root`/<split>/<class>/<n>.png for each split's count per class, and classes.txt."""
    for split, n in per_class.items():
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape(k, zlib.crc32(f"{seed} {split} {k} {i}".encode())).save(root / split / c / f"{i:03d}.png")
    if names:
        (root / "classes.txt").write_text("".join(f"{c} {d}\n" for c, d in zip(classes, DISPLAY)))
    return root


def _idx(path: Path, magic: int, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # torchvision reads the files as unpacked from the official .gz
        f.write(struct.pack(">II", magic, len(arr)) + b"".join(struct.pack(">I", d) for d in arr.shape[1:]))
        f.write(arr.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """Torchvision's FashionMNIST files under `root`/FashionMNIST/raw: `train` and `test` 28x28
    grey images per class of its 10 (class k a bar at height k, jittered)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for stem, n in (("train", train), ("t10k", test)):
        labels = np.repeat(np.arange(10), n)
        x = rng.integers(0, 40, (len(labels), 28, 28))
        for i, k in enumerate(labels):
            x[i, 2 + 2 * k: 5 + 2 * k, 3:25] = 230
        _idx(raw / f"{stem}-images-idx3-ubyte", 2051, x)
        _idx(raw / f"{stem}-labels-idx1-ubyte", 2049, labels)
    return root


def write_hf(path: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """A Hugging Face DatasetDict (image, label: ClassLabel of `DISPLAY`) saved to `path`."""
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DISPLAY))})
    parts = {}
    for split, n in per_split.items():
        rows = {"image": [], "label": []}
        for k in range(len(DISPLAY)):
            for i in range(n):
                buf = io.BytesIO()
                shape(k, zlib.crc32(f"{seed} {split} {k} {i}".encode())).save(buf, format="PNG")
                rows["image"].append({"bytes": buf.getvalue(), "path": None})
                rows["label"].append(k)
        parts[split] = datasets.Dataset.from_dict(rows, features=feats)
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return path
