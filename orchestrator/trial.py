"""One sweep trial: a Ray Train run of `finetune` on the trial's workers, driven from Ray Tune.

This is the way Ray documents Train under Tune (Train V2): the Tune trial function builds a
`TorchTrainer` whose workers (DDP over NCCL on GPUs, Gloo on CPUs) run `finetune`, and a
`TuneReportCallback` forwards rank 0's reports to Tune. Per trial:

- the MLflow run is the driver's: created once, found again by the trial's key (its index and
  params) after a worker failure, a node loss or a driver restart, and never deleted while it
  holds a checkpoint;
- rank 0 writes a checkpoint (`trainstate`, no pickle) every epoch and every
  ``train.checkpoint_every_steps`` through Ray Train to ``<storage>/<sweep id>/train-<key>``,
  keeping the last two; a worker failure restarts the worker group from the latest one
  (``sweep.max_failures``), and a new driver (``soup sweep --resume``) finds it there by name;
- rank 0 logs every ``train.log_every_steps`` steps and every epoch to MLflow at the global step,
  skipping any step an earlier attempt already logged, so each point is logged once.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
from ray import tune
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from .config import FinetuneConfig, validate, with_overrides
from .hashing import json_sha256
from .tracking import (
    FAILED,
    FINISHED,
    KILLED,
    RUNNING,
    Tracker,
    flatten,
    system_metrics,
)

METRIC = "heldout_acc"
CHECKPOINT_TAG = "checkpoint"  # the trial run's latest Ray Train checkpoint (folder name)
RESULT_TAG = "result_logged"  # set once the final weights and logits are in the run


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs to know; small, so Tune can ship it to workers."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_id: str
    base: dict
    tags: dict = field(default_factory=dict)
    storage: str = ""  # the sweep's Tune storage path; trial checkpoints go under <storage>/<sweep id>
    workers: int = 1
    cpu: float = 1.0  # per worker
    gpu: float = 0.0  # per worker
    max_failures: int = 0


def trial_key(trial_id: str, params: dict[str, Any]) -> str:
    """A trial's identity across retries and resumes: its index in the sweep and its params.

    Tune keeps trial ids across `Tuner.restore`, but a sweep restarted from scratch (its Tune
    state lost) draws the same params in the same order under new ids; this key matches both.
    """
    digest = json_sha256(params, sort_keys=True, default=str)
    return f"{trial_id.rsplit('_', 1)[-1]}-{digest[:12]}"


def train_name(key: str) -> str:
    """The Ray Train run name of a trial: stable across attempts, so a new driver resumes it."""
    return f"train-{key}"


# --- the Tune trial function (the trial's driver) ---------------------------------------------

def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: a TorchTrainer of ``ctx.workers`` workers fine-tunes with `params` over the base
    config, logging to a nested MLflow run; resumes from the trial's checkpoint when it has one."""
    t_driver = time.time()
    cfg = with_overrides(validate(FinetuneConfig, ctx.base), params, "trial params")
    tracker = Tracker(ctx.tracking_uri)
    trial_id = tune.get_context().get_trial_id()
    key = trial_key(trial_id, params)
    existing = tracker.find_trial(ctx.experiment_id, ctx.sweep_id, key)
    finished = [r for r in existing if r.info.status == FINISHED]
    if finished:  # logged in full by an earlier attempt that died before Tune heard of it
        tune.report({**finished[0].data.metrics, "epoch": cfg.train.epochs})
        return
    run_id = _trial_run(tracker, ctx, existing, cfg, trial_id, key)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_id": run_id,
                           "tracking_uri": ctx.tracking_uri, "cpu": ctx.cpu, "t_driver": t_driver},
        scaling_config=ScalingConfig(num_workers=ctx.workers, use_gpu=ctx.gpu > 0,
                                     resources_per_worker={"CPU": ctx.cpu, "GPU": ctx.gpu}),
        run_config=RunConfig(
            name=train_name(key), storage_path=f"{ctx.storage}/{ctx.sweep_id}",
            failure_config=FailureConfig(max_failures=ctx.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]))
    try:
        trainer.fit()
    except Exception as err:
        tracker.set_tags(run_id, {"error": f"{type(err).__name__}: {err}"[:5000]})
        tracker.end_run(run_id, FAILED)
        raise
    tracker.end_run(run_id, FINISHED)


def _trial_run(tracker: Tracker, ctx: TrialContext, existing, cfg: FinetuneConfig, trial_id: str,
               key: str) -> str:
    """The trial's MLflow run: an unfinished one holding a checkpoint continues (reopened); any
    other unfinished run is replaced (a restart from scratch)."""
    resumable = [r for r in existing if r.info.status != FINISHED and CHECKPOINT_TAG in r.data.tags]
    if resumable:
        keep = resumable[0]
        tracker.discard_stale([r for r in existing if r.info.run_id != keep.info.run_id])
        if keep.info.status != RUNNING:
            tracker.reopen_run(keep.info.run_id)
        tracker.set_tags(keep.info.run_id, {"trial_id": trial_id})
        return keep.info.run_id
    tracker.discard_stale(existing)
    run_id = tracker.create_run(
        ctx.experiment_id, tune.get_context().get_trial_name(),
        {**ctx.tags, "soup.role": "trial", "sweep_id": ctx.sweep_id, "trial_id": trial_id,
         "trial_key": key, "workers": str(ctx.workers)},
        parent_run_id=ctx.parent_run_id)
    tracker.log_params(run_id, flatten(cfg.model_dump()))
    return run_id


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


