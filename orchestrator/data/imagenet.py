"""ImageNet and its five distribution shifts, read from their standard folder layouts.

Everything is laid out under one data root (the layout of the model-soups / WiSE-FT code)::

    root/imagenet/{train,val}/<wnid>/*.JPEG         ImageNet-1k (val sorted into class folders)
    root/imagenetv2/imagenetv2-matched-frequency-format-val/<class index 0..999>/*.jpeg
    root/imagenet-r/<wnid>/*.jpg                    ImageNet-R (200 classes)
    root/sketch/<wnid>/*.JPEG                       ImageNet-Sketch (1000 classes)
    root/imagenet-a/<wnid>/*.jpg                    ImageNet-A (200 classes)
    root/objectnet-1.0/images/<folder>/*.png        ObjectNet (113 of its classes overlap ImageNet)

The model's classes are the training classes (all 1000 for real ImageNet), numbered in the standard
sorted-wnid order. A shift keeps the images of classes the model has; the 200-class and 113-class
sets carry a `project` that maps the model's logits onto their own classes. Which images form the
held-out slice depends only on the sorted file list and the split seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from orchestrator.config import ASSETS, DataConfig
from orchestrator.data.splits import (
    FolderSplit,
    SubsetProjection,
    TaskData,
    check_width,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OBJECTNET_BORDER = 2  # the reference code crops 2 px a side to remove ObjectNet's 1-px red frame


# --- committed class metadata (sources in each file's header) ------------------------------------

def _read_list(name: str) -> tuple[str, ...]:
    lines = (ASSETS / name).read_text().splitlines()
    return tuple(s.strip() for s in lines if s.strip() and not s.startswith("#"))


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in the standard (sorted) class order."""
    return _read_list("imagenet_wnids.txt")


@cache
def imagenet_r_wnids() -> tuple[str, ...]:
    """The 200 wnids of ImageNet-R, sorted."""
    return _read_list("imagenet_r_wnids.txt")


@cache
def imagenet_a_wnids() -> tuple[str, ...]:
    """The 200 wnids of ImageNet-A, sorted."""
    return _read_list("imagenet_a_wnids.txt")


@cache
def objectnet_classes() -> dict[str, tuple[int, ...]]:
    """ObjectNet folder name -> its ImageNet-1k class indices, for the 113 overlapping classes."""
    meta = json.loads((ASSETS / "imagenet_objectnet.json").read_text())
    return {folder: tuple(c["imagenet"]) for folder, c in sorted(meta["classes"].items())}


