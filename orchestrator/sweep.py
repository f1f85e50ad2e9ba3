"""Ray Tune: the only module that imports ray.tune. Search space to Tune, the trainable, resume.

`run_sweep` is the driver behind ``soup sweep``. It runs on a local Ray by default, on an existing
cluster when ``RAY_ADDRESS`` is set, and unchanged as ``ray job submit -- soup sweep ...``.
Each trial fine-tunes with `finetune.finetune` and logs itself to MLflow as a run nested under
the sweep's parent run, so MLflow alone tells the story of the sweep.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from ray import tune
from ray.tune.search.sample import Domain, Sampler

from . import cluster
from .config import ConfigError, Distribution, FinetuneConfig, SearchSpace, load_yaml, validate, with_overrides
from .hashing import json_sha256, text_sha256
from .models import describe_arch, pretrained_ref
from .tracking import FAILED, FINISHED, KILLED, RUNNING, Tracker, flatten, searchable

METRIC = "heldout_acc"


# --- search space -----------------------------------------------------------------------------

def _rng(random_state):
    """The random state a sampler draws from. `Domain.sample` hands samplers Tune's own wrapper,
    which offers numpy's ``choice`` and ``uniform`` whatever numpy generator it holds; only the
    methods Tune's built-in samplers call are used, and numpy's global state when there is none."""
    return np.random if random_state is None else random_state


class WeightedChoice(Domain):
    """A categorical draw with weights (Tune's `choice` is uniform)."""

    class _Sampler(Sampler):
        def sample(self, domain, config=None, size=1, random_state=None):
            rng = _rng(random_state)
            p = np.asarray(domain.weights, dtype=float) / sum(domain.weights)
            idx = rng.choice(len(domain.categories), size=size, p=p)
            items = [domain.categories[i] for i in np.atleast_1d(idx)]
            return items if size > 1 else items[0]

    default_sampler_cls = _Sampler

    def __init__(self, categories, weights):
        self.categories, self.weights = list(categories), list(weights)

    def is_valid(self, value):
        return value in self.categories

    @property
    def domain_str(self):
        return f"{self.categories} weighted {self.weights}"


class Switchable(Domain):
    """With probability `p_off` the value is `off`; otherwise a draw from `inner`."""

    class _Sampler(Sampler):
        def sample(self, domain, config=None, size=1, random_state=None):
            rng = _rng(random_state)
            items = []
            for _ in range(size):
                off = rng.uniform(0.0, 1.0) < domain.p_off
                items.append(domain.off if off else domain.inner.sample(config, 1, random_state))
            return items if size > 1 else items[0]

    default_sampler_cls = _Sampler

    def __init__(self, inner: Domain, p_off: float, off: Any):
        self.inner, self.p_off, self.off = inner, p_off, off

    def is_valid(self, value):
        return value == self.off or self.inner.is_valid(value)

    @property
    def domain_str(self):
        return f"{self.off} with p={self.p_off}, else {self.inner.domain_str}"


def to_domain(d: Distribution):
    """One declarative distribution as a Tune domain (or a grid axis)."""
    kind = d.kind
    if kind == "grid":
        return tune.grid_search(list(d.grid))
    if kind == "loguniform":
        inner = tune.loguniform(*d.loguniform)
    elif kind == "uniform":
        inner = tune.uniform(*d.uniform)
    elif kind == "randint":
        inner = tune.randint(d.randint[0], d.randint[1] + 1)  # ours is inclusive, Tune's is not
    elif d.weights is not None:
        inner = WeightedChoice(d.choice, d.weights)
    else:
        inner = tune.choice(list(d.choice))
    return Switchable(inner, d.p_off, d.off_value) if d.p_off > 0 else inner


def param_space(space: SearchSpace) -> dict[str, Any]:
    """The Tune param space: searched dotted keys (``train.lr``) to domains."""
    return {key: to_domain(d) for key, d in space.search.items()}


def sample_configs(space: SearchSpace, n: int, seed: int = 0) -> list[FinetuneConfig]:
    """Draw `n` trial configs the way random search does, without starting Ray."""
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.default_rng(seed)
    out: list[FinetuneConfig] = []
    while len(out) < n:
        for _, params in generate_variants(param_space(space), random_state=rng):
            out.append(with_overrides(space.base, params, "sampled params"))
    return out[:n]


# --- the trainable ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialContext:
    """What every trial needs to know; small, so Tune can ship it to workers."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_id: str
    base: dict
    tags: dict = field(default_factory=dict)


def trial_key(trial_id: str, params: dict[str, Any]) -> str:
    """A trial's identity across retries and resumes: its index in the sweep and its params.

    Tune keeps trial ids across `Tuner.restore`, but a sweep restarted from scratch (its Tune
    state lost) draws the same params in the same order under new ids; this key matches both.
    """
    digest = json_sha256(params, sort_keys=True, default=str)
    return f"{trial_id.rsplit('_', 1)[-1]}-{digest[:12]}"


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: fine-tune with `params` over the base config, logging to a nested MLflow run."""
    import torch

    from .finetune import finetune
    from .tracking import log_trial_result

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = with_overrides(validate(FinetuneConfig, ctx.base), params, "trial params")
    tracker = Tracker(ctx.tracking_uri)
    trial_id = tune.get_context().get_trial_id()
    key = trial_key(trial_id, params)
    existing = tracker.find_trial(ctx.experiment_id, ctx.sweep_id, key)
    finished = [r for r in existing if r.info.status == FINISHED]
    if finished:  # logged in full by an earlier attempt that died before Tune heard of it
        tune.report({**finished[0].data.metrics, "epoch": cfg.train.epochs})
        return
    tracker.discard_stale(existing)
    run_id = tracker.create_run(
        ctx.experiment_id, tune.get_context().get_trial_name(),
        {**ctx.tags, "soup.role": "trial", "sweep_id": ctx.sweep_id, "trial_id": trial_id,
         "trial_key": key},
        parent_run_id=ctx.parent_run_id)
    tracker.log_params(run_id, flatten(cfg.model_dump()))

    def on_epoch(row: dict) -> None:
        tracker.log_metrics(run_id, {"train_loss": row["train_loss"], METRIC: row[METRIC],
                                     "lr": row["lr"]}, step=row["epoch"])
        tune.report(row)

    try:
        result = finetune(cfg, on_epoch=on_epoch)
        log_trial_result(tracker, run_id, result)
    except Exception as err:
        tracker.set_tags(run_id, {"error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.end_run(run_id, FAILED)
        raise
    tracker.end_run(run_id, FINISHED)
    tune.report({**result.metrics(), "epoch": cfg.train.epochs})


class EndTrialRuns(tune.Callback):
    """Driver-side: a trial whose worker died or was stopped early leaves no RUNNING run behind."""

    def __init__(self, ctx: TrialContext):
        self.ctx = ctx

    def _end(self, trial, status: str, reason: str) -> None:
        tracker = Tracker(self.ctx.tracking_uri)
        key = trial_key(trial.trial_id, trial.config)
        for run in tracker.find_trial(self.ctx.experiment_id, self.ctx.sweep_id, key):
            if run.info.status == RUNNING:
                tracker.set_tags(run.info.run_id, {"end_reason": reason})
                tracker.end_run(run.info.run_id, status)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, FAILED, "trial errored")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, KILLED, "stopped early by the scheduler")


# --- the driver -------------------------------------------------------------------------------

@dataclass
class SweepOutcome:
    """What a sweep left in MLflow."""

    sweep_id: str
    experiment_id: str
    parent_run_id: str
    finished: int
    failed: int
    tracking_uri: str
    storage_path: str


def _tune_config(space: SearchSpace):
    s = space.sweep
    search_alg = None
    if s.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:
            raise ConfigError(f"sweep.search_alg 'optuna' needs the optuna package: {err}") from None
        search_alg = OptunaSearch(seed=s.seed)
    elif s.search_alg == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a SearchGenerator: the generator limits itself
        search_alg = BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent_trials)
    scheduler = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        max_t = max([space.base.train.epochs] + [v for d in space.search.values()
                                                  for v in (d.randint or ())])
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=1)
    limit = s.max_concurrent_trials if s.search_alg != "random" else None
    return tune.TuneConfig(metric=METRIC, mode="max", num_samples=s.num_samples,
                           search_alg=search_alg, scheduler=scheduler, max_concurrent_trials=limit)


