"""Ray Tune's driver: search space to Tune, the trainable and its resources, resume.

`run_sweep` is the driver behind ``soup sweep``. It runs on a local Ray by default, on an existing
cluster when ``RAY_ADDRESS`` is set, and unchanged as ``ray job submit -- soup sweep ...``.
Each trial runs `finetune.finetune` in its own Tune actor (one worker) or as a Ray Train run on
``sweep.resources.workers`` workers (`trial`), and logs itself to MLflow as a run nested under the sweep's parent run, so MLflow
alone tells the story of the sweep.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from ray import tune
from ray.tune.search.sample import Domain, Sampler

from orchestrator import data
from orchestrator.config import (
    ConfigError,
    DataConfig,
    Distribution,
    FinetuneConfig,
    SearchSpace,
    load_yaml,
    one_line,
    trials_made,
    with_overrides,
)
from orchestrator.hashing import text_sha256
from orchestrator.record.schema import (
    ARCH_SHA,
    BASE_ARCH,
    END_REASON,
    FAILED,
    FINISHED,
    KILLED,
    PRETRAINED,
    PRETRAINED_SHA,
    RESOLVED_SPACE,
    ROLE,
    ROLE_SWEEP,
    RUNNING,
    SPACE_DIR,
    SPACE_NAME,
    STOP_REASON,
    SWEEP_ID,
    TRIALS_FAILED,
    TRIALS_FINISHED,
)
from orchestrator.record.soups import locate_sweep
from orchestrator.record.tracking import Tracker, flatten, searchable
from orchestrator.runtime import connect, signals, terminal
from orchestrator.sweep import online
from orchestrator.sweep.trial import (
    KEEP_CHECKPOINTS,
    METRIC,
    EndTrialRuns,
    TrialContext,
    TrialProgress,
    run_trial,
    trial_label,
)
from orchestrator.train.models import describe_arch, pretrained_ref

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
    online_soup: bool = False  # its online soup is to be registered (`cook.driver.cook_online`)
    stopped: str | None = None  # why `sweep.stop` ended it before its last trial


def _tune_config(space: SearchSpace, sweep_id: str):
    s = space.sweep
    search_alg = None
    if s.online_soup and s.search_alg in ("random", "grid"):
        # Tune's generator, which with a stopper waits for the online soup's verdict (`online`)
        return _tune_config_with(space, online.PatientVariants(
            sweep_id, random_state=s.seed if s.search_alg == "random" else None,
            max_concurrent=s.max_concurrent_trials), None)
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
    limit = s.max_concurrent_trials if s.search_alg != "random" else None
    return _tune_config_with(space, search_alg, limit)


def _tune_config_with(space: SearchSpace, search_alg, limit: int | None):
    s = space.sweep
    scheduler = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        max_t = max([space.base.train.epochs] + [v for d in space.search.values()
                                                  for v in (d.randint or ())])
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=1)
    return tune.TuneConfig(metric=METRIC, mode="max", num_samples=s.num_samples,
                           search_alg=search_alg, scheduler=scheduler, max_concurrent_trials=limit,
                           reuse_actors=True)


def _storage(space: SearchSpace, override: str | None) -> str:
    path = override or space.sweep.storage_path or os.path.join(os.path.expanduser("~"), "ray_results")
    return path if "://" in path else str(Path(path).resolve())


def _sweep_tags(space: SearchSpace, space_path: Path) -> dict[str, str]:
    ref, digest = pretrained_ref(space.base.model)
    return {BASE_ARCH: space.base.model.arch, PRETRAINED: ref, PRETRAINED_SHA: digest,
            ARCH_SHA: text_sha256(describe_arch(space.base.model.arch)), SPACE_NAME: space_path.stem}


def _open_parent(tracker: Tracker, exp_id: str, sweep_id: str, resume: bool, space: SearchSpace,
                 space_path: Path, tags: dict) -> str:
    parent = tracker.find_sweep(exp_id, sweep_id)
    if parent is not None:  # resuming (`_check_unique` refused any other case)
        tracker.reopen_run(parent.info.run_id)
        return parent.info.run_id
    run_id = tracker.create_run(exp_id, sweep_id, {**tags, ROLE: ROLE_SWEEP, SWEEP_ID: sweep_id})
    tracker.log_artifact(run_id, space_path, SPACE_DIR)
    tracker.log_text(run_id, yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False), RESOLVED_SPACE)
    tracker.log_params(run_id, {f"sweep.{k}": v for k, v in flatten(space.sweep.model_dump()).items()})
    tracker.describe(run_id, _sweep_description(sweep_id, space, space_path))
    return run_id


def _sweep_description(sweep_id: str, space: SearchSpace, space_path: Path) -> str:
    """The sweep run's description until a cook replaces it with the comparison table."""
    m, s = space.base.model, space.sweep
    searched = ", ".join(f"`{k}`" for k in space.search) or "nothing"
    return "\n".join([
        (f"**Sweep `{sweep_id}`** of space `{space_path.name}`: {s.num_samples} samples of `{m.arch}` "
         f"(pretrained `{m.pretrained}`) fine-tuned on `{data.name_of(space.base.data)}`, searching {searched}."),
        "", (f"Its trials are the nested runs below it. Cook it with `{cook_hint(sweep_id)}`: "
             "the comparison of its soups with the best trial and the ensemble then replaces this text.")])


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