class TrialProgress(tune.Callback):
    """Driver-side: one line per trial start, reported epoch or checkpoint, and end. Stateless
    (Tune saves its callbacks with the experiment state), printing to the driver's stdout."""

    @staticmethod
    def log(line: str) -> None:
        print(line, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.log(f"trial {trial.trial_id} started: {_short(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "test_acc" in result:  # the final report: the finish line follows
            return
        if "heldout_acc" in result and "epoch" in result:
            self.log(f"trial {trial.trial_id}: epoch {result['epoch']:g}, step {result.get('step', 0):g}, "
                     f"held-out {result['heldout_acc']:.3f}")
        elif "step" in result:
            self.log(f"trial {trial.trial_id}: checkpoint at step {result['step']:g}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.log(f"trial {trial.trial_id} finished")


def _short(config: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k.rsplit('.', 1)[-1]}={fmt(v)}" for k, v in sorted(config.items()))


# --- the Ray Train worker ---------------------------------------------------------------------

def train_worker(config: dict) -> None:
    """Runs on each Ray Train worker: `finetune` as rank r of W (the process group is Ray's)."""
    import torch

    from .finetune import Dist, finetune
    from .tracking import log_trial_result

    t_enter = time.time()
    ctx = ray.train.get_context()
    dist = Dist(ctx.get_world_rank(), ctx.get_world_size())
    torch.set_num_threads(max(1, int(config["cpu"])))
    cfg = validate(FinetuneConfig, config["cfg"])
    tracker = Tracker(config["tracking_uri"]) if dist.lead else None
    hooks = RayTrainHooks(tracker, config["run_id"], dist)
    checkpoint = ray.train.get_checkpoint()
    nodes = ctx.get_world_size() // max(1, ctx.get_local_world_size())
    monitor = (system_metrics(Tracker(config["tracking_uri"]), config["run_id"],
                              node_id=f"node{ctx.get_node_rank()}" if nodes > 1 else None)
               if ctx.get_local_rank() == 0 else contextlib.nullcontext())
    with monitor, (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as folder:
        hooks.folder = Path(folder) if folder else None
        result = finetune(cfg, dist=dist, hooks=hooks, device=ray.train.torch.get_device())
    metrics: dict = {}
    if dist.lead:
        run = tracker.client.get_run(config["run_id"])
        if RESULT_TAG not in run.data.tags:
            t_log = time.time()
            log_trial_result(tracker, config["run_id"], result, step=hooks.last_step)
            # where the trial's time went, beside train_seconds (benchmarks/sweep_overhead.py)
            times = {"worker_start": t_enter - config["t_driver"], **result.timings,
                     "log_result": time.time() - t_log}
            tracker.log_metrics(config["run_id"], {f"time_{k}_s": v for k, v in times.items()})
            tracker.set_tags(config["run_id"], {RESULT_TAG: "1"})
        metrics = {**result.metrics(), "epoch": cfg.train.epochs, "step": hooks.last_step}
    ray.train.report(metrics)


class RayTrainHooks:
    """`finetune.Hooks` over Ray Train (checkpoints) and MLflow (rank 0's metrics, each step once)."""

    def __init__(self, tracker: Tracker | None, run_id: str, dist):
        self.tracker, self.run_id, self.dist = tracker, run_id, dist
        self.folder: Path | None = None
        self.last_step = 0
        self.logged = -1  # the highest step an earlier attempt logged
        if tracker is not None:
            hist = tracker.client.get_metric_history(run_id, "train_loss")
            self.logged = max((m.step for m in hist), default=-1)

    def resume_folder(self) -> Path | None:
        if self.folder is not None and self.tracker is not None:
            from .trainstate import peek

            state = peek(self.folder)
            self.tracker.set_tags(self.run_id, {"resumed_from": self.folder.name})
            self._attempt(state.position.epoch, state.position.global_step)
            for row in state.curves:  # an epoch checkpointed but not yet logged when it died
                self.end_epoch(row)
        elif self.tracker is not None:
            self._attempt(1, 0)
        return self.folder

    def _attempt(self, epoch: int, step: int) -> None:
        """Record where this attempt starts: metric ``attempt_start_epoch`` (and ``_step``), one
        point per attempt (MLflow step = attempt number)."""
        n = len(self.tracker.client.get_metric_history(self.run_id, "attempt_start_epoch"))
        self.tracker.log_metrics(self.run_id, {"attempt_start_epoch": epoch, "attempt_start_step": step}, step=n)

    def log_steps(self, step: int, metrics: dict[str, float]) -> None:
        self.last_step = max(self.last_step, step)
        if step > self.logged:
            self.tracker.log_metrics(self.run_id, metrics, step=step)

    def checkpoint(self, position, metrics: dict, write) -> None:
        self.last_step = max(self.last_step, position.global_step)
        name = (f"epoch{position.epoch - 1:04d}-end" if position.step == 0 else
                f"epoch{position.epoch:04d}-step{position.global_step:09d}")
        with tempfile.TemporaryDirectory(prefix="soup-ckpt-") as tmp:
            if write is not None:
                write(Path(tmp))
            report = {k: float(v) for k, v in metrics.items()}
            ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp) if write else None,
                             checkpoint_dir_name=name)
        if self.tracker is not None:
            self.tracker.set_tags(self.run_id, {CHECKPOINT_TAG: name})

    def end_epoch(self, row: dict) -> None:
        if not self._epoch_logged(row["epoch"]):
            self.tracker.log_metrics(self.run_id, {"epoch": row["epoch"], METRIC: row[METRIC],
                                                   "epoch_train_loss": row["train_loss"]}, step=row["step"])

    def _epoch_logged(self, epoch: int) -> bool:
        return any(m.value == epoch for m in self.tracker.client.get_metric_history(self.run_id, "epoch"))