def _storage(space: SearchSpace, override: str | None) -> str:
    path = override or space.sweep.storage_path or os.path.join(os.path.expanduser("~"), "ray_results")
    return path if "://" in path else str(Path(path).resolve())


def _sweep_tags(space: SearchSpace, space_path: Path) -> dict[str, str]:
    ref, digest = pretrained_ref(space.base.model)
    return {"base_arch": space.base.model.arch, "pretrained": ref, "pretrained_sha256": digest,
            "arch_sha256": text_sha256(describe_arch(space.base.model.arch)), "space": space_path.stem}


def _open_parent(tracker: Tracker, exp_id: str, sweep_id: str, resume: bool, space: SearchSpace,
                 space_path: Path, tags: dict) -> str:
    parent = tracker.find_sweep(exp_id, sweep_id)
    if resume:
        if parent is None:
            raise ConfigError(f"--resume: no sweep {sweep_id!r} in experiment "
                              f"{space.tracking.experiment_name!r} at {tracker.uri}")
        tracker.client.update_run(parent.info.run_id, status=RUNNING)
        return parent.info.run_id
    if parent is not None:
        raise ConfigError(f"sweep {sweep_id!r} already exists; pass --resume to continue it "
                          "or --name to start another")
    run_id = tracker.create_run(exp_id, sweep_id, {**tags, "soup.role": "sweep", "sweep_id": sweep_id})
    tracker.log_artifact(run_id, space_path, "space")
    tracker.log_text(run_id, yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False),
                     "space/resolved_config.yaml")
    tracker.log_params(run_id, {f"sweep.{k}": v for k, v in flatten(space.sweep.model_dump()).items()})
    return run_id


