"""Data: the one table from data set name to the adapter that builds its task.

Each data set lives in its own module and names itself (``NAME``): the tiny world (`digits`),
ImageNet with its five shift sets (`imagenet`), and a user's own images (`folder`, `tvsets` for
``torchvision.datasets``, `hfsets` for Hugging Face ``datasets``), whose adapters only list what
is there (`listing`) and leave checking (`trust`), carving and sizing (`owntask`) to shared code.
Shifts are per task: the named shift sets a data set offers, a synthetic corruption of any task's
test split (`corruptions`), or another data set of the task's classes. This module only chooses,
so no adapter knows another, and says what a task's splits are (`describe`: name, role, digest,
source) for tracking to log as datasets. `images` encodes images as a client sends them.

May import: config, hashing (and torch, torchvision, PIL, scikit-learn, datasets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import torch

from orchestrator.config import DataConfig, ShiftSpec
from orchestrator.data import digits, folder, hfsets, imagenet, owntask, tvsets
from orchestrator.data.corruptions import CORRUPTIONS, Corrupted, corrupt
from orchestrator.data.listing import Found
from orchestrator.data.splits import (
    FolderSplit,
    Split,
    TaskData,
    TensorSplit,
    fingerprint,
)
from orchestrator.data.trust import DataError

SHIFT_SEED_OFFSET = 1000  # corruptions draw from their own stream, independent of the split seed


@dataclass(frozen=True)
class Adapter:
    """How a data set is loaded and which shifts it takes."""

    load: Callable[[DataConfig, tuple], TaskData]  # (config, its named shifts) -> task
    shifts: tuple[str, ...]  # the shift sets it offers by name
    defaults: tuple[str, ...]  # its shifts when ``data.shifts`` is not given
    shift_sets: bool  # takes shift data sets of its own kind ({name, root | source})


def _own(module, cfg: DataConfig, named: tuple) -> TaskData:
    return owntask.build(module.find(cfg), cfg, {s.name: (s, module.find_shift(cfg, s)) for s in named})


def _named(load, cfg: DataConfig, named: tuple) -> TaskData:
    return load(cfg.model_copy(update={"shifts": named}))


OWN = {m.NAME: m for m in (folder, tvsets, hfsets)}  # a user's own data: listed, then `owntask`
ADAPTERS: dict[str, Adapter] = {
    digits.NAME: Adapter(partial(_named, digits.load_digits_task), digits.SHIFTS, digits.SHIFTS, False),
    imagenet.NAME: Adapter(partial(_named, imagenet.load_imagenet_task), imagenet.SHIFTS, imagenet.SHIFTS, False),
    **{name: Adapter(partial(_own, m), (), CORRUPTIONS, True) for name, m in OWN.items()},
}


DEFAULT = digits.NAME  # the data set of a config that names none: the embedded tiny world


def name_of(cfg: DataConfig) -> str:
    """The data set `cfg` names (`DEFAULT` when it names none)."""
    return cfg.dataset or DEFAULT


def find(cfg: DataConfig) -> Found:
    """What a user's own data set holds, listed by its adapter (nothing decoded, nothing checked)."""
    if name_of(cfg) not in OWN:
        raise DataError(f"data.dataset: {name_of(cfg)!r} is not a user's own data set; those are "
                        f"{', '.join(OWN)}")
    return OWN[name_of(cfg)].find(cfg)


def adapter(cfg: DataConfig) -> Adapter:
    a = ADAPTERS.get(name_of(cfg))
    if a is None:
        raise DataError(f"data.dataset: unknown data set {name_of(cfg)!r}; known: {', '.join(ADAPTERS)}")
    return a