def check_data(cfg: DataConfig, path: Path, prefix: str, log: Callable[[str], None]) -> None:
    """Refuse data that cannot be used, before anything is logged: an unknown data set or shift
    (``data.shifts``, named with the file and key), and for a user's own data whatever its trust
    checks find (`orchestrator.data.owntask`: classes, unreadable images, images in two splits).
    Builds the task the trials will build (cached in this process)."""
    try:
        data.check_config(cfg)
    except ValueError as err:
        key, _, why = str(err).partition(": ")
        raise ConfigError(f"{path}: key '{prefix}{key}': {why}") from None
    try:
        task = data.load_task(cfg)
    except (ValueError, OSError) as err:  # the data set's own one-line refusal
        raise ConfigError(f"{path}: {one_line(str(err))}") from None
    log(f"data: {data.name_of(cfg)}, {len(task.classnames)} classes; {len(task.train)} train, "
        f"{len(task.heldout)} held-out, {len(task.test)} test images; shifts: {', '.join(task.shifts) or 'none'}")


# --- commands a person copies: every id and path quoted for a POSIX shell ---------------------

def _shell(*words: str | Path) -> str:
    """A command line that a POSIX shell splits back into `words` (ids and paths may hold spaces)."""
    return " ".join(shlex.quote(str(w)) for w in words)


def cook_hint(sweep_id: str) -> str:
    """The command that cooks sweep `sweep_id`."""
    return _shell("soup", "cook", "--sweep", sweep_id)


def sweep_hint(space_path: str | Path, sweep_id: str, resume: bool) -> str:
    """The command that starts (or, with `resume`, continues) sweep `sweep_id` of a space."""
    return _shell("soup", "sweep", space_path, "--name", sweep_id, *(["--resume"] if resume else []))


class SweepInterrupted(RuntimeError):
    """The sweep was stopped by a signal; its run is KILLED with the reason, and resumable."""

    def __init__(self, sweep_id: str, signal_name: str, space_path: Path):
        super().__init__(f"sweep {sweep_id} interrupted by {signal_name}; continue it with: "
                         f"{sweep_hint(space_path, sweep_id, resume=True)}")
        self.signal_name = signal_name


# It names Tune's folder, whose trial folders add their own long names. Folder names are limited
# in bytes (255 on Linux's file systems), so the limit is in UTF-8 bytes: 100 ASCII characters,
# fewer accented or CJK ones.
MAX_SWEEP_ID = 100


def _sweep_id(space_path: Path, name: str | None, resume: bool) -> str:
    """The sweep id: `name`, or the space's name and the time; checked before anything starts."""
    if name == "":  # not "no name": an empty --name would silently become a generated id
        raise ConfigError("--name '': a sweep id must not be empty")
    if resume and not name:
        raise ConfigError("--resume needs --name: the sweep id printed when the sweep started")
    sweep_id = name or f"{space_path.stem}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if not sweep_id.strip() or not searchable(sweep_id):
        raise ConfigError(f"sweep id {sweep_id!r}: must be non-empty, without quotes or backslashes "
                          "(it is matched in MLflow searches)")
    _check_folder_name(sweep_id)
    return sweep_id


