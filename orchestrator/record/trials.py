"""What a trial leaves in its run besides its curves: the final result (metrics, checkpoint,
logits) and MLflow's system metrics while it trains.

The checkpoint goes to `schema.CHECKPOINT_PATH` with its sha256 as a tag, and the logits of every
evaluated split to `schema.LOGITS_PATH` in the format of `record.logits`, with their digest and
splits as tags: the cook reads both instead of scoring the checkpoint again.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Mapping

from orchestrator.record.schema import (
    CHECKPOINT_PATH,
    CHECKPOINT_SHA,
    HELDOUT_ACC,
    LOGITS_PATH,
    LOGITS_SHA,
    LOGITS_SPLITS,
    TRAIN_SECONDS,
)
from orchestrator.record.tracking import Tracker

__all__ = ["log_trial_result", "system_metrics"]


def log_trial_result(tracker: Tracker, run_id: str, result, step: int | None = None,
                     model_id: str | None = None, datasets: Mapping[str, tuple[str, str]] | None = None) -> None:
    """Log a fine-tuning result: final metrics at `step` (default: the epoch count), the checkpoint
    with its sha256, and the logits of every evaluated split (`record.logits`: float16, with the
    labels' digest), which the cook uses instead of scoring the checkpoint again. Held-out
    accuracy is left out when the run logged it per epoch: the last epoch's point is the final
    value. With `model_id` the final metrics are also the logged model's, on their `datasets`."""
    from safetensors.torch import save_file

    from orchestrator.hashing import file_sha256
    from orchestrator.record.logits import save_logits, splits_tag

    final = result.metrics()
    if result.curves:
        final.pop(HELDOUT_ACC)
    tracker.log_metrics(run_id, final, step=result.config.train.epochs if step is None else step,
                        model_id=model_id, datasets=datasets)
    tracker.log_metrics(run_id, {TRAIN_SECONDS: result.train_seconds})
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / Path(CHECKPOINT_PATH).name
        save_file({k: v.contiguous() for k, v in result.state_dict.items()}, str(ckpt),
                  metadata={"arch": result.config.model.arch})
        tracker.log_artifact(run_id, ckpt, str(Path(CHECKPOINT_PATH).parent))
        ckpt_sha = file_sha256(ckpt)
        tracker.set_tags(run_id, {CHECKPOINT_SHA: ckpt_sha})
        labeled = result.labeled_logits()
        logits = save_logits(Path(tmp) / Path(LOGITS_PATH).name, labeled, ckpt_sha)
        tracker.log_artifact(run_id, logits, str(Path(LOGITS_PATH).parent))
        tracker.set_tags(run_id, {LOGITS_SHA: file_sha256(logits), LOGITS_SPLITS: splits_tag(labeled)})


@contextlib.contextmanager
def system_metrics(tracker: Tracker, run_id: str, node_id: str | None = None, interval: float = 5.0):
    """MLflow's own system-metrics monitor on `run_id` while the block runs: CPU, memory, disk,
    network, and GPU utilisation and memory when there is a GPU (``system/...`` metrics, charted
    beside the loss). `node_id` names the machine when a run spans several. Resumes its step
    count after an earlier attempt's, so a resumed trial appends instead of overwriting. The
    last, cut-short interval is logged too, with a sample taken at the end, so a block shorter
    than `interval` (a resumed attempt with little left to train) still logs a point."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True,
                                   node_id=node_id, tracking_uri=tracker.uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()  # MLflow's loop drops what it sampled in an interval that finish() cuts
        try:
            monitor.collect_metrics()  # and one sample at the end, so there is always one to log
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as err:  # like MLflow's monitor: never fail or mask the block for this
            warnings.warn(f"system metrics: the last sample of run {run_id} was not logged: {err}")
