"""Pydantic schemas for the model, the data and the fine-tuning hyperparameters, loaded from YAML.

Every schema is frozen and forbids unknown keys, so a typo in a YAML file is an error rather than
a silently ignored setting. `load_yaml` turns pydantic's errors into a `ConfigError` whose message
names the file and the dotted key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_ARCH = "tiny-clip-glyphs"
TINY_PRETRAINED = "tiny-glyphs"  # a tag resolved by `models` to the committed base checkpoint
DEFAULT_TEMPLATES = (  # prompts in the style of the tiny world's pretraining captions
    "a photo of the digit {}.",
    "the number {}.",
    "a low resolution photo of the digit {}.",
    "a blurry digit {}.",
)


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and the key."""


class FieldError(ValueError):
    """Raised by a model validator to blame a key below the model (``key`` is relative to it),
    so that the message names ``data.selection_split`` rather than just ``data``."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


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


IMAGENET_SHIFTS = ("imagenetv2", "imagenet_r", "imagenet_sketch", "objectnet", "imagenet_a")
TINY_SHIFTS = ("rotate", "noise", "blur", "invert", "rendered")


def _shifts_of(dataset: str) -> list[str]:
    return list(IMAGENET_SHIFTS if dataset == "imagenet" else TINY_SHIFTS)


class DataConfig(Frozen):
    """The data set and its fixed splits. `heldout` selects soups; `test` and shifts report."""

    dataset: Literal["tiny_digits", "imagenet"] = "tiny_digits"
    root: str | None = None  # data root for folder-based data sets (ImageNet and its shifts)
    image_size: int = Field(224, ge=8, le=1024)  # folder data sets: resize + centre crop to this
    workers: int = Field(0, ge=0, le=64)  # folder data sets: DataLoader worker processes
    split_seed: int = 0
    heldout_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.3, gt=0.0, lt=0.8)
    selection_split: Literal["heldout", "test", "train"] = "heldout"
    reporting_splits: tuple[str, ...] = ("test",)
    shifts: tuple[Literal["rotate", "noise", "blur", "invert", "rendered", "imagenetv2", "imagenet_r",
                          "imagenet_sketch", "objectnet", "imagenet_a"], ...] = (
        "rotate", "noise", "blur", "invert", "rendered")

    @model_validator(mode="after")
    def _selection_not_reporting(self) -> "DataConfig":
        if self.selection_split in self.reporting_splits:
            raise FieldError("selection_split", (
                f"selection split {self.selection_split!r} is also a reporting split "
                f"(reporting_splits {list(self.reporting_splits)}); "
                "soups must be selected on data they are not reported on"))
        wrong = [s for s in self.shifts if (s in IMAGENET_SHIFTS) != (self.dataset == "imagenet")]
        if wrong:
            raise FieldError("shifts", f"shifts {wrong} do not belong to data set {self.dataset!r}; "
                                       f"its shifts are {_shifts_of(self.dataset)}")
        if self.heldout_fraction + self.test_fraction >= 0.9:
            raise FieldError("test_fraction", "heldout_fraction + test_fraction leaves under 10% to train on")
        return self


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


S = TypeVar("S", bound=BaseModel)


def one_line(text: str) -> str:
    """`text` with its lines joined by '; ' (error messages are printed as one line)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _error_key(e: dict) -> str:
    loc = [str(p) for p in e["loc"]]
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        loc.append(cause.key)
    return ".".join(loc)


def _error_text(e: dict) -> str:
    msg = one_line(e["msg"]).removeprefix("Value error, ")
    key = _error_key(e)
    return f"key '{key}': {msg}" if key else msg


def _format_errors(source: str, err: ValidationError) -> str:
    """All of pydantic's errors on one line: ``file: key 'a.b': why; key 'c': why``."""
    return f"{source}: " + "; ".join(_error_text(e) for e in err.errors())