@cache
def imagenet_classnames() -> dict[str, str]:
    """wnid -> the class name the zero-shot head is built from (open_clip's OpenAI names)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = imagenet_wnids()
    if len(IMAGENET_CLASSNAMES) != len(wnids):  # both must be the standard 1000-class order
        raise RuntimeError(f"open_clip lists {len(IMAGENET_CLASSNAMES)} ImageNet class names, "
                           "expected 1000")
    return dict(zip(wnids, IMAGENET_CLASSNAMES))


# --- images on disk ------------------------------------------------------------------------------

class ImageFiles(torch.utils.data.Dataset):
    """Image files with integer labels: item i is (uint8 image (3, S, S), label).

    Like CLIP's preprocessing without the normalisation (the model normalises): resize the shorter
    side to S (bicubic), centre-crop S x S. The image stays uint8, a quarter of float32's bytes
    through the loader workers' pipe and the pinned buffer; it becomes float in [0, 1] on the
    device (`Accel.to_device`). Picklable, so DataLoader workers can receive it.
    """

    def __init__(self, paths: tuple[str, ...], labels: tuple[int, ...], size: int, border: int = 0):
        self.paths, self.labels, self.size, self.border = paths, labels, size, border

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as f:
            img = f.convert("RGB")
        if self.border:
            w, h = img.size
            img = img.crop((self.border, self.border, w - self.border, h - self.border))
        img = TF.resize(img, self.size, interpolation=TF.InterpolationMode.BICUBIC)
        img = TF.center_crop(img, [self.size, self.size])
        return TF.pil_to_tensor(img), self.labels[i]


def _require(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: expected folder {path} does not exist")
    return path


def _class_folders(root: Path, what: str) -> list[str]:
    """Sorted names of the class folders under `root` (hidden entries and loose files skipped)."""
    names = sorted(e.name for e in os.scandir(_require(root, what))
                   if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"{what}: no class folders in {root}")
    return names


def _images(folder: Path) -> list[str]:
    """Sorted image files of one class folder (sorted: splits must not depend on listing order)."""
    return sorted(str(folder / n) for n in os.listdir(folder)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))


def _listing(root: Path, label_of: dict[str, int]) -> tuple[list[str], list[int]]:
    """Paths and labels of the images in the class folders named in `label_of` (others skipped)."""
    paths, labels = [], []
    for name in sorted(label_of):
        files = _images(root / name) if (root / name).is_dir() else []
        paths += files
        labels += [label_of[name]] * len(files)
    return paths, labels


def _split(name: str, paths, labels, size: int, project=None, border: int = 0) -> FolderSplit:
    if not paths:
        raise ValueError(f"{name}: no images found")
    ds = ImageFiles(tuple(paths), tuple(labels), size, border)
    return FolderSplit(name, ds, torch.tensor(labels, dtype=torch.int64), project)


# --- projections: model logits -> a split's classes ----------------------------------------------

@dataclass(frozen=True)
class MaxProjection:
    """Each split class scores the max of its model classes' logits (ObjectNet, as model-soups)."""

    groups: tuple[tuple[int, ...], ...]  # model class indices of each of the split's classes
    n_model_classes: int

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        check_width(logits, self.n_model_classes)
        width = max(len(g) for g in self.groups)
        # pad each group by repeating its first member: a repeat cannot change a max
        padded = [list(g) + [g[0]] * (width - len(g)) for g in self.groups]
        return logits[:, torch.tensor(padded, device=logits.device)].amax(dim=-1)


# --- the task ------------------------------------------------------------------------------------

def _model_wnids(train_root: Path) -> tuple[str, ...]:
    """The training classes: every class folder must be an ImageNet-1k wnid."""
    known = set(imagenet_wnids())
    folders = _class_folders(train_root, "ImageNet train")
    unknown = [f for f in folders if f not in known]
    if unknown:
        raise ValueError(f"ImageNet train: folder {train_root / unknown[0]} "
                         "is not an ImageNet-1k wnid")
    return tuple(folders)


