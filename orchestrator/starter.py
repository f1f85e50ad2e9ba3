"""`soup init`: look at a user's data and write a starter search space for it.

`inspect` lists the data through its adapter (nothing trained, nothing logged), runs the same
trust checks a sweep runs (classes that agree, decodable images, no image in two splits: a
refusal is one line and exit 2), and measures what a person wants to know before a sweep: the
classes, images per split and per class, image sizes (on a sample), and which splits will be
carved from train. `starter_space` turns that into a search-space YAML: the data block, the class
names, prompt templates, the paper's search distributions for the model's family, resources for
``--gpus``, and a first line with the command that launches it.
"""

from __future__ import annotations

import datetime as dt
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from orchestrator import data
from orchestrator.config import TINY_ARCH, DataConfig, SearchSpace, validate
from orchestrator.data import folder as folder_adapter
from orchestrator.data import owntask, trust
from orchestrator.data.corruptions import CORRUPTIONS
from orchestrator.data.listing import Found
from orchestrator.train.models import arch_config

# CLIP's own generic prompts (a few of the OpenAI ImageNet templates): a user's classes are
# objects, not digits
TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
             "a photo of the small {}.", "itap of a {}.", "art of the {}.")

# The paper's random search (Wortsman et al. 2022, Appendix J; mlfoundations/model-soups
# hparam_info.json) for CLIP towers; the tiny tower's own scaled copy (search_spaces/tiny_digits.yaml)
PAPER_SEARCH = {
    "train.lr": {"loguniform": [1.0e-6, 1.0e-4]},
    "train.weight_decay": {"loguniform": [8.0e-5, 0.53]},
    "train.epochs": {"randint": [4, 16]},
    "train.augment": {"choice": ["none", "randaugment"], "weights": [0.4, 0.6]},
    "train.randaug_magnitude": {"randint": [0, 20]},
    "train.randaug_num_ops": {"randint": [0, 2]},
    "train.mixup_alpha": {"uniform": [0.0, 0.9], "p_off": 0.5, "off_value": 0.0},
    "train.label_smoothing": {"uniform": [0.0, 0.23], "p_off": 0.5, "off_value": 0.0},
    "train.seed": {"randint": [0, 1000000]},
}
TINY_SEARCH = {**PAPER_SEARCH, "train.lr": {"loguniform": [1.5e-4, 6.0e-4]},
               "train.epochs": {"randint": [6, 13]},
               "train.augment": {"choice": ["none", "light", "randaugment"], "weights": [0.4, 0.3, 0.3]}}


@dataclass(frozen=True)
class Inspection:
    """What `soup init` found in the data."""

    data: DataConfig
    found: Found
    per_class: dict[str, list[int]]  # split -> images per class (found splits only)
    carved: tuple[str, ...]  # splits that will be carved from train
    sizes: dict[str, tuple[int, int, int]]  # split -> (min, median, max) of the shorter side, sampled
    report: trust.Report

    def table(self) -> str:
        """A small table: per split, images, classes present, smallest and largest class, image sides."""
        rows = [("split", "images", "classes", "per class (min-max)", "shorter side (min/median/max)")]
        for name, counts in self.per_class.items():
            side = self.sizes.get(name)
            rows.append((name, f"{sum(counts):,}", f"{sum(1 for c in counts if c)}/{len(counts)}",
                         f"{min(counts)}-{max(counts)}", "/".join(map(str, side)) if side else "-"))
        for name in self.carved:
            frac = self.data.heldout_fraction if name == "heldout" else self.data.test_fraction
            rows.append((name, f"carved: {frac:.0%} of train", "", "", ""))
        width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows)


def guess_data(where: str, root: str | None = None, **data) -> DataConfig:
    """The data block for `where`: a folder of ``train/<class>/``, a Hugging Face data set on disk
    (``save_to_disk`` folder, parquet) or ``hf:<hub id>``, or ``torchvision:<class>`` (files under
    `root`)."""
    if where.startswith("torchvision:"):
        return DataConfig(dataset="torchvision", source=where.split(":", 1)[1], root=root or "data", **data)
    if where.startswith("hf:"):
        return DataConfig(dataset="huggingface", source=where.split(":", 1)[1], **data)
    path = Path(where).expanduser()
    if (path / "train").is_dir() and not (path / "dataset_dict.json").exists():
        return DataConfig(dataset=folder_adapter.NAME, root=str(path.resolve()), **data)
    if path.exists():
        return DataConfig(dataset="huggingface", source=str(path.resolve()), **data)
    raise trust.DataError(f"{where}: no such folder or file (give a folder with train/<class>/, a "
                          f"Hugging Face data set on disk, hf:<hub id> or torchvision:<class>)")