def _checked_tags(space: SearchSpace, space_path: Path) -> dict[str, str]:
    """The sweep's tags, computed before anything reaches MLflow: an unknown architecture or a
    pickled base checkpoint is a config error that names the file and the key."""
    try:
        describe_arch(space.base.model.arch)
    except ValueError as err:
        raise ConfigError(f"{space_path}: key 'base.model.arch': {err}") from None
    try:
        return _sweep_tags(space, space_path)
    except ValueError as err:
        raise ConfigError(f"{space_path}: key 'base.model.pretrained': {err}") from None


def run_sweep(space_path: str | Path, name: str | None = None, resume: bool = False,
              storage_path: str | None = None, tracking_uri: str | None = None,
              log: Callable[[str], None] = print) -> SweepOutcome:
    """Run (or, with `resume`, continue) the sweep described by a search-space YAML."""
    space_path = Path(space_path)
    space = load_yaml(SearchSpace, space_path)  # every input check comes before MLflow and Ray
    if resume and not name:
        raise ConfigError("--resume needs --name: the sweep id printed when the sweep started")
    sweep_id = name or f"{space_path.stem}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if not sweep_id.strip() or not searchable(sweep_id):
        raise ConfigError(f"sweep id {sweep_id!r}: must be non-empty, without quotes or backslashes "
                          "(it is matched in MLflow searches)")
    tags = _checked_tags(space, space_path)
    tracker = Tracker(tracking_uri)
    exp_id = tracker.experiment_id(space.tracking.experiment_name)
    parent = _open_parent(tracker, exp_id, sweep_id, resume, space, space_path, tags)
    storage = _storage(space, storage_path)
    log(f"sweep {sweep_id}: MLflow {tracker.uri}, experiment {space.tracking.experiment_name!r}, "
        f"parent run {parent}; Tune state in {storage}/{sweep_id}")
    ctx = TrialContext(tracker.uri, exp_id, parent, sweep_id, space.base.model_dump(mode="json"), tags)
    res = space.sweep.resources
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"cpu": res.cpu, "gpu": res.gpu})
    cluster.init_ray(log)
    exp_path = f"{storage}/{sweep_id}"
    if resume and tune.Tuner.can_restore(exp_path):
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(space), tune_config=_tune_config(space),
                           run_config=tune.RunConfig(
                               name=sweep_id, storage_path=storage, callbacks=[EndTrialRuns(ctx)],
                               failure_config=tune.FailureConfig(max_failures=space.sweep.max_failures)))
    try:
        tuner.fit()
    except BaseException:
        tracker.end_run(parent, FAILED)
        raise
    finished = len(tracker.trial_runs(exp_id, sweep_id, FINISHED))
    failed = len(tracker.trial_runs(exp_id, sweep_id, FAILED))
    tracker.log_metrics(parent, {"trials_finished": finished, "trials_failed": failed})
    tracker.end_run(parent, FINISHED)
    return SweepOutcome(sweep_id, exp_id, parent, finished, failed, tracker.uri, storage)
