"""An image-classification data set of Hugging Face `datasets` (`dataset: huggingface`).

``data.source`` is, in this order:

- a folder written by ``save_to_disk`` (it holds ``dataset_dict.json`` or ``state.json``):
  ``datasets.load_from_disk``;
- a ``.parquet`` file (all train), or a folder holding parquet files (splits from their names,
  ``train-00000-of-00001.parquet``, ``data/test-*.parquet``, ...):
  ``load_dataset("parquet", ...)``;
- any other folder: ``load_dataset("imagefolder", data_dir=...)``;
- else a hub id (``owner/name``): ``load_dataset(id)``, which needs the network (or the id in the
  local Hugging Face cache).

A relative path is looked up under ``data.root`` when that is given. A lone ``Dataset`` (not a
``DatasetDict``) is train.

Splits: train is ``train``; held-out the first present of ``heldout``, ``validation``,
``valid``, ``val``; test is ``test``; what is missing the shared builder carves from train.
Images are the ``data.image_column`` column, labels the ``data.label_column`` column, which must
be a ``ClassLabel``: its names are the classes. Labels are read up front from that column.

`RowReader` reads the image column through ``Image(decode=False)``: a row's stored (encoded) bytes,
or the file's bytes when the row holds only a path. It is picklable: it holds the split's Arrow
files (memory-mapped again in each process with ``Dataset.from_file``) and, for a split without
any, the source, split and column to load it again.

`datasets` is an optional extra: it is imported only inside functions.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

from orchestrator.config import DataConfig, ShiftSpec
from orchestrator.config.loading import one_line
from orchestrator.data.listing import Found, Listing

NAME = "huggingface"
HELDOUT_SPLITS = ("heldout", "validation", "valid", "val")
MISSING = "data.dataset huggingface needs the datasets package: pip install 'orchestrator[hf]'"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError(MISSING) from None
    return datasets


def locate(source: str | None, root: str | None) -> tuple[str, str]:
    """How to load `source`: (kind, location), kind one of ``disk``, ``parquet``, ``imagefolder``
    (location a resolved path) or ``hub`` (location the id)."""
    if not source:
        if not root:
            raise ValueError("data.source must name a Hugging Face data set for dataset 'huggingface': "
                             "a save_to_disk folder, a parquet file or folder, an image folder or a hub id")
        source, root = root, None
    path = Path(source).expanduser()
    if root and not path.is_absolute() and (Path(root).expanduser() / path).exists():
        path = Path(root).expanduser() / path
    if path.is_dir():
        path = path.resolve()
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "disk", str(path)
        if any(path.rglob("*.parquet")):
            return "parquet", str(path)
        return "imagefolder", str(path)
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet", str(path.resolve())
        raise ValueError(f"data.source {source!r}: a file that is not .parquet (expected a save_to_disk folder, "
                         "a parquet file or folder, an image folder or a hub id)")
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source:
        raise ValueError(f"data.source {source!r}: no such file or folder")
    return "hub", source


def load(kind: str, location: str) -> Any:
    """The `Dataset` or `DatasetDict` at `location`; one-line ValueErrors."""
    ds = _datasets()
    try:
        if kind == "disk":
            return ds.load_from_disk(location)
        if kind == "parquet":
            if location.endswith(".parquet"):
                return ds.load_dataset("parquet", data_files=location)
            return ds.load_dataset("parquet", data_dir=location)
        if kind == "imagefolder":
            return ds.load_dataset("imagefolder", data_dir=location)
        return ds.load_dataset(location)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types (OSError, ConnectionError, ...)
        if kind == "hub":
            raise ValueError(f"data.source {location!r}: not a local path, and loading it from the Hugging Face "
                             f"hub failed (a hub id needs the network): {one_line(err)}") from None
        raise ValueError(f"data.source {location}: could not load it as {kind} data: {one_line(err)}") from None


def _splits(loaded: Any) -> dict[str, Any]:
    """Split name -> `Dataset` (a lone `Dataset` is train)."""
    ds = _datasets()
    if isinstance(loaded, ds.Dataset):
        return {"train": loaded}
    return dict(loaded.items())


class RowReader:
    """The images of one column of one split, undecoded; picklable. `files` are the split's Arrow
    files, concatenated in order (memory-mapped in each process); with none, the split is loaded
    again from (`kind`, `location`)."""

    def __init__(self, source: str, split: str, column: str, rows: int, files: tuple[str, ...],
                 kind: str, location: str, dataset: Any = None):
        self.source, self.split, self.column, self.rows = source, split, column, rows
        self.files, self.kind, self.location = files, kind, location
        self._ds = dataset
        self._meta: tuple[list[int], list[str | None]] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ds": None, "_meta": None}

    def dataset(self) -> Any:
        """The split's image column as encoded {bytes, path} rows (opened on first use here)."""
        if self._ds is None:
            ds = _datasets()
            split = None
            if self.files:
                parts = [ds.Dataset.from_file(f) for f in self.files]
                split = parts[0] if len(parts) == 1 else ds.concatenate_datasets(parts)
                if len(split) != self.rows:
                    split = None  # not the split as found (e.g. an index mapping): load it again
            if split is None:
                split = _splits(load(self.kind, self.location))[self.split]
            self._ds = split.select_columns([self.column]).cast_column(self.column, ds.Image(decode=False))
        return self._ds

    def meta(self) -> tuple[list[int], list[str | None]]:
        """Each row's stored byte count (-1: none stored, only a path) and path, read from the
        Arrow column without touching the bytes."""
        if self._meta is None:
            import pyarrow.compute as pc

            column = self.dataset().with_format("arrow")[self.column]
            sizes = pc.fill_null(pc.binary_length(pc.struct_field(column, "bytes")), -1).to_pylist()
            self._meta = (sizes, pc.struct_field(column, "path").to_pylist())
        return self._meta

    def __len__(self) -> int:
        return self.rows

    def head(self, i: int, n: int) -> bytes:
        """The first `n` bytes of `content(i)` (the row is held whole: nothing saved by reading less)."""
        return self.content(i)[:n]

    def content(self, i: int) -> bytes:
        row = self.dataset()[i][self.column]
        if row.get("bytes") is not None:
            return row["bytes"]
        if row.get("path"):
            with open(row["path"], "rb") as f:
                return f.read()
        raise ValueError(f"{self.where(i)}: no image stored in the row")

    def size(self, i: int) -> int:
        sizes, paths = self.meta()
        if sizes[i] >= 0:
            return sizes[i]
        if paths[i]:
            return os.path.getsize(paths[i])
        raise ValueError(f"{self.where(i)}: no image stored in the row")

    def open(self, i: int) -> Image.Image:
        img = Image.open(io.BytesIO(self.content(i)))
        img.load()
        return img

    def where(self, i: int) -> str:
        path = self.meta()[1][i]
        return f"{self.source} {self.split} row {i}" + (f" ({path})" if path else "")