def data_name(cfg: DataConfig) -> str:
    """A short name for the data: a folder's name, else the data set's (`FashionMNIST`, a hub
    id's or a saved set's last part); it names the space file and the experiment."""
    where = cfg.root if cfg.dataset == folder_adapter.NAME else cfg.source
    return Path(str(where)).name or "my-task"


def inspect(cfg: DataConfig, sample: int = 200, progress=None) -> Inspection:
    """List, check and measure `cfg`'s data (raises `trust.DataError` on what a sweep refuses)."""
    found = data.find(cfg)
    report = trust.check_found(found, cfg.skip_unreadable, cache_dir=owntask.cache_dir(), progress=progress)
    per_class = {name: np.bincount(np.asarray(s.labels, dtype=np.int64), minlength=len(found.train.classes)).tolist()
                 for name, s in found.splits().items()}
    carved = tuple(s for s in ("heldout", "test") if s not in per_class)
    rng = np.random.default_rng(0)
    sizes = {}
    for name, s in found.splits().items():
        readable = trust.kept(len(s.labels), report.unreadable.get(name, ()))
        pick = rng.choice(readable, size=min(sample, len(readable)), replace=False)
        sides = sorted(min(s.reader.open(int(i)).size) for i in pick)
        sizes[name] = (sides[0], sides[len(sides) // 2], sides[-1])
    return Inspection(cfg, found, per_class, carved, sizes, report)


def image_size(arch: str) -> int:
    """The input side the architecture's image tower expects."""
    size = arch_config(arch)["vision_cfg"].get("image_size", 224)
    return size if isinstance(size, int) else int(size[0])


def launch_command(path: Path, gpus: int) -> str:
    """How the written space is swept: on a Ray cluster with GPUs, else here."""
    sweep = f"soup sweep {shlex.quote(str(path))}"
    return f"ray job submit --working-dir . -- {sweep}" if gpus else sweep


def starter_space(insp: Inspection, path: Path, arch: str, pretrained: str | None, gpus: int) -> str:
    """The search-space YAML text for `insp`'s data (see the module docstring)."""
    cfg = insp.data
    names = list(cfg.classnames or insp.found.display)
    data = {k: v for k, v in cfg.model_dump(mode="json", exclude_defaults=True).items()}
    data.update({"image_size": image_size(arch), "split_seed": cfg.split_seed,
                 "heldout_fraction": cfg.heldout_fraction, "test_fraction": cfg.test_fraction,
                 "shifts": list(CORRUPTIONS), "classnames": names})
    tiny = arch == TINY_ARCH
    train = {"batch_size": 512 if gpus else 64, "warmup_steps": 500 if gpus else 10,
             "device": "cuda" if gpus else "cpu"}
    resources = {"workers": 1, "cpu": 8, "gpu": 1} if gpus else {"workers": 1, "cpu": 1, "gpu": 0}
    exp = data_name(cfg).lower().replace(" ", "-")
    space = {
        "base": {"model": {"arch": arch, "pretrained": pretrained, "head_init": "zeroshot",
                           "templates": list(TEMPLATES)},
                 "data": data, "train": train},
        "search": TINY_SEARCH if tiny else PAPER_SEARCH,
        "sweep": {"num_samples": 32 if gpus else 8, "search_alg": "random", "scheduler": "none",
                  "max_concurrent_trials": max(1, gpus) if gpus else 2, "resources": resources,
                  "max_failures": 1, "seed": 0},
        "tracking": {"experiment_name": exp, "registered_model": f"{exp}-soup"},
    }
    validate(SearchSpace, space, str(path))  # what it writes, the sweep loads
    launch = launch_command(path, gpus)
    counts = ", ".join(f"{trust.words(n)} {sum(c):,}" for n, c in insp.per_class.items())
    carved = f"; {' and '.join(map(trust.words, insp.carved))} carved from train" if insp.carved else ""
    head = [f"# {launch}", "#",
            f"# Written by soup init on {dt.date.today().isoformat()} for {insp.found.source}:",
            f"# {len(names)} classes; images: {counts}{carved}.",
            "# Search distributions: the paper's (Wortsman et al. 2022, Appendix J)"
            + (", scaled for the tiny tower." if tiny else "."),
            "# Edit anything before the first sweep, e.g. the class names the prompts use (data.classnames)."]
    return "\n".join(head) + "\n" + yaml.safe_dump(space, sort_keys=False, allow_unicode=True, width=1000, default_flow_style=None)


def write_space(insp: Inspection, path: Path, arch: str, pretrained: str | None, gpus: int) -> Path:
    """Write `starter_space` to `path` (refusing to overwrite a file)."""
    if path.exists():
        raise trust.DataError(f"{path} exists: choose another --out, or remove it first")
    text = starter_space(insp, path, arch, pretrained, gpus)
    path.write_text(text, encoding="utf-8")
    return path
