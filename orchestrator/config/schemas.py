"""Pydantic schemas for the model, the data and the fine-tuning hyperparameters, and the tiny
world's asset constants.

Every schema is frozen and forbids unknown keys, so a typo in a YAML file is an error rather than
a silently ignored setting.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.config.loading import FieldError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_ARCH = "tiny-clip-glyphs"
TINY_PRETRAINED = "tiny-glyphs"  # a tag resolved by `models` to the committed base checkpoint
DEFAULT_TEMPLATES = (  # prompts in the style of the tiny world's pretraining captions
    "a photo of the digit {}.",
    "the number {}.",
    "a low resolution photo of the digit {}.",
    "a blurry digit {}.",
)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(Frozen):
    """Which CLIP to start from and how to build the classification head."""

    arch: str = TINY_ARCH
    pretrained: str | None = TINY_PRETRAINED
    head_init: Literal["zeroshot", "linear_probe"] = "zeroshot"
    # linear_probe: the number of training images the probe is fitted on, drawn class-stratified
    # (every class present) and held as features, not images
    probe_images: int = Field(50_000, ge=1, le=10_000_000)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    @model_validator(mode="after")
    def _templates_have_slot(self) -> "ModelConfig":
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' slot for the class name")
        return self


NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a split's name: a metric key, a folder, a dataset name


class ShiftSpec(Frozen):
    """A distribution shift given in full (a bare name in ``data.shifts`` is a shift the data set
    itself offers, or a corruption at `severity` 3): a synthetic corruption of the task's test
    split at a severity, or images of the task's classes (or a subset of them) from a folder
    (`root`) or a data set of the task's adapter (`source`, with its `split`)."""

    name: str = Field(pattern=NAME)
    corruption: str | None = None  # one of data/corruptions.py's CORRUPTIONS
    severity: int = Field(3, ge=1, le=5)
    root: str | None = None
    source: str | None = None
    split: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "ShiftSpec":
        given = [k for k in ("corruption", "root", "source") if getattr(self, k) is not None]
        if given not in (["corruption"], ["root"], ["source"], ["root", "source"]):
            raise ValueError(f"shift {self.name!r}: give a corruption, or a root (a folder) and/or a "
                             f"source (a data set) of the task's classes (got {given or 'none'})")
        return self


class DataConfig(Frozen):
    """The data set and its fixed splits. `heldout` selects soups; `test` and shifts report.

    `dataset` names an adapter (`orchestrator.data.ADAPTERS`): the tiny world, ImageNet, or a
    user's own images (`folder`, `torchvision`, `huggingface`); which names and shifts exist is
    the data package's knowledge, checked by `orchestrator.data.check_config`."""

    dataset: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]{0,63}$")  # None: the embedded tiny world
    root: str | None = None  # a folder: the data root (ImageNet, a folder of class folders, torchvision's root)
    source: str | None = None  # torchvision: a data set class (FashionMNIST); huggingface: a hub id or local path
    download: bool = False  # torchvision: fetch the files when they are missing (needs the network)
    image_column: str = "image"  # huggingface: the image and label columns
    label_column: str = "label"
    skip_unreadable: bool = False  # skip (and count) images that cannot be decoded, instead of refusing
    # a user's own data: the classes' names in prompts and predictions, in label order (the
    # sorted class folders, the data set's own order); default: the names the data set gives
    classnames: tuple[str, ...] | None = None
    image_size: int = Field(224, ge=8, le=1024)  # files: resize + centre crop to this
    workers: int = Field(0, ge=0, le=64)  # files: DataLoader worker processes
    split_seed: int = 0
    heldout_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    # a user's own data: only train's images start..stop-1 (in the data set's order) are used at
    # all, e.g. when the others pretrained the base; then fine-tune on a seeded, stratified subset
    # of `train_size` of what is left once held-out and test are carved (None: all of it)
    train_range: tuple[int, int] | None = None
    train_size: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.3, gt=0.0, lt=0.8)
    selection_split: Literal["heldout", "test", "train"] = "heldout"
    reporting_splits: tuple[str, ...] = ("test",)
    shifts: tuple[str | ShiftSpec, ...] | None = None  # None: the data set's own default shifts

    @model_validator(mode="after")
    def _selection_not_reporting(self) -> "DataConfig":
        if self.selection_split in self.reporting_splits:
            raise FieldError("selection_split", (
                f"selection split {self.selection_split!r} is also a reporting split "
                f"(reporting_splits {list(self.reporting_splits)}); "
                "soups must be selected on data they are not reported on"))
        names = [s if isinstance(s, str) else s.name for s in self.shifts or ()]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise FieldError("shifts", f"shift names must be unique: {twice} given twice")
        if self.train_range is not None and not 0 <= self.train_range[0] < self.train_range[1]:
            raise FieldError("train_range", f"train_range {list(self.train_range)} is not [start, stop] with 0 <= start < stop")
        if self.heldout_fraction + self.test_fraction >= 0.9:
            raise FieldError("test_fraction", "heldout_fraction + test_fraction leaves under 10% to train on")
        return self

    def shift_names(self) -> tuple[str, ...] | None:
        """The configured shifts' names (None: the data set's defaults)."""
        return None if self.shifts is None else tuple(s if isinstance(s, str) else s.name for s in self.shifts)


class TrainConfig(Frozen):
    """Fine-tuning hyperparameters: the things a sweep varies."""

    lr: float = Field(3e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    epochs: int = Field(8, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=65536)  # the global batch, split across a trial's workers
    # images per forward pass on one worker; the worker accumulates gradients over
    # batch_size / workers / micro_batch_size passes (None: one pass per step)
    micro_batch_size: int | None = Field(None, ge=1, le=65536)
    grad_checkpointing: bool = False  # recompute the tower's activations in backward (large towers)
    checkpoint_every_steps: int | None = Field(None, ge=1)  # a checkpoint also every N steps
    log_every_steps: int = Field(10, ge=1)  # train_loss, lr and images/s every N steps
    warmup_steps: int = Field(20, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    mixup_alpha: float = Field(0.0, ge=0.0, le=10.0)
    augment: Literal["none", "randaugment", "light"] = "light"
    randaug_num_ops: int = Field(2, ge=0, le=10)
    randaug_magnitude: int = Field(9, ge=0, le=30)
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")  # auto: cuda when present
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 (or fp16) on cuda
    channels_last: bool = True  # on cuda only: NHWC convolutions (the patch embedding, ResNets)


class FinetuneConfig(Frozen):
    """One fine-tuning run: model, data and hyperparameters."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