def listing(name: str, split: str, data: Any, image_column: str, label_column: str, source: str,
            kind: str, location: str) -> Listing:
    """One split as found: its `ClassLabel` names, its labels, a reader of its image column."""
    ds = _datasets()
    what = f"{source} {split}"
    columns = list(data.column_names)
    for key, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in columns:
            raise ValueError(f"{what}: no column {column!r} (data.{key}); its columns are {columns}")
    feature = data.features[label_column]
    if not isinstance(feature, ds.ClassLabel):
        raise ValueError(  # noqa: TRY004 - a data error: adapters' errors are one-line ValueErrors
            f"{what}: label column {label_column!r} is {feature}, not a ClassLabel, so it names no classes; "
            f"cast it (dataset.cast_column({label_column!r}, ClassLabel(names=[...]))) and save it again")
    classes = tuple(feature.names)
    labels = tuple(-1 if t is None else int(t) for t in data.with_format("arrow")[label_column].to_pylist())
    bad = sorted({t for t in labels if not 0 <= t < len(classes)})
    if bad:
        raise ValueError(f"{what}: labels {bad[:5]} in column {label_column!r} are not indices of its "
                         f"{len(classes)} classes (-1: no label)")
    try:
        images = data.select_columns([image_column]).cast_column(image_column, ds.Image(decode=False))
    except Exception as err:  # noqa: BLE001 - a column that holds no images: pyarrow/datasets refuse the cast their own ways
        raise ValueError(f"{what}: column {image_column!r} ({data.features[image_column]}) does not hold images "
                         f"(data.image_column): {one_line(err)}") from None
    files = tuple(f["filename"] for f in data.cache_files)
    reader = RowReader(source, split, image_column, len(data), files, kind, location, images)
    return Listing(name, reader, labels, classes)


def find(cfg: DataConfig) -> Found:
    """The splits of ``data.source``: train (required), held-out and test when present."""
    kind, location = locate(cfg.source, cfg.root)
    splits = _splits(load(kind, location))
    if "train" not in splits:
        raise ValueError(f"data.source {location}: no train split (its splits are {sorted(splits)})")

    def one(name: str, split: str) -> Listing:
        return listing(name, split, splits[split], cfg.image_column, cfg.label_column, location, kind, location)

    train = one("train", "train")
    heldout_split = next((s for s in HELDOUT_SPLITS if s in splits), None)
    heldout = one("heldout", heldout_split) if heldout_split else None
    test = one("test", "test") if "test" in splits else None
    return Found(train, heldout, test, train.classes, source=location)


def find_shift(cfg: DataConfig, spec: ShiftSpec) -> Listing:
    """A shift that is another Hugging Face data set: ``spec.source`` (else ``data.source``,
    relative paths under ``spec.root``, else ``data.root``), its split ``spec.split`` (else test,
    or the only split of a data set that has one: a lone ``Dataset``, a single parquet file), with
    the task's image and label columns."""
    kind, location = locate(spec.source or cfg.source, spec.root or cfg.root)
    splits = _splits(load(kind, location))
    split = spec.split or ("test" if "test" in splits or len(splits) != 1 else next(iter(splits)))
    if split not in splits:
        raise ValueError(f"shift {spec.name!r}: {location} has no split {split!r} (its splits are "
                         f"{sorted(splits)}; give the shift's split)")
    return listing(spec.name, split, splits[split], cfg.image_column, cfg.label_column, location, kind, location)