def _check_folder_name(sweep_id: str) -> None:
    """Refuse an id that cannot name Tune's folder: too many bytes, a '/', unprintable, or a
    name the file system reserves."""
    size = len(sweep_id.encode("utf-8"))
    bad = [c for c in sweep_id if c == "/" or not c.isprintable()]
    if size > MAX_SWEEP_ID or bad or sweep_id in (".", ".."):
        raise ConfigError(f"sweep id {sweep_id[:40]!r}{'...' if len(sweep_id) > 40 else ''}: must be "
                          f"at most {MAX_SWEEP_ID} printable characters without '/' and at most "
                          f"{MAX_SWEEP_ID} bytes in UTF-8 (it names a folder, and folder names are "
                          f"limited in bytes); it has {len(sweep_id)} characters, {size} bytes")


def _check_unique(tracker: Tracker, sweep_id: str, space: SearchSpace, space_path: Path,
                  resume: bool) -> None:
    """A sweep id names one sweep in the whole store: a new sweep may not reuse it in any
    experiment, and ``--resume`` needs it, in the space's experiment (so `soup cook --sweep ID`
    never has to choose)."""
    exp_id, parent = locate_sweep(tracker, sweep_id)
    exp = tracker.client.get_experiment(exp_id).name if parent is not None else None
    wanted = space.tracking.experiment_name
    if parent is not None and exp != wanted:
        raise ConfigError(f"sweep id {sweep_id!r} is taken by a sweep in experiment {exp!r} of "
                          f"{tracker.uri}; sweep ids are unique in a store: choose another --name")
    if resume and parent is None:
        raise ConfigError(f"--resume: no sweep {sweep_id!r} in experiment {wanted!r} at {tracker.uri}; "
                          f"start it with: {sweep_hint(space_path, sweep_id, resume=False)}")
    if not resume and parent is not None:
        raise ConfigError(f"sweep {sweep_id!r} already exists: choose another --name to start another "
                          f"sweep, or continue it with: {sweep_hint(space_path, sweep_id, resume=True)}")


def _check_fits(space: SearchSpace, space_path: Path, log: Callable[[str], None]) -> None:
    """Refuse a trial that this Ray could never run, before anything is logged: one worker's
    bundle (CPUs, GPUs) must fit a node, and on a local Ray all the trial's workers must fit it.

    A local Ray is all there is. A cluster (``RAY_ADDRESS``) may add nodes: with
    ``sweep.autoscale: true`` the sweep starts and waits for them; without, it is refused."""
    res = space.sweep.resources
    if space.sweep.online_soup:
        _check_soup_fits(space, space_path)
    miss = connect.misfit(res.cpu, res.gpu, count=res.workers)
    if miss is None:
        return
    if miss.one_fits:  # local, one worker fits but not all of them
        what = (f"a trial of {res.workers} workers asks for {res.workers * res.cpu:g} CPU and "
                f"{res.workers * res.gpu:g} GPU, but this local Ray has {miss.largest_has}")
    else:
        what = (f"a trial worker asks for {res.cpu:g} CPU and {res.gpu:g} GPU, but the largest node of "
                f"this Ray has {miss.largest_has}")
    if miss.local:
        raise ConfigError(f"{space_path}: key 'sweep.resources': {what}: it could never run")
    if not space.sweep.autoscale:
        raise ConfigError(f"{space_path}: key 'sweep.resources': {what}; set sweep.autoscale: true "
                          "if the cluster adds nodes on demand")
    log(f"{what}: waiting for the cluster to add a node (sweep.autoscale)")


def _check_soup_fits(space: SearchSpace, space_path: Path) -> None:
    """On a local Ray, the online soup's actor (``cook.resources``, held for the whole sweep) and
    one trial must fit together, or the sweep would wait for ever."""
    soup, res = space.cook.resources, space.sweep.resources
    miss = connect.misfit(soup.cpu + res.workers * res.cpu, soup.gpu + res.workers * res.gpu)
    if miss is not None and miss.local:
        raise ConfigError(
            f"{space_path}: key 'sweep.online_soup': the online soup holds cook.resources ({soup.cpu:g} CPU, "
            f"{soup.gpu:g} GPU) for the whole sweep, and beside it a trial needs {res.workers * res.cpu:g} "
            f"CPU and {res.workers * res.gpu:g} GPU, but this local Ray has {miss.largest_has}: "
            "lower cook.resources (fractions are allowed) or the trial's")