def validate(schema: type[S], data: Any, source: str = "<config>") -> S:
    """Validate `data` against `schema`, raising `ConfigError` that names `source` and each key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


# A search space or a fine-tuning config is a few KB and a few hundred YAML nodes. The limits stop
# a wrong file (a data set, a binary) and a YAML bomb before they cost memory or time.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # after expanding aliases


def read_yaml(path: str | Path) -> Any:
    """Read a YAML config file, turning every way it can be unusable into a `ConfigError` naming
    it: missing, a folder, unreadable, over `MAX_YAML_BYTES`, not UTF-8, not YAML, a YAML bomb,
    or empty (a given file that holds nothing is a mistake, not a request for the defaults)."""
    path = Path(path)
    data = parse_yaml(_read_text(path), str(path))
    if data is None:
        raise ConfigError(f"{path}: no settings in it (the file is empty, only comments, or null)")
    return data


def _read_text(path: Path) -> str:
    """The file's text, read no further than one byte past the size limit (so that neither a huge
    file nor an endless one such as a FIFO is read into memory)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: refused: larger than {MAX_YAML_BYTES // 2**20} MB "
                          "(a config is a few KB); is it the right file?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                          f"{err.start}); save it as UTF-8") from None


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document parsed with the safe loader, or None when there is none (empty text,
    only comments, or null); every problem is a `ConfigError` naming `source`.

    Aliases are counted before they are expanded: the document is first composed into a node
    graph, in which an alias is its anchored node itself, and the graph's expanded size is checked
    against `MAX_YAML_NODES` before any Python object is built. A few hundred bytes of nested
    aliases (a "billion laughs") would otherwise grow to gigabytes inside `yaml.safe_load`.
    """
    try:
        return _load_checked(text, source)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except ConfigError:
        raise
    except ValueError as err:  # a scalar the constructor cannot convert (an int of 5,000 digits)
        raise ConfigError(f"{source}: not valid YAML: {one_line(str(err))}") from None


def _load_checked(text: str, source: str) -> Any:
    """Compose, check the expanded size, then construct (what `yaml.safe_load` does, checked)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _Recursive(Exception):
    """An alias inside its own anchor: the document is an infinite structure."""


