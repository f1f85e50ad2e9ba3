"""The search space: searched keys as distributions, how Tune runs the sweep, where MLflow records
it, and how the cook builds its soups; validated as a whole (every searched value makes a valid
trial, the trial count is capped)."""

import math
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from orchestrator.config.loading import FieldError, error_text
from orchestrator.config.schemas import FinetuneConfig, Frozen


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
    worker reserves; fractional GPUs pack several one-worker trials on one device.

    `launcher` says who runs the training loop: ``auto`` trains one worker inside the Tune trial's
    own actor (``trial``: Ray's documented way for single-process trials, with Tune's checkpoints
    and restarts) and several workers as a Ray Train `TorchTrainer` (``torch_trainer``, DDP);
    ``torch_trainer`` with one worker runs the same loop as a one-worker Ray Train run."""

    workers: int = Field(1, ge=1, le=4096)
    cpu: float = Field(1.0, gt=0)  # per worker
    gpu: float = Field(0.0, ge=0)  # per worker
    launcher: Literal["auto", "trial", "torch_trainer"] = "auto"

    @property
    def in_trial(self) -> bool:
        """Whether the training loop runs in the Tune trial's actor (else in a TorchTrainer)."""
        return self.workers == 1 and self.launcher != "torch_trainer"

    @model_validator(mode="after")
    def _whole_gpus_when_distributed(self) -> "Resources":
        if self.workers > 1 and self.gpu and self.gpu != int(self.gpu):
            raise FieldError("gpu", f"a trial of {self.workers} workers needs whole GPUs per worker "
                                    f"(got {self.gpu:g}): DDP puts one process on each device")
        if self.workers > 1 and self.launcher == "trial":
            raise FieldError("launcher", f"'trial' trains one worker in the Tune trial's actor; "
                                         f"{self.workers} workers need 'torch_trainer' or 'auto'")
        return self


class StopSettings(Frozen):
    """When a sweep with an online soup ends before its last trial (`sweep.online_soup`)."""

    # End the sweep when the online soup's held-out accuracy has not risen by more than
    # `min_delta` over the last `soup_patience` finished trials: trials not yet started are not
    # started, running ones finish. None: never.
    soup_patience: int | None = Field(None, ge=1)
    min_delta: float = Field(0.0, ge=0.0, lt=1.0)  # in accuracy: 0.002 is 0.2 points
    # Also wait for the best single trial: stop only when neither the online soup nor the best
    # trial so far has risen by more than `min_delta` over those trials. The paper's greedy
    # soup starts from the best trial, so a late best trial changes it even when the online
    # soup (which keeps its first ingredients) has stopped moving.
    watch_best: bool = False


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
    # A soup actor (the cook's resources) takes each trial as it finishes into a greedy soup, in
    # finishing order, and logs its held-out accuracy on the sweep run; the sweep registers it
    # at its end as recipe `online-greedy`.
    online_soup: bool = False
    stop: StopSettings = StopSettings()

    @model_validator(mode="after")
    def _stop_needs_online_soup(self) -> "SweepSettings":
        if self.stop.soup_patience is not None and not self.online_soup:
            raise FieldError("stop.soup_patience", "the soup-patience stopper watches the online soup: "
                                                   "set sweep.online_soup: true")
        if self.stop.watch_best and self.stop.soup_patience is None:
            raise FieldError("stop.watch_best", "watching the best trial is part of the soup-patience "
                                                "stopper: set sweep.stop.soup_patience")
        if self.stop.soup_patience is not None and self.search_alg == "optuna":
            raise FieldError("stop.soup_patience", "the soup-patience stopper works with search_alg "
                                                   "random or grid")
        return self


class TrackingSettings(Frozen):
    """Where MLflow records the sweep."""

    experiment_name: str = Field("tiny-digits", min_length=1)
    registered_model: str | None = None


# How the learned soup may get its gradients in a cook (the schema, `soup cook --learned-mode` and
# the learned recipe all take this one list).
LEARNED_MODES = ("auto", "stacked", "sampled", "streaming")

_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_budget(text: str) -> tuple[str, float]:
    """``"12GiB"`` -> ("bytes", 12 * 2**30); ``"40%"`` -> ("share", 0.4) of the free memory.

    ValueError, in one line, for anything else."""
    t = str(text).strip()
    try:
        if t.endswith("%"):
            share = float(t[:-1]) / 100
            if 0 < share <= 1:
                return "share", share
        else:
            unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if t.endswith(u)), None)
            if unit is not None and float(t[:-len(unit)]) > 0:
                return "bytes", float(t[:-len(unit)]) * _UNITS[unit]
    except ValueError:
        pass
    raise ValueError(f"memory budget {text!r}: give a size (e.g. 12GiB, 500MiB) or a share of the "
                     "device's free memory (e.g. 40%)")


class CookResources(Frozen):
    """What the cook's build task reserves (`soup cook --cpus/--gpus/--memory-gib` override it):
    its CPUs size torch's threads and the loaders' workers; with a GPU the soups are built and
    evaluated on it. Its own, not the trials': a cook needs one device, however many a trial used."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0, le=1)
    memory_gib: float = Field(0.0, ge=0)  # 0: no memory reservation


class DoctorSettings(Frozen):
    """How `soup doctor` looks at this sweep (`soup doctor --images` overrides)."""

    # held-out images each path is scored on: a seeded, class-stratified subsample (all of
    # held-out when it is smaller)
    images: int = Field(2000, ge=1)


class CookSettings(Frozen):
    """How the cook builds the soups of this sweep (`soup cook --learned-mode` overrides it)."""

    resources: CookResources = CookResources()

    # auto: stacked when the ingredients fit `memory_budget`, else sampled (the cook says which
    # and why); stacked: every ingredient read once and held on the device (bf16 on an
    # accelerator); sampled: each step mixes and differentiates `learned_sample` of them, the rest
    # held in host memory (MEHL-Soup); streaming: every ingredient read again at every step,
    # memory flat in their number.
    learned_mode: Literal[LEARNED_MODES] = "auto"
    # What the learned soups may hold on the cook's device: a size ("12GiB") or a share of its
    # free memory ("40%"); default 50% (`soups.learned.DEFAULT_BUDGET_SHARE`).
    memory_budget: str | None = None
    # Ingredients mixed and differentiated at each step of a sampled learned soup.
    learned_sample: int = Field(8, ge=1)
    # Optimisation steps of each learned soup's mixing coefficients (Adam on held-out mini-batches
    # of 256); every step is a forward and backward pass of the mixed model. The default is
    # `soups.recipe.LEARNED_STEPS` (a test holds them equal).
    learned_steps: int = Field(50, ge=1)

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is not None:
            parse_budget(v)
        return v


class SearchSpace(Frozen):
    """A declarative sweep: a fixed fine-tuning config, searched keys, and how to run it."""

    base: FinetuneConfig = FinetuneConfig()
    search: dict[str, Distribution] = Field(default_factory=dict)
    sweep: SweepSettings = SweepSettings()
    tracking: TrackingSettings = TrackingSettings()
    cook: CookSettings = CookSettings()
    doctor: DoctorSettings = DoctorSettings()

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
            why = [error_text(e).removeprefix(f"key '{key}': ") for e in err.errors()]
            return f"{label} would make an invalid trial: {'; '.join(why)}"
    return None


def _dotted_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _dotted_keys(v, key + ".") if isinstance(v, dict) else {key}
    return out