def run_sweep(space_path: str | Path, name: str | None = None, resume: bool = False,
              storage_path: str | None = None, tracking_uri: str | None = None,
              log: Callable[[str], None] = print) -> SweepOutcome:
    """Run (or, with `resume`, continue) the sweep described by a search-space YAML.

    Every check (the space, the id, its uniqueness, whether a trial fits the cluster) comes
    before anything is logged. SIGINT or SIGTERM (`signals`: the first one; later ones wait for the
    bounded cleanup) stops the sweep the way Tune stops on Ctrl-C (its state saved for
    ``--resume``): the sweep run ends KILLED with the reason, no trial run is left RUNNING (within
    `END_SWEEP_S`), and `SweepInterrupted` is raised.
    """
    space_path = Path(space_path)
    space = load_yaml(SearchSpace, space_path)
    sweep_id = _sweep_id(space_path, name, resume)
    tags = _checked_tags(space, space_path)
    tracker = Tracker(tracking_uri)
    _check_unique(tracker, sweep_id, space, space_path, resume)
    check_data(space.base.data, space_path, "base.", log)
    connect.init_ray(log, dashboard=not space.sweep.resources.in_trial)  # Ray Train needs it
    _check_fits(space, space_path, log)
    log(f"sweep {sweep_id}: {trials_made(space)}")
    with signals.stop_signals():
        exp_id = tracker.experiment_id(space.tracking.experiment_name)
        try:
            return _sweep(tracker, exp_id, sweep_id, space, space_path, tags, storage_path, resume, log)
        except BaseException as err:
            ending = functools.partial(_end_sweep, tracker, exp_id, sweep_id, err)
            if not signals.bounded(END_SWEEP_S, ending, "end-sweep"):
                log(f"sweep {sweep_id}: MLflow at {tracker.uri} did not end its runs within "
                    f"{END_SWEEP_S:.0f} s; the sweep run and its unfinished trials may still show RUNNING")
            raise


def _sweep(tracker: Tracker, exp_id: str, sweep_id: str, space: SearchSpace, space_path: Path,
           tags: dict, storage_path: str | None, resume: bool, log) -> SweepOutcome:
    parent = _open_parent(tracker, exp_id, sweep_id, resume, space, space_path, tags)
    storage = _storage(space, storage_path)
    log(f"sweep {sweep_id}: MLflow {tracker.uri}, experiment {space.tracking.experiment_name!r}, "
        f"parent run {parent}; Tune state in {storage}/{sweep_id}")
    res = space.sweep.resources
    ctx = TrialContext(tracker.uri, exp_id, parent, sweep_id, space.base, tags,
                       storage=storage, workers=res.workers, cpu=res.cpu, gpu=res.gpu,
                       max_failures=space.sweep.max_failures, in_trial=res.in_trial)
    feed = online.start(_online_context(space, ctx), log) if space.sweep.online_soup else None
    try:
        with _tune_silent(terminal.detail_log() is not None), _state_saves(), signals.handing_over():
            _tuner(space, ctx, storage, resume).fit()
    finally:
        if feed is not None:
            online.finish(feed, wait=not signals.received())
    if stopped := signals.received():  # Tune stopped on it and saved its state: resumable
        raise SweepInterrupted(sweep_id, stopped.name, space_path)
    finished = len(tracker.trial_runs(exp_id, sweep_id, FINISHED))
    failed = len(tracker.trial_runs(exp_id, sweep_id, FAILED))
    tracker.log_metrics(parent, {TRIALS_FINISHED: finished, TRIALS_FAILED: failed})
    reason = tracker.client.get_run(parent).data.tags.get(STOP_REASON)  # this driver's or a killed one's
    if reason:
        tracker.describe(parent, _sweep_description(sweep_id, space, space_path) + f"\n\nStopped early: {reason}.")
        log(f"sweep {sweep_id}: stopped early after {finished} finished trials: {reason}")
    tracker.end_run(parent, FINISHED)
    return SweepOutcome(sweep_id, exp_id, parent, finished, failed, tracker.uri, storage,
                        space.sweep.online_soup, reason)


