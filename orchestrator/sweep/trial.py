"""One sweep trial: the training loop of `finetune`, launched by Ray Tune one of two ways.

- **One worker** (``sweep.resources.workers: 1``): the loop runs in the Tune trial's own actor,
  which reserves the trial's CPUs and GPU (Ray's docs: "trials do computation directly inside the
  Ray actor"). It reports every epoch's metrics and checkpoint with ``tune.report``, and resumes
  from ``tune.get_checkpoint()``: after a failure retried under ``sweep.max_failures``, and after
  ``Tuner.restore`` (``soup sweep --resume``).
- **Several workers**: the trial function builds a Ray Train `TorchTrainer` whose workers (DDP
  over NCCL on GPUs, Gloo on CPUs) run the loop; a `TuneReportCallback` forwards rank 0's reports
  to Tune, and a new driver finds the Train run's checkpoint by its name.

The loop (`train_loop`) is the same for both: its launch (`TuneLaunch`, `TrainLaunch`) says only
where the process sits and how it reports. Per trial:

- the MLflow run is the driver's: created once, found again by the trial's key (its index and
  params) after a worker failure, a node loss or a driver restart, and continued when the attempt
  continues from a checkpoint;
- rank 0 writes a checkpoint (`trainstate`, no pickle) every epoch and every
  ``train.checkpoint_every_steps`` to the sweep's storage, the last two kept;
- rank 0 logs every ``train.log_every_steps`` steps and every epoch to MLflow at the global step,
  skipping any step an earlier attempt already logged, so each point is logged once.

Tune reuses a trial's actor for the next trial: nothing here keeps state between trials.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.config import FinetuneConfig, with_overrides
from orchestrator.data import name_of
from orchestrator.hashing import json_sha256
from orchestrator.record.schema import (
    ATTEMPT_START_EPOCH,
    ATTEMPT_START_STEP,
    CHECKPOINT_PATH,
    CHECKPOINT_POINTER,
    CHECKPOINT_SHA,
    END_REASON,
    EPOCH,
    EPOCH_TRAIN_LOSS,
    ERROR,
    FAILED,
    FINISHED,
    HELDOUT_ACC,
    KILLED,
    LAUNCHER,
    LOGGED_MODEL_ID,
    RAY_CHECKPOINT,
    READY,
    RESULT_LOGGED,
    RESUMED_FROM,
    ROLE,
    ROLE_TRIAL,
    RUNNING,
    SWEEP_ID,
    TEST_ACC,
    TRAIN_LOSS,
    TRIAL_ID,
    TRIAL_KEY,
    WORKERS,
    time_metric,
)
from orchestrator.record.tracking import Tracker, flatten
from orchestrator.record.trials import system_metrics
from orchestrator.train.finetune import Dist

# Tune's metric: what a trial reports is what it logs, so Tune ranks trials as the cook does
METRIC = HELDOUT_ACC


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs to know; small, so Tune can ship it to workers."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_id: str
    base: FinetuneConfig  # the space's base config, validated once by the driver (frozen)
    tags: dict = field(default_factory=dict)
    storage: str = ""  # the sweep's Tune storage path; trial checkpoints go under <storage>/<sweep id>
    workers: int = 1
    cpu: float = 1.0  # per worker
    gpu: float = 0.0  # per worker
    max_failures: int = 0
    in_trial: bool = True  # the loop runs in the Tune trial's actor (else in a TorchTrainer)


def trial_key(trial_id: str, params: dict[str, Any]) -> str:
    """A trial's identity across retries and resumes: its index in the sweep and its params.

    Tune keeps trial ids across `Tuner.restore`, but a sweep restarted from scratch (its Tune
    state lost) draws the same params in the same order under new ids; this key matches both.
    """
    digest = json_sha256(params, sort_keys=True, default=str)
    return f"{trial_id.rsplit('_', 1)[-1]}-{digest[:12]}"


SHORT_NAMES = {"weight_decay": "wd", "epochs": "ep", "augment": "aug", "mixup_alpha": "mix",
               "label_smoothing": "ls", "randaug_magnitude": "ram", "randaug_num_ops": "ran",
               "head_init": "head"}


def trial_label(trial_id: str, params: dict[str, Any]) -> str:
    """A trial's readable name: ``t`` and its index in the sweep, then its searched values in the
    space's order, under a short name (`SHORT_NAMES`, else the key's last part), floats to two
    significant digits: ``t07 lr=3.1e-05 wd=0.012 ep=10``. Left out, as they say nothing to a
    reader: the seed (unless it is all that is searched) and RandAugment's settings of a trial
    that does not use RandAugment."""
    index = trial_id.rsplit("_", 1)[-1]
    head = f"t{int(index):02d}" if index.isdigit() else f"t{index}"

    def fmt(v):
        return f"{v:.2g}" if isinstance(v, float) else str(v)

    def shown(key: str) -> bool:
        if key == "train.seed":
            return len(params) == 1
        return not (key.startswith("train.randaug_") and params.get("train.augment", "randaugment") != "randaugment")
    parts = [f"{SHORT_NAMES.get(k.rsplit('.', 1)[-1], k.rsplit('.', 1)[-1])}={fmt(v)}"
             for k, v in params.items() if shown(k)]
    return " ".join([head, *parts])


def train_name(key: str) -> str:
    """The Ray Train run name of a trial: stable across attempts, so a new driver resumes it."""
    return f"train-{key}"


# --- the Tune trial function (the trial's driver) ---------------------------------------------

def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: fine-tune with `params` over the base config, logging to a nested MLflow run,
    in this actor (one worker) or in a TorchTrainer of ``ctx.workers`` workers; resumes from the
    trial's checkpoint when it has one."""
    t_driver = time.time()
    cfg = with_overrides(ctx.base, params, "trial params")
    tracker = Tracker(ctx.tracking_uri)
    trial_id = tune.get_context().get_trial_id()
    key = trial_key(trial_id, params)
    existing = tracker.find_trial(ctx.experiment_id, ctx.sweep_id, key)
    finished = [r for r in existing if r.info.status == FINISHED]
    if finished:  # logged in full by an earlier attempt that died before Tune heard of it
        tune.report({**finished[0].data.metrics, "epoch": cfg.train.epochs})
        return
    # Tune hands this actor the trial's latest checkpoint; a TorchTrainer finds its own by name
    checkpoint = tune.get_checkpoint() if ctx.in_trial else None
    run_id = _trial_run(tracker, ctx, existing, cfg, trial_id, key, params,
                        continues=checkpoint is not None if ctx.in_trial else None)
    config = {"cfg": cfg, "run_id": run_id, "tracking_uri": ctx.tracking_uri, "cpu": ctx.cpu,
              "t_driver": t_driver}
    try:
        if ctx.in_trial:
            train_loop(config, TuneLaunch(checkpoint))
        else:
            _torch_trainer(config, ctx, key).fit()
    except Exception as err:
        tracker.set_tags(run_id, {ERROR: f"{type(err).__name__}: {err}"[:5000]})
        _fail_model(tracker, run_id)
        tracker.end_run(run_id, FAILED)
        raise
    tracker.end_run(run_id, FINISHED)