def _heldout_split(n: int, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of train and held-out images: a seeded permutation of the sorted file list."""
    if n < 2:
        raise ValueError(f"ImageNet train: {n} image(s), too few to hold any out")
    n_held = min(n - 1, max(1, round(n * cfg.heldout_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def _train_heldout(root: Path, model: tuple[str, ...], cfg: DataConfig):
    paths, labels = _listing(root, _numbered(model))
    parts = []
    for name, idx in zip(("train", "heldout"), _heldout_split(len(paths), cfg)):
        idx = idx.tolist()
        part = [paths[i] for i in idx], [labels[i] for i in idx]
        parts.append(_split(name, *part, cfg.image_size))
    return tuple(parts)


def _numbered(names) -> dict[str, int]:
    return {n: i for i, n in enumerate(names)}


def _test(root: Path, model: tuple[str, ...], cfg: DataConfig) -> FolderSplit:
    """The official val set, as the reporting (test) split: it must have only training classes."""
    folders = _class_folders(root, "ImageNet val")
    extra = [f for f in folders if f not in set(model)]
    if extra:
        raise ValueError(f"ImageNet val: folder {root / extra[0]} is not a training class")
    return _split("test", *_listing(root, _numbered(model)), cfg.image_size)


def _by_wnid(root: Path, model: tuple[str, ...], cfg: DataConfig, *, name: str, what: str,
             subset=None) -> FolderSplit:
    """A shift in <wnid>/ folders; with `subset` (a function giving its wnids), labelled in and
    projected to those of its classes the model has."""
    classes = subset() if subset is not None else imagenet_wnids()
    bad = [f for f in _class_folders(root, what) if f not in set(classes)]
    if bad:
        raise ValueError(f"{what}: folder {root / bad[0]} is not one of its classes")
    position = _numbered(model)
    if subset is None:  # same classes as the model: labels are model indices, nothing to project
        return _split(name, *_listing(root, position), cfg.image_size)
    kept = [w for w in classes if w in position]  # label space: the subset's classes the model has
    project = SubsetProjection(tuple(position[w] for w in kept), len(model))
    return _split(name, *_listing(root, _numbered(kept)), cfg.image_size, project)


def _imagenetv2(root: Path, model: tuple[str, ...], cfg: DataConfig) -> FolderSplit:
    """ImageNetV2 names its folders by 1000-class index; map each to the model's class by wnid."""
    what, wnids, position = "ImageNetV2", imagenet_wnids(), _numbered(model)
    label_of = {}
    for f in _class_folders(root, what):
        if not (f.isdigit() and int(f) < len(wnids)):
            raise ValueError(f"{what}: folder {root / f} is not a class index 0..999")
        if wnids[int(f)] in position:
            label_of[f] = position[wnids[int(f)]]
    return _split("imagenetv2", *_listing(root, label_of), cfg.image_size)


def _objectnet(root: Path, model: tuple[str, ...], cfg: DataConfig) -> FolderSplit:
    """The ObjectNet classes with an ImageNet counterpart; images of the other 200 are dropped."""
    _class_folders(root, "ObjectNet")
    wnids, position = imagenet_wnids(), _numbered(model)
    groups = {}
    for folder, idx in objectnet_classes().items():
        members = tuple(position[wnids[i]] for i in idx if wnids[i] in position)
        if members:  # classes whose ImageNet counterparts the model lacks cannot be scored
            groups[folder] = members
    project = MaxProjection(tuple(groups.values()), len(model))
    return _split("objectnet", *_listing(root, _numbered(groups)), cfg.image_size, project,
                  OBJECTNET_BORDER)


_SHIFT_LOADERS = {  # name -> (folder under the data root, loader(root, model wnids, cfg))
    "imagenetv2": ("imagenetv2/imagenetv2-matched-frequency-format-val", _imagenetv2),
    "imagenet_r": ("imagenet-r", partial(_by_wnid, name="imagenet_r", what="ImageNet-R",
                                         subset=imagenet_r_wnids)),
    "imagenet_sketch": ("sketch", partial(_by_wnid, name="imagenet_sketch",
                                          what="ImageNet-Sketch")),
    "objectnet": ("objectnet-1.0/images", _objectnet),
    "imagenet_a": ("imagenet-a", partial(_by_wnid, name="imagenet_a", what="ImageNet-A",
                                         subset=imagenet_a_wnids)),
}


NAME = "imagenet"  # ``data.dataset`` of ImageNet
SHIFTS = tuple(_SHIFT_LOADERS)  # its five shift sets (and its default)


def load_imagenet_task(cfg: DataConfig) -> TaskData:
    """ImageNet train (less a seeded held-out slice), val as test, and the configured shifts.

    Only file listings are read here; images are decoded on demand by the splits' data sets.
    """
    if cfg.root is None:
        raise ValueError("data.root must name the data root for dataset 'imagenet'")
    wanted = SHIFTS if cfg.shifts is None else cfg.shifts
    unknown = [s for s in wanted if s not in _SHIFT_LOADERS]
    if unknown:  # corruptions (rotate, ...) are made by `orchestrator.data`, not here
        raise ValueError(f"shift {unknown[0]!r} is not an ImageNet shift set; "
                         f"choose from {', '.join(_SHIFT_LOADERS)}")
    root = _require(Path(cfg.root), "data root")
    model = _model_wnids(root / "imagenet" / "train")
    train, heldout = _train_heldout(root / "imagenet" / "train", model, cfg)
    test = _test(root / "imagenet" / "val", model, cfg)
    shifts = {}
    for s in wanted:
        folder, load = _SHIFT_LOADERS[s]
        shifts[s] = load(root / folder, model, cfg)
    names = imagenet_classnames()
    return TaskData(tuple(names[w] for w in model), train, heldout, test, shifts, source=cfg.root)