def _check_expanded_size(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand it past `MAX_YAML_NODES`, or into itself."""
    try:
        size = _expanded_size(root, {}, set())
    except _Recursive:
        raise ConfigError(f"{source}: refused: an alias refers to its own anchor "
                          "(an endless structure)") from None
    if size > MAX_YAML_NODES:
        raise ConfigError(f"{source}: refused: its aliases expand it to {size:,} YAML nodes "
                          f"(limit {MAX_YAML_NODES:,}); a config needs a few hundred")


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in `node` with every alias expanded. A shared node is measured once (`sizes`) and
    counted at each reference, so the cost is the graph's size, not the expansion's; `open_`
    holds the nodes being measured, to detect a cycle."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise _Recursive
    if isinstance(node, yaml.ScalarNode):
        children = []
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = [part for pair in node.value for part in pair]
    open_.add(key)
    sizes[key] = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    return sizes[key]


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return one_line(str(err))


def load_yaml(schema: type[S], path: str | Path) -> S:
    """Load and validate a YAML file; errors name the file and the key."""
    return validate(schema, read_yaml(path), str(path))


def with_overrides(cfg: S, overrides: dict[str, Any], source: str = "<overrides>") -> S:
    """Return a copy of `cfg` with dotted-key overrides (``train.lr``) applied and re-validated."""
    data = cfg.model_dump()
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"{source}: key '{key}': no such section '{p}'")
            node = node[p]
        node[parts[-1]] = value
    return validate(type(cfg), data, source)


# --- sweeps -----------------------------------------------------------------------------------

class Distribution(Frozen):
    """One searched hyperparameter: exactly one of the sampling forms, optionally switched off.

    ``randint`` bounds are inclusive. ``p_off`` is the probability that the value is ``off_value``
    instead (the paper's "mixup in about half the runs, else off").
    """

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: tuple[Any, ...] | None = None
    weights: tuple[float, ...] | None = None
    grid: tuple[Any, ...] | None = None
    p_off: float = Field(0.0, ge=0.0, le=1.0)
    off_value: Any = None

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "randint", "choice", "grid")
                    if getattr(self, k) is not None)

    @model_validator(mode="after")
    def _exactly_one_valid_form(self) -> "Distribution":
        forms = [k for k in ("loguniform", "uniform", "randint", "choice", "grid")
                 if getattr(self, k) is not None]
        if len(forms) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, randint, choice, grid (got {forms or 'none'})")
        kind = forms[0]
        if kind in ("loguniform", "uniform", "randint"):
            lo, hi = getattr(self, kind)
            if (lo > hi) if kind == "randint" else (lo >= hi):
                raise ValueError(f"{kind} range [{lo}, {hi}] is empty")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs a positive lower bound, got {lo}")
        elif not getattr(self, kind):
            raise ValueError(f"{kind} needs at least one value")
        if self.weights is not None and (kind != "choice" or len(self.weights) != len(self.choice)):
            raise ValueError("weights need a choice of the same length")
        if self.p_off and kind == "grid":
            raise ValueError("p_off cannot switch off a grid axis")
        return self


class Resources(Frozen):
    """Resources of one trial: its number of training workers (DDP processes) and what each
    worker reserves; fractional GPUs pack several one-worker trials on one device."""

    workers: int = Field(1, ge=1, le=4096)
    cpu: float = Field(1.0, gt=0)  # per worker
    gpu: float = Field(0.0, ge=0)  # per worker

    @model_validator(mode="after")
    def _whole_gpus_when_distributed(self) -> "Resources":
        if self.workers > 1 and self.gpu and self.gpu != int(self.gpu):
            raise FieldError("gpu", f"a trial of {self.workers} workers needs whole GPUs per worker "
                                    f"(got {self.gpu:g}): DDP puts one process on each device")
        return self


class SweepSettings(Frozen):
    """How Ray Tune runs the search."""

    num_samples: int = Field(8, ge=1, le=100000)
    search_alg: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["none", "asha"] = "none"
    max_concurrent_trials: int = Field(2, ge=1)
    resources: Resources = Resources()
    storage_path: str | None = None
    max_failures: int = Field(0, ge=0)
    seed: int = 0
    # The most trials one sweep may make (num_samples times every grid combination): a space
    # that asks for millions is a mistake to refuse, not a sweep to start.
    max_trials: int = Field(10000, ge=1)
    # On a cluster (RAY_ADDRESS) whose nodes cannot yet run one trial: true starts the sweep and
    # waits for the autoscaler to add a node; false refuses it. A local Ray is always refused.
    autoscale: bool = False


class TrackingSettings(Frozen):
    """Where MLflow records the sweep."""

    experiment_name: str = Field("tiny-digits", min_length=1)
    registered_model: str | None = None


# How the learned soup may get its gradients in a cook (the schema, `soup cook --learned-mode` and
# the learned recipe all take this one list).
LEARNED_MODES = ("streaming", "stacked")


class CookResources(Frozen):
    """What the cook's build task reserves (`soup cook --cpus/--gpus/--memory-gib` override it):
    its CPUs size torch's threads and the loaders' workers; with a GPU the soups are built and
    evaluated on it. Its own, not the trials': a cook needs one device, however many a trial used."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0, le=1)
    memory_gib: float = Field(0.0, ge=0)  # 0: no memory reservation


class CookSettings(Frozen):
    """How the cook builds the soups of this sweep (`soup cook --learned-mode` overrides it)."""

    resources: CookResources = CookResources()

    # streaming: each coefficient's gradient accumulated ingredient by ingredient from the files,
    # memory flat in the number of ingredients; stacked: every ingredient held in bf16 on the
    # accelerator (fast when they fit).
    learned_mode: Literal[LEARNED_MODES] = "streaming"


class SearchSpace(Frozen):
    """A declarative sweep: a fixed fine-tuning config, searched keys, and how to run it."""

    base: FinetuneConfig = FinetuneConfig()
    search: dict[str, Distribution] = Field(default_factory=dict)
    sweep: SweepSettings = SweepSettings()
    tracking: TrackingSettings = TrackingSettings()
    cook: CookSettings = CookSettings()

    @model_validator(mode="after")
    def _search_keys_exist(self) -> "SearchSpace":
        known = _dotted_keys(self.base.model_dump())
        for key, dist in self.search.items():
            if key not in known:
                raise FieldError(f"search.{key}", (
                    f"searched key {key!r} is not a fine-tuning setting "
                    f"(e.g. {', '.join(sorted(k for k in known if k.startswith('train.'))[:4])})"))
            problem = _searched_value_problem(self.base, key, dist)
            if problem:
                raise FieldError(f"search.{key}", problem)
        problem = _batch_split_problem(self)
        if problem:
            raise FieldError(*problem)
        if self.sweep.search_alg == "grid" and any(d.kind != "grid" for d in self.search.values()):
            raise FieldError("sweep.search_alg", "search_alg 'grid' needs every searched key to be a grid")
        if self.trial_count > self.sweep.max_trials:
            raise FieldError("sweep.max_trials", (
                f"this space makes {trials_made(self)}, above sweep.max_trials "
                f"{self.sweep.max_trials:,}; lower sweep.num_samples or the grid, or raise sweep.max_trials"))
        return self

    @property
    def grid_points(self) -> int:
        """Combinations of the grid axes (1 without any): Tune runs every one of them for each
        of the num_samples samples."""
        return math.prod(len(d.grid) for d in self.search.values() if d.kind == "grid")

    @property
    def trial_count(self) -> int:
        """Trials the sweep makes, counted as Tune counts them (`tune.TuneConfig.num_samples`:
        with grid_search, the grid is repeated num_samples times)."""
        return self.sweep.num_samples * self.grid_points


def _counted(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def trials_made(space: SearchSpace) -> str:
    """How many trials the space makes and how: ``8 trials (num_samples 8)``, or
    ``8 trials (2 grid points × num_samples 4)``."""
    how = f"num_samples {space.sweep.num_samples:,}"
    if any(d.kind == "grid" for d in space.search.values()):
        how = f"{_counted(space.grid_points, 'grid point')} × {how}"
    return f"{_counted(space.trial_count, 'trial')} ({how})"


def batch_split(batch_size: int, workers: int, micro_batch_size: int | None) -> tuple[int, int]:
    """(images per worker per step, micro-batches per step) of a global batch; ValueError when
    the global batch does not split evenly (every worker must see the same number of images)."""
    if batch_size % workers:
        raise ValueError(f"train.batch_size {batch_size} does not split evenly across {workers} workers")
    per_worker = batch_size // workers
    micro = micro_batch_size or per_worker
    if per_worker % micro:
        raise ValueError(f"train.micro_batch_size {micro} does not divide the {per_worker} images "
                         f"each of the {workers} workers takes per step (batch_size {batch_size})")
    return per_worker, per_worker // micro


def _batch_split_problem(space: "SearchSpace") -> tuple[str, str] | None:
    """(key, why) when some batch size the space can draw does not split across its workers."""
    sizes = [("base.train.batch_size", space.base.train.batch_size)]
    if "train.batch_size" in space.search:
        sizes = [("search.train.batch_size", v) for _, v in _candidates(space.search["train.batch_size"])]
    for key, size in sizes:
        try:
            batch_split(size, space.sweep.resources.workers, space.base.train.micro_batch_size)
        except ValueError as err:
            return key, f"{err} (sweep.resources.workers {space.sweep.resources.workers})"
    return None


def _candidates(d: Distribution) -> list[tuple[str, Any]]:
    """(label, value) for the values a distribution can yield that bound what every trial may
    see: each choice or grid value, a range's ends (for a half-open float range, the largest
    float below its top), and the off value."""
    kind = d.kind
    if kind in ("choice", "grid"):
        out = [(f"{kind} value {v!r}", v) for v in getattr(d, kind)]
    else:
        lo, hi = getattr(d, kind)
        top = hi if kind == "randint" else math.nextafter(hi, lo)
        out = [(f"{kind} lower bound {lo!r}", lo), (f"{kind} upper bound {hi!r}", top)]
    return out + ([(f"off_value {d.off_value!r}", d.off_value)] if d.p_off > 0 else [])


def _searched_value_problem(base: FinetuneConfig, key: str, dist: Distribution) -> str | None:
    """Why some value of `dist` would make an invalid trial config at `key`, or None.

    Checked before a sweep starts so that a wrong type or an out-of-range bound fails at once
    instead of in every trial."""
    for label, value in _candidates(dist):
        data = base.model_dump()
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
        try:
            FinetuneConfig.model_validate(data)
        except ValidationError as err:
            why = [_error_text(e).removeprefix(f"key '{key}': ") for e in err.errors()]
            return f"{label} would make an invalid trial: {'; '.join(why)}"
    return None


def _dotted_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _dotted_keys(v, key + ".") if isinstance(v, dict) else {key}
    return out