def _torch_trainer(config: dict, ctx: TrialContext, key: str):
    """The trial's Ray Train run: `train_worker` on ``ctx.workers`` workers, named by the trial's
    key so that a new driver finds its checkpoints, rank 0's reports forwarded to Tune. (Ray Train
    is imported here: a trial in its Tune actor does not pay for it.)"""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    return TorchTrainer(
        train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=ctx.workers, use_gpu=ctx.gpu > 0,
                                     resources_per_worker={"CPU": ctx.cpu, "GPU": ctx.gpu}),
        run_config=RunConfig(
            name=train_name(key), storage_path=f"{ctx.storage}/{ctx.sweep_id}",
            failure_config=FailureConfig(max_failures=ctx.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=[TuneReportCallback()]))


KEEP_CHECKPOINTS = 2  # a trial's latest checkpoints kept on storage, on either path


def _fail_model(tracker: Tracker, run_id: str) -> None:
    """The failed trial's logged model is marked FAILED (the Models view then says so)."""
    model_id = tracker.client.get_run(run_id).data.tags.get(LOGGED_MODEL_ID)
    if model_id:
        with contextlib.suppress(Exception):  # the error being raised matters more
            tracker.finish_model(model_id, FAILED)


def _trial_run(tracker: Tracker, ctx: TrialContext, existing, cfg: FinetuneConfig, trial_id: str,
               key: str, params: dict[str, Any], continues: bool | None = None) -> str:
    """The trial's MLflow run: an unfinished one holding a checkpoint continues (reopened); any
    other unfinished run is replaced (a restart from scratch). `continues` says whether this
    attempt starts from a checkpoint (None: whenever the run holds one, as a TorchTrainer finds
    its checkpoint itself). A new run is named by `trial_label`, described, and gets its logged
    model (PENDING until the result is in)."""
    resumable = [r for r in existing if r.info.status != FINISHED and RAY_CHECKPOINT in r.data.tags
                 and continues is not False]
    if resumable:
        keep = resumable[0]
        tracker.discard_stale([r for r in existing if r.info.run_id != keep.info.run_id])
        if keep.info.status != RUNNING:
            tracker.reopen_run(keep.info.run_id)
        tracker.set_tags(keep.info.run_id, {TRIAL_ID: trial_id})
        return keep.info.run_id
    tracker.discard_stale(existing)
    label = trial_label(trial_id, params)
    run_id = tracker.create_run(
        ctx.experiment_id, label,
        {**ctx.tags, ROLE: ROLE_TRIAL, SWEEP_ID: ctx.sweep_id, TRIAL_ID: trial_id,
         TRIAL_KEY: key, WORKERS: str(ctx.workers),
         LAUNCHER: "trial" if ctx.in_trial else "torch_trainer"},
        parent_run_id=ctx.parent_run_id)
    tracker.log_params(run_id, flatten(cfg.model_dump()))
    model_id = tracker.create_model(run_id, label, params, {ROLE: ROLE_TRIAL, SWEEP_ID: ctx.sweep_id})
    tracker.set_tags(run_id, {LOGGED_MODEL_ID: model_id})
    tracker.describe(run_id, describe_trial(label, ctx.sweep_id, ctx.workers, cfg))
    return run_id


