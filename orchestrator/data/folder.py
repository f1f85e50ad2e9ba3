"""A user's own images in torchvision's ImageFolder layout (`dataset: folder`).

    <root>/train/<class>/*.jpg        required
    <root>/heldout/<class>/*.jpg      optional (else carved from train: seeded, stratified)
    <root>/test/<class>/*.jpg         optional (likewise)
    <root>/classes.json               optional: {"<class folder>": "display name", ...}
    <root>/classes.txt                optional: one "<class folder> <display name>" per line

Class folders are sorted by name; a class's label is its index among train's class folders.
Without a classes file the folder names are the display names (underscores read as spaces).
A shift is another folder of class folders (`{name: sketches, root: /data/pets_sketch}`), with
the task's classes or a subset of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestrator.config import DataConfig, ShiftSpec
from orchestrator.data.listing import IMAGE_EXTENSIONS, FileReader, Found, Listing

NAME = "folder"
SPLIT_FOLDERS = ("train", "heldout", "test")


def _classes(folder: Path) -> tuple[str, ...]:
    """The class folders of a split folder, sorted (hidden entries and loose files skipped)."""
    return tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")))


def listing(name: str, folder: Path) -> Listing:
    """Every image under `folder`/<class>/, sorted by class then file name."""
    if not folder.is_dir():
        raise ValueError(f"data.root: no folder {folder}")
    classes = _classes(folder)
    paths: list[str] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        files = sorted(e.name for e in os.scandir(folder / c)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith("."))
        paths += [str(folder / c / f) for f in files]
        labels += [k] * len(files)
    if not classes:
        raise ValueError(f"{folder}: no class folders in it (expected {folder}/<class>/<image>)")
    return Listing(name, FileReader(tuple(paths)), tuple(labels), classes)


def display_names(root: Path, classes: tuple[str, ...]) -> tuple[str, ...]:
    """Each class folder's display name, from classes.json or classes.txt under `root`, else
    the folder name with underscores as spaces."""
    names: dict[str, str] = {}
    if (root / "classes.json").is_file():
        try:
            names = json.loads((root / "classes.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{root / 'classes.json'}: not a JSON object of folder -> name ({err})") from None
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise ValueError(f"{root / 'classes.json'}: not a JSON object of folder -> name")
    elif (root / "classes.txt").is_file():
        for n, line in enumerate((root / "classes.txt").read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                folder, _, name = line.strip().partition(" ")
                names[folder] = name.strip() or folder
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{root}: the classes file names folders that are not classes of train: {unknown[:5]}")
    return tuple(names.get(c, c.replace("_", " ")) for c in classes)


def find(cfg: DataConfig) -> Found:
    """The splits under ``data.root`` (train required; heldout and test when present)."""
    if cfg.root is None:
        raise ValueError("data.root must name the folder that holds train/<class>/ for dataset 'folder'")
    root = Path(cfg.root).expanduser()
    if not (root / "train").is_dir():
        raise ValueError(f"data.root: {root} has no train/ folder (expected {root}/train/<class>/<image>)")
    found = {s: listing(s, root / s) for s in SPLIT_FOLDERS if (root / s).is_dir()}
    train = found["train"]
    return Found(train, found.get("heldout"), found.get("test"), display_names(root, train.classes),
                 source=str(root))


def find_shift(cfg: DataConfig, spec: ShiftSpec) -> Listing:
    """A shift folder of class folders (the task's classes or a subset)."""
    if spec.root is None:
        raise ValueError(f"shift {spec.name!r}: a folder data set's shift needs a root (a folder of class folders)")
    return listing(spec.name, Path(spec.root).expanduser())