def _online_context(space: SearchSpace, ctx: TrialContext) -> online.OnlineContext:
    res, stop = space.cook.resources, space.sweep.stop
    return online.OnlineContext(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, ctx.sweep_id,
                                space.base, res.cpu, res.gpu, res.memory_gib, False,
                                stop.soup_patience, stop.min_delta, stop.watch_best)


# A trial function that only drives its TorchTrainer, whose workers reserve the CPUs and GPUs,
# reserves a token amount of memory and no CPU (Tune needs a non-empty bundle). A one-worker
# trial trains in its own actor, which reserves what the worker needs.
DRIVER_BUNDLE = {"cpu": 0, "memory": 64 * 2**20}


def trial_bundle(ctx: TrialContext) -> dict:
    """What a trial's Tune actor reserves."""
    return {"cpu": ctx.cpu, "gpu": ctx.gpu} if ctx.in_trial else DRIVER_BUNDLE


# How often Tune saves the experiment state that `Tuner.restore` (``soup sweep --resume``) reads,
# the trials' latest checkpoints included. Tune's default ("auto") saves every 10 s or more, so a
# driver killed soon after a trial's checkpoint would resume that trial from the one before; a
# save takes milliseconds next to an epoch. Tune's documented variable; a value the user set wins.
STATE_SAVE_S = "1"


@contextlib.contextmanager
def _state_saves():
    """Around ``Tuner.fit()``, which reads these when it starts: `STATE_SAVE_S`, and Tune's
    warning that saves come often (a tiny world's epochs take seconds; the warning's own
    variable, 0, turns it off) only where the user set neither."""
    ours = "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ
    with terminal.env_default("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_S), \
            terminal.env_default("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0", when=ours):
        yield


def _tune_silent(quiet: bool):
    """Around ``Tuner.fit()`` inside `terminal.detail_to`: Tune's documented ``verbose=0`` is
    silent in its legacy output engine, while Ray 2.x's new engine still prints an experiment
    header (a table and two lines) at any verbosity; the documented switch
    ``RAY_AIR_NEW_OUTPUT=0``, which Tune reads when `fit` starts, picks the legacy engine for
    this run only. A value the user set is left as it is."""
    return terminal.env_default("RAY_AIR_NEW_OUTPUT", "0", when=quiet)


def _tuner(space: SearchSpace, ctx: TrialContext, storage: str, resume: bool):
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_bundle(ctx))
    exp_path = f"{storage}/{ctx.sweep_id}"
    if resume and tune.Tuner.can_restore(exp_path):
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=True)
    # Inside `terminal.detail_to` Tune draws no status tables (verbose=0: its documented silent
    # mode); `TrialDetail` writes its events to the detail log instead. A resumed sweep keeps the
    # verbosity and callbacks it was started with: Tune restores its RunConfig, and offers no
    # public way to change them.
    quiet = terminal.detail_log() is not None
    return tune.Tuner(trainable, param_space=param_space(space), tune_config=_tune_config(space, ctx.sweep_id),
                      run_config=tune.RunConfig(
                          name=ctx.sweep_id, storage_path=storage, verbose=0 if quiet else None,
                          callbacks=[EndTrialRuns(ctx), TrialProgress(verbose=not quiet), StopSignals(),
                                     *([TrialDetail()] if quiet else []),
                                     *([online.SoupFeed(ctx.sweep_id)] if space.sweep.online_soup else [])],
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                          failure_config=tune.FailureConfig(max_failures=space.sweep.max_failures)))