def describe_trial(label: str, sweep_id: str, workers: int, cfg: FinetuneConfig, result=None,
                   steps: int | None = None) -> str:
    """A trial run's description (markdown): what it fine-tunes with which searched values, then,
    once it has them, its results."""
    m, t = cfg.model, cfg.train
    lines = [(f"**Trial {label.split(' ', 1)[0]}** of sweep `{sweep_id}`: fine-tunes `{m.arch}` "
              f"(pretrained `{m.pretrained}`, head from {m.head_init}) on `{name_of(cfg.data)}`."),
             "", f"Searched values: `{label.split(' ', 1)[-1] if ' ' in label else 'none'}`.",
             (f"Training: {t.epochs} epochs, global batch {t.batch_size}, lr {t.lr:.3g}, "
              f"weight decay {t.weight_decay:.3g}, augment {t.augment}; {workers} worker(s).")]
    if result is None:
        return "\n".join([*lines, "", "Running: results are added when the trial finishes."])
    shifts = ", ".join(f"{k} {v:.1%}" for k, v in result.shift_acc.items())
    return "\n".join([*lines, "",
                      (f"Held-out (selection) **{result.heldout_acc:.2%}**, test **{result.test_acc:.2%}**, "
                       f"mean shift **{result.shift_mean:.2%}** ({shifts})."),
                      (f"Trained {steps} steps in {result.train_seconds:.0f} s. The checkpoint is "
                       f"`{CHECKPOINT_PATH}` in this run's artifacts (sha256 in tag "
                       f"`{CHECKPOINT_SHA}`); the cook reads it from there.")])