def plan(cfg: DataConfig) -> tuple[tuple, list[tuple[int, ShiftSpec]]]:
    """The configured shifts split into those the adapter makes (its named sets, or shift data
    sets) and the corruptions made here, each with its position; refuses a shift the data set
    cannot make, naming the ones it can. Reads no data."""
    a = adapter(cfg)
    named, corrupted = [], []
    for i, s in enumerate(a.defaults if cfg.shifts is None else cfg.shifts):
        if isinstance(s, str) and s in a.shifts:
            named.append(s)
        elif isinstance(s, str) and s in CORRUPTIONS:
            corrupted.append((i, ShiftSpec(name=s, corruption=s)))
        elif isinstance(s, str):
            offers = [*a.shifts, *CORRUPTIONS]
            raise DataError(f"data.shifts: {s!r} is not a shift of data set {name_of(cfg)!r}; it offers "
                            f"{', '.join(offers)}" + (", or a shift data set ({name, root or source})"
                                                      if a.shift_sets else ""))
        elif s.corruption is not None:
            if s.corruption not in CORRUPTIONS:
                raise DataError(f"data.shifts: shift {s.name!r}: unknown corruption {s.corruption!r}; "
                                f"known: {', '.join(CORRUPTIONS)}")
            corrupted.append((i, s))
        elif not a.shift_sets:
            raise DataError(f"data.shifts: shift {s.name!r}: data set {name_of(cfg)!r} takes no shift data sets; "
                            f"its shifts are {', '.join([*a.shifts, *CORRUPTIONS])}")
        else:
            named.append(s)
    return tuple(named), corrupted


def check_config(cfg: DataConfig) -> None:
    """Refuse a data set or shift that does not exist, without reading any data."""
    plan(cfg)


def corrupted(test: Split, spec: ShiftSpec, seed: int) -> Split:
    """The test split under `spec`'s corruption (in memory for a tensor split, on read for files)."""
    if isinstance(test, TensorSplit):
        x = torch.stack([corrupt(spec.corruption, img, spec.severity, seed, i) for i, img in enumerate(test.images)])
        return TensorSplit(spec.name, x, test.labels, test.project)
    return FolderSplit(spec.name, Corrupted(test.dataset, spec.corruption, spec.severity, seed), test.labels,
                       test.project)


def load_task(cfg: DataConfig) -> TaskData:
    """The train / held-out / test splits and the configured shifts of `cfg.dataset`, checked
    (a user's own data: `owntask`), in the configured order."""
    if name_of(cfg) == tvsets.NAME and not cfg.root:  # the default root is the environment's cache
        cfg = cfg.model_copy(update={"root": str(tvsets.default_root())})
    return _load_task(cfg)


@lru_cache(maxsize=4)  # building a task renders and shifts images: callers in a process share it
def _load_task(cfg: DataConfig) -> TaskData:
    named, corrupt_specs = plan(cfg)
    task = adapter(cfg).load(cfg, named)
    made = {i: (s.name, corrupted(task.test, s, cfg.split_seed + SHIFT_SEED_OFFSET + i)) for i, s in corrupt_specs}
    order = [s if isinstance(s, str) else s.name for s in (adapter(cfg).defaults if cfg.shifts is None else cfg.shifts)]
    shifts = {**task.shifts, **dict(made.values())}
    return TaskData(task.classnames, task.train, task.heldout, task.test, {n: shifts[n] for n in order},
                    source=task.source)


@dataclass(frozen=True)
class SplitInfo:
    """What a run was trained, selected or measured on, as tracking logs it (a dataset input)."""

    name: str  # ``<data set>/<split>``, e.g. ``folder/heldout``
    role: str  # train, heldout, test or shift (MLflow's dataset context)
    split: str  # the split's key: train, heldout, test or the shift's name
    digest: str
    source: str  # where the data comes from: a folder, a data set, or the generator in code
    rows: int


def describe(cfg: DataConfig, task: TaskData) -> list[SplitInfo]:
    """Every split of `task` (train, held-out, test, each shift) as a `SplitInfo`."""
    name = name_of(cfg)
    source = task.source or cfg.root or name
    roles = {"train": task.train, "heldout": task.heldout, "test": task.test}
    out = [SplitInfo(f"{name}/{k}", k, k, fingerprint(s), source, len(s)) for k, s in roles.items()]
    out += [SplitInfo(f"{name}/{k}", "shift", k, fingerprint(s), source, len(s))
            for k, s in task.shifts.items()]
    return out