class TrialDetail(tune.Callback):
    """Driver-side, when Tune draws no tables: each trial's config, results and end go to the
    detail log (`terminal.note`), and a trial's error also to the terminal, with where its
    traceback and the log are. Stateless (Tune saves its callbacks with the experiment state)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        terminal.note(f"{_name(trial)} started in {trial.path}: config {trial.config}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in sorted(result.items()) if isinstance(v, (int, float)) and k != "pid"}
        terminal.note(f"{_name(trial)} result: {metrics}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        terminal.note(f"{_name(trial)} complete")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failed(trial, "failed, retried (sweep.max_failures)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._failed(trial, "error")

    def on_experiment_end(self, trials, **info):
        terminal.note("Tune's trials at the end:\n" + "\n".join(
            f"  {_name(t)} {t.status:<10} {_metric(t)}  {t.config}" for t in trials))

    @staticmethod
    def _failed(trial, what: str) -> None:
        error, where = _error(trial)
        terminal.note(f"{_name(trial)} {what}:\n{error}")
        last = next((line.strip() for line in reversed(error.splitlines()) if line.strip()), "")
        log = terminal.detail_log()
        print(f"trial {trial_label(trial.trial_id, {})} {what}: {last[:300] or 'no error text'} "
              f"(traceback: {where}{f'; detail: {log}' if log else ''})", flush=True)


def _error(trial) -> tuple[str, str]:
    """The traceback Tune wrote for a failed trial, and where it stays: ``error.txt`` in the trial's
    folder of the sweep's storage. Read from the driver's staging copy, which Tune writes before
    calling back (the storage copy follows at its next sync), else from the storage."""
    local = trial.error_file
    if local and os.path.isfile(local):
        with open(local, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        text = str(trial.get_error() or "")
    return text, f"{trial.path}/{os.path.basename(local)}" if local else str(trial.path)


def _name(trial) -> str:
    """``trial t07 (6a1f2_00007)``: the terminal's name of a trial, then Tune's."""
    return f"trial {trial_label(trial.trial_id, {})} ({trial.trial_id})"


def _metric(trial) -> str:
    value = (trial.last_result or {}).get(METRIC)
    return f"{METRIC}={value:.4f}" if isinstance(value, float) else f"{METRIC}=-"


# How long `run_sweep` waits for `_end_sweep`. Its MLflow calls retry with backoff, for minutes when
# the server does not answer; after a stop signal, later signals only wait for them (`signals`), so
# an unanswered store must not hold the stopped sweep. Ample for a store that answers (a local
# one ends a sweep's runs in a second or two); past it the runs may stay RUNNING.
END_SWEEP_S = 60.0


def _end_sweep(tracker: Tracker, exp_id: str, sweep_id: str, err: BaseException) -> None:
    """After an error or a stop signal: the sweep run ends KILLED (a signal) or FAILED (an error)
    with the reason as its ``end_reason`` tag, and no trial run is left RUNNING. Run in a thread
    of its own, waited for at most `END_SWEEP_S` (`signals.bounded`)."""
    stopped = signals.received()
    status = KILLED if stopped or isinstance(err, KeyboardInterrupt) else FAILED
    reason = f"interrupted by {stopped.name if stopped else 'KeyboardInterrupt'}" if status == KILLED \
        else f"{type(err).__name__}: {err}"[:5000]
    for run in tracker.trial_runs(exp_id, sweep_id, RUNNING):
        tracker.set_tags(run.info.run_id, {END_REASON: f"sweep {reason}"})
        tracker.end_run(run.info.run_id, KILLED)
    parent = tracker.find_sweep(exp_id, sweep_id)
    if parent is not None and parent.info.status != FINISHED:
        tracker.set_tags(parent.info.run_id, {END_REASON: reason})
        tracker.end_run(parent.info.run_id, status)


# --- stop signals -----------------------------------------------------------------------------

class StopSignals(tune.Callback):
    """Driver-side, while Tune runs (inside `signals.handing_over`): the first SIGINT or SIGTERM
    takes Tune's own Ctrl-C path (stop the trials, save the experiment state so that a restore
    continues them) instead of interrupting, and is kept (`signals.received`); later ones wait
    for that cleanup, as everywhere (`signals`). Stateless, so that the copy Tune restores with a
    resumed sweep behaves the same."""

    def setup(self, **info) -> None:
        # Tune installs its SIGINT handler before it sets up callbacks (none when it runs outside
        # the main thread, or with TUNE_DISABLE_SIGINT_HANDLER: then the signal interrupts)
        signals.hand_first_to(signal.getsignal(signal.SIGINT))