class EndTrialRuns(tune.Callback):
    """Driver-side: a trial whose worker died or was stopped early leaves no RUNNING run behind."""

    def __init__(self, ctx: TrialContext):
        self.ctx = ctx

    def _end(self, trial, status: str, reason: str) -> None:
        tracker = Tracker(self.ctx.tracking_uri)
        key = trial_key(trial.trial_id, trial.config)
        for run in tracker.find_trial(self.ctx.experiment_id, self.ctx.sweep_id, key):
            if run.info.status == RUNNING:
                tracker.set_tags(run.info.run_id, {END_REASON: reason})
                tracker.end_run(run.info.run_id, status)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, FAILED, "trial errored")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, KILLED, "stopped early by the scheduler")


class TrialProgress(tune.Callback):
    """Driver-side progress on the driver's stdout: one line per trial started and finished (with
    its held-out accuracy); a reported epoch or checkpoint only with `verbose`, or when the trial
    has been quiet for `quiet_s` (an epoch of a real sweep takes hours, the tiny world's seconds;
    a trial that also reports errors prints them through `sweep.TrialDetail`).
    Its state is plain numbers: Tune saves its callbacks with the experiment state."""

    def __init__(self, verbose: bool = False, quiet_s: float = 300.0):
        self.verbose, self.quiet_s = verbose, quiet_s
        self.last: dict[str, float] = {}  # trial id -> when its last line was printed

    def log(self, trial, line: str) -> None:
        self.last[trial.trial_id] = time.monotonic()
        print(f"trial {trial_label(trial.trial_id, trial.config)}{line}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.log(trial, " started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if TEST_ACC in result:  # the final report: the finish line follows
            return
        if not self.verbose and time.monotonic() - self.last.get(trial.trial_id, 0.0) < self.quiet_s:
            return
        if METRIC in result and "epoch" in result:
            self.log(trial, f": epoch {result['epoch']:g}, step {result.get('step', 0):g}, "
                            f"held-out {result[METRIC]:.1%}")
        elif "step" in result:
            self.log(trial, f": checkpoint at step {result['step']:g}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        acc = (trial.last_result or {}).get(METRIC)
        self.log(trial, " finished" + (f": held-out {acc:.1%}" if acc is not None else ""))


# --- the training loop, and the two ways it is launched ---------------------------------------

class TuneLaunch:
    """The loop in the Tune trial's own actor: one process, reports through ``tune.report``."""

    def __init__(self, checkpoint):
        self.dist, self.device, self.local_lead, self.node = Dist(), None, True, None
        self.checkpoint = checkpoint  # Tune's restored checkpoint, or None

    def report(self, metrics: dict, folder: Path | None, name: str) -> None:
        # Tune names the folder (checkpoint_<n>); `name` is in the checkpoint's own state
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)


class TrainLaunch:
    """The loop on one worker of a TorchTrainer: rank r of W (the process group is Ray's),
    reports through ``ray.train.report`` (every rank calls it; rank 0's metrics count)."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.dist = Dist(ctx.get_world_rank(), ctx.get_world_size())
        self.device = ray.train.torch.get_device()
        self.local_lead = ctx.get_local_rank() == 0
        nodes = ctx.get_world_size() // max(1, ctx.get_local_world_size())
        self.node = f"node{ctx.get_node_rank()}" if nodes > 1 else None
        self.checkpoint = ray.train.get_checkpoint()

    def report(self, metrics: dict, folder: Path | None, name: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
                         checkpoint_dir_name=name)


def train_worker(config: dict) -> None:
    """Runs on each Ray Train worker of a TorchTrainer trial."""
    train_loop(config, TrainLaunch())


def train_loop(config: dict, launch) -> None:
    """The trial's training: `finetune` as `launch` places it, resumed from its checkpoint if any;
    rank 0 logs to MLflow and reports every epoch's checkpoint and, last, the trial's result."""
    import torch

    from orchestrator.record.trials import log_trial_result
    from orchestrator.train.finetune import finetune

    t_enter = time.time()
    dist = launch.dist
    torch.set_num_threads(max(1, int(config["cpu"])))
    cfg: FinetuneConfig = config["cfg"]  # validated by the trial, shipped as the object
    tracker = Tracker(config["tracking_uri"]) if dist.lead else None
    model_id, datasets = _inputs(tracker, config["run_id"], cfg) if dist.lead else (None, {})
    hooks = TrialHooks(tracker, config["run_id"], launch, model_id, datasets)
    checkpoint = launch.checkpoint
    monitor = (system_metrics(Tracker(config["tracking_uri"]), config["run_id"], node_id=launch.node)
               if launch.local_lead else contextlib.nullcontext())
    with monitor, (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as folder:
        hooks.folder = Path(folder) if folder else None
        result = finetune(cfg, dist=dist, hooks=hooks, device=launch.device)
    metrics: dict = {}
    if dist.lead:
        run = tracker.client.get_run(config["run_id"])
        if RESULT_LOGGED not in run.data.tags:
            t_log = time.time()
            log_trial_result(tracker, config["run_id"], result, step=hooks.last_step,
                             model_id=model_id, datasets=datasets)
            _finish(tracker, run, model_id, cfg, result, hooks.last_step, dist.world)
            # where the trial's time went, beside train_seconds (benchmarks/sweep_overhead.py)
            times = {"worker_start": t_enter - config["t_driver"], **result.timings,
                     "log_result": time.time() - t_log}
            tracker.log_metrics(config["run_id"], {time_metric(k): v for k, v in times.items()})
            tracker.set_tags(config["run_id"], {RESULT_LOGGED: "1"})
        metrics = {**result.metrics(), "epoch": cfg.train.epochs, "step": hooks.last_step}
    launch.report(metrics, None, "")


def _inputs(tracker: Tracker, run_id: str, cfg: FinetuneConfig) -> tuple[str, dict]:
    """The trial's logged model id and its splits as datasets (split -> (name, digest)), which
    are logged as the run's inputs on its first attempt. The task is built here once; `finetune`
    gets the same object from `data.load_task`'s cache."""
    from orchestrator.data import describe, load_task

    run = tracker.client.get_run(run_id)
    model_id = run.data.tags.get(LOGGED_MODEL_ID)
    if not model_id:  # a run from before trials had logged models, resumed
        model_id = tracker.create_model(run_id, run.info.run_name, {ROLE: ROLE_TRIAL})
        tracker.set_tags(run_id, {LOGGED_MODEL_ID: model_id})
    splits = describe(cfg.data, load_task(cfg.data))
    if not run.inputs.dataset_inputs:
        tracker.log_datasets(run_id, splits)
    return model_id, {s.split: (s.name, s.digest) for s in splits}


def _finish(tracker: Tracker, run, model_id: str, cfg: FinetuneConfig, result, steps: int,
            workers: int) -> None:
    """The trial's description gets its results; its logged model becomes READY, holding where
    the checkpoint is (the weights stay in the run's artifacts, the one copy the cook reads)."""
    tags = run.data.tags
    tracker.describe(run.info.run_id, describe_trial(run.info.run_name, tags.get(SWEEP_ID, ""), workers,
                                                     cfg, result, steps))
    sha = tracker.client.get_run(run.info.run_id).data.tags.get(CHECKPOINT_SHA, "")
    pointer = {"run_id": run.info.run_id, "artifact_path": CHECKPOINT_PATH, "sha256": sha,
               "uri": f"runs:/{run.info.run_id}/{CHECKPOINT_PATH}", "arch": cfg.model.arch}
    tracker.finish_model(model_id, READY, {CHECKPOINT_POINTER: json.dumps(pointer, indent=1)})


def checkpoint_name(position) -> str:
    """A checkpoint's name from where it was taken: ``epoch0002-end`` (after epoch 2) or
    ``epoch0003-step000000150`` (inside epoch 3)."""
    return (f"epoch{position.epoch - 1:04d}-end" if position.step == 0 else
            f"epoch{position.epoch:04d}-step{position.global_step:09d}")


class TrialHooks:
    """`finetune.Hooks` over the launch's reports (checkpoints) and MLflow (rank 0's metrics, each
    step once; held-out accuracy per epoch also as the logged model's, on the held-out dataset)."""

    def __init__(self, tracker: Tracker | None, run_id: str, launch, model_id: str | None = None,
                 datasets: dict | None = None):
        self.tracker, self.run_id, self.launch = tracker, run_id, launch
        self.model_id, self.datasets = model_id, datasets or {}
        self.folder: Path | None = None
        self.last_step = 0
        self.logged = -1  # the highest step an earlier attempt logged
        if tracker is not None:
            hist = tracker.client.get_metric_history(run_id, TRAIN_LOSS)
            self.logged = max((m.step for m in hist), default=-1)

    def resume_folder(self) -> Path | None:
        if self.folder is not None and self.tracker is not None:
            from orchestrator.train.state import peek

            state = peek(self.folder)
            self.tracker.set_tags(self.run_id, {RESUMED_FROM: checkpoint_name(state.position)})
            self._attempt(state.position.epoch, state.position.global_step)
            for row in state.curves:  # an epoch checkpointed but not yet logged when it died
                self.end_epoch(row)
        elif self.tracker is not None:
            self._attempt(1, 0)
        return self.folder

    def _attempt(self, epoch: int, step: int) -> None:
        """Record where this attempt starts: metric ``attempt_start_epoch`` (and ``_step``), one
        point per attempt (MLflow step = attempt number)."""
        n = len(self.tracker.client.get_metric_history(self.run_id, ATTEMPT_START_EPOCH))
        self.tracker.log_metrics(self.run_id, {ATTEMPT_START_EPOCH: epoch, ATTEMPT_START_STEP: step}, step=n)

    def log_steps(self, step: int, metrics: dict[str, float]) -> None:
        self.last_step = max(self.last_step, step)
        if step > self.logged:
            self.tracker.log_metrics(self.run_id, metrics, step=step)

    def checkpoint(self, position, metrics: dict, write) -> None:
        self.last_step = max(self.last_step, position.global_step)
        name = checkpoint_name(position)
        with tempfile.TemporaryDirectory(prefix="soup-ckpt-") as tmp:
            if write is not None:
                write(Path(tmp))
            self.launch.report({k: float(v) for k, v in metrics.items()}, Path(tmp) if write else None,
                               name)
        if self.tracker is not None:
            self.tracker.set_tags(self.run_id, {RAY_CHECKPOINT: name})

    def end_epoch(self, row: dict) -> None:
        if not self._epoch_logged(row["epoch"]):
            # one batch: a kill cannot leave the epoch marked logged without its accuracy
            self.tracker.log_metrics(self.run_id, {EPOCH: row["epoch"], METRIC: row[METRIC],
                                                   EPOCH_TRAIN_LOSS: row[TRAIN_LOSS]}, step=row["step"],
                                     model_id=self.model_id, datasets=self.datasets)

    def _epoch_logged(self, epoch: int) -> bool:
        return any(m.value == epoch for m in self.tracker.client.get_metric_history(self.run_id, EPOCH))
