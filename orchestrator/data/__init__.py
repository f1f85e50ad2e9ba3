"""Data: the one table from data set name to the loader that builds its task.

Each data set lives in its own module (`digits`, the tiny world; `imagenet`) and returns a
`splits.TaskData`; this module only chooses between them, so neither needs to know the other, and
says what a task's splits are (`describe`: name, role, digest, source) for tracking to log as
datasets. `images` encodes images as a client sends them.

May import: config, hashing (and torch, torchvision, PIL, scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from orchestrator.config import DataConfig
from orchestrator.data import digits
from orchestrator.data import imagenet
from orchestrator.data.splits import TaskData, fingerprint

LOADERS: dict[str, Callable[[DataConfig], TaskData]] = {
    "tiny_digits": digits.load_digits_task,
    "imagenet": imagenet.load_imagenet_task,
}


@lru_cache(maxsize=4)  # building a task renders and shifts images: callers in a process share it
def load_task(cfg: DataConfig) -> TaskData:
    """The train / held-out / test splits and the configured shifts of `cfg.dataset`."""
    load = LOADERS.get(cfg.dataset)
    if load is None:
        raise ValueError(f"unknown data set {cfg.dataset!r}; known: {', '.join(sorted(LOADERS))}")
    return load(cfg)


@dataclass(frozen=True)
class SplitInfo:
    """What a run was trained, selected or measured on, as tracking logs it (a dataset input)."""

    name: str  # e.g. ``tiny_digits/heldout``
    role: str  # train, heldout, test or shift (MLflow's dataset context)
    split: str  # the split's key: train, heldout, test or the shift's name
    digest: str
    source: str  # where the data comes from: a folder, or the generator in code
    rows: int


def describe(cfg: DataConfig, task: TaskData) -> list[SplitInfo]:
    """Every split of `task` (train, held-out, test, each shift) as a `SplitInfo`."""
    source = cfg.root or ("sklearn.datasets.load_digits (orchestrator/data/digits.py, split seed "
                          f"{cfg.split_seed})" if cfg.dataset == "tiny_digits" else cfg.dataset)
    roles = {"train": task.train, "heldout": task.heldout, "test": task.test}
    out = [SplitInfo(f"{cfg.dataset}/{k}", k, k, fingerprint(s), source, len(s)) for k, s in roles.items()]
    out += [SplitInfo(f"{cfg.dataset}/{k}", "shift", k, fingerprint(s), source, len(s))
            for k, s in task.shifts.items()]
    return out
