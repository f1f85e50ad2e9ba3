"""The one table from data set name to the loader that builds its task.

Each data set lives in its own module (`tinyworld`, `imagenet`) and returns a `splits.TaskData`;
this module only chooses between them, so neither needs to know the other.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from . import imagenet, tinyworld
from .config import DataConfig
from .splits import TaskData

LOADERS: dict[str, Callable[[DataConfig], TaskData]] = {
    "tiny_digits": tinyworld.load_digits_task,
    "imagenet": imagenet.load_imagenet_task,
}


@lru_cache(maxsize=4)  # building a task renders and shifts images: callers in a process share it
def load_task(cfg: DataConfig) -> TaskData:
    """The train / held-out / test splits and the configured shifts of `cfg.dataset`."""
    load = LOADERS.get(cfg.dataset)
    if load is None:
        raise ValueError(f"unknown data set {cfg.dataset!r}; known: {', '.join(sorted(LOADERS))}")
    return load(cfg)
