"""The MLflow facade: run hierarchy, artifacts, search, logged models and the model registry.

Every call to an MLflow store goes through this module (`Tracker` and the functions below). The
one other module that imports mlflow is `serving`, whose pyfunc model class MLflow loads at
serving time; promotion policy (`promotion`) reads and moves aliases through `Tracker`.

A sweep is one parent run; each trial is a nested run (``mlflow.parentRunId``) found again by its
``sweep_id`` and ``trial_id`` tags, which is what makes retries and resumes idempotent. Everything
goes through an explicit `MlflowClient` and explicit run ids: trials log from Ray workers, where
no fluent "active run" can be relied on.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import os
import re
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import mlflow
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    Metric,
    Param,
    RunTag,
)
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

try:  # MLflow's public limits (mlflow.utils.validation): promotion checks them before writing
    from mlflow.utils.validation import (
        MAX_MODEL_REGISTRY_TAG_KEY_LENGTH,
        MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH,
        MAX_REGISTERED_MODEL_ALIAS_LENGTH,
    )
except ImportError:  # their values in MLflow 3.x, should a release move or rename them
    MAX_MODEL_REGISTRY_TAG_KEY_LENGTH = 250
    MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH = 100_000
    MAX_REGISTERED_MODEL_ALIAS_LENGTH = 255

DEFAULT_URI = "sqlite:///mlflow.db"
_PACKAGE = Path(__file__).resolve().parents[1]  # shipped with a logged soup: serving.py loads from it
ROLE, SWEEP_ID, TRIAL_ID = "soup.role", "sweep_id", "trial_id"
CHECKPOINT_PATH = "checkpoint/model.safetensors"
LOGS_DIR = "logs"  # the detail logs of the commands that worked on a run
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
DESCRIPTION = "mlflow.note.content"  # the run's, version's or model's description in the UI
CONTEXT, SPLIT = "mlflow.data.context", "soup.split"  # a dataset input's role and split key
MODEL_TAG = "logged_model_id"  # a trial run's logged model, created with the run


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI from the argument or `MLFLOW_TRACKING_URI`, with sqlite paths made
    absolute so that Ray workers, which run in other directories, reach the same store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _artifact_root(uri: str) -> str | None:
    """Local artifacts live beside a sqlite store (absolute, for the same reason as above)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def retry(fn: Callable[[], Any], attempts: int = 5, delay: float = 1.0) -> Any:
    """Call `fn`, retrying with backoff on errors from the tracking server (it may restart)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - MLflow raises several unrelated types for outages
            if i == attempts - 1:
                raise
            time.sleep(delay * 2 ** i)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (``train.lr``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def searchable(value: str) -> bool:
    """Whether `value` can be an MLflow search literal: non-empty, with no quote or backslash
    (MLflow's filter grammar has no escape for them)."""
    return bool(value) and not any(c in value for c in "'\"\\`")


def quoted(value: str) -> str:
    """`value` as a string literal of an MLflow search filter; refuses what a filter cannot hold.

    A value that is not `searchable` can neither be searched for nor safely pasted into a filter:
    every search here builds its literals with this.
    """
    value = str(value)
    if not searchable(value):
        raise ValueError(f"{value!r} cannot be used in an MLflow search: empty, or holds a quote")
    return f"'{value}'"


def metric_split(key: str) -> str | None:
    """The split a metric was measured on: ``heldout_acc`` -> heldout, ``test_acc`` -> test,
    ``shift_rotate_acc`` or ``rotate_acc`` -> rotate; None for others (a mean over shifts, a loss)."""
    m = re.fullmatch(r"(?:shift_)?(.+)_acc", key)
    return None if m is None or m.group(1) in ("mean", "shift_mean") else m.group(1)


def model_name(text: str) -> str:
    """`text` as a logged model's name, which MLflow forbids to hold ``/ : . % " '``:
    ``t07 lr=3.1e-05 ep=10`` -> ``t07-lr3_1e-05-ep10``."""
    return re.sub(r"[/:.%\"']", "_", text.replace("=", "").replace(" ", "-")) or "model"


@functools.lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """The source tags the UI shows for a run: user, and the git commit when this package runs
    from a git checkout (as MLflow's fluent API sets them)."""
    tags = {"mlflow.user": _user(), "mlflow.source.type": "JOB", "mlflow.source.name": "orchestrator"}
    root = _PACKAGE.parent
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=30, check=False)
            if out.returncode == 0 and out.stdout.strip():
                tags["mlflow.source.git.commit"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass  # no git here: the commit is simply not known
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return os.environ.get("USER", "unknown")


class RegistryError(ValueError):
    """The model registry refused a change; the message is MLflow's reason."""


class Tracker:
    """A thin, explicit-id facade over `MlflowClient` for the orchestrator's run hierarchy."""

    def __init__(self, uri: str | None = None):
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # -- experiments and runs -------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        """Id of experiment `name`, created (with local artifacts beside a sqlite store) if new."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=_artifact_root(self.uri))

    def search(self, experiment_id: str, filter_string: str, order_by: list[str] | None = None):
        """All runs of an experiment matching an MLflow filter, paging through results."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], filter_string, order_by=order_by,
                                           max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str],
                   parent_run_id: str | None = None) -> str:
        tags = {**source_tags(), **tags}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = retry(lambda: self.client.create_run(experiment_id, tags=tags, run_name=name))
        return run.info.run_id

    def end_run(self, run_id: str, status: str = FINISHED) -> None:
        retry(lambda: self.client.set_terminated(run_id, status))

    def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a resumed sweep), dropping its ``end_reason`` tag."""
        retry(lambda: self.client.update_run(run_id, status=RUNNING))
        if "end_reason" in self.client.get_run(run_id).data.tags:
            retry(lambda: self.client.delete_tag(run_id, "end_reason"))

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            retry(lambda: self.client.log_batch(run_id, params=items[i:i + 100]))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0,
                    model_id: str | None = None,
                    datasets: Mapping[str, tuple[str, str]] | None = None) -> None:
        """Log metrics at `step`; with `model_id` they are also the logged model's, each linked to
        the dataset (name, digest) of its split in `datasets` (`metric_split` names the split)."""
        ts = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            name, digest = (datasets or {}).get(metric_split(k) or "", (None, None))
            items.append(Metric(k, float(v), ts, step, model_id=model_id, dataset_name=name,
                                dataset_digest=digest, run_id=run_id if model_id else None))
        retry(lambda: self.client.log_batch(run_id, metrics=items))

    def describe(self, run_id: str, text: str) -> None:
        """Set the run's description (the UI's Description box, ``mlflow.note.content``)."""
        self.set_tags(run_id, {DESCRIPTION: text})

    # -- datasets and logged models -------------------------------------------------------------
    def log_datasets(self, run_id: str, splits: Iterable) -> None:
        """Log each split (`data.SplitInfo`: name, role, split, digest, source, rows) as a dataset
        input of the run, its role as MLflow's dataset context."""
        inputs = [DatasetInput(
            Dataset(s.name, s.digest, "local" if Path(s.source).is_absolute() else "code",
                    json.dumps({"uri": s.source}), profile=json.dumps({"num_rows": s.rows})),
            tags=[InputTag(CONTEXT, s.role), InputTag(SPLIT, s.split)]) for s in splits]
        retry(lambda: self.client.log_inputs(run_id, datasets=inputs))

    def run_datasets(self, run_id: str) -> dict[str, tuple[str, str]]:
        """Split key -> (dataset name, digest) of the run's dataset inputs."""
        out = {}
        for d in retry(lambda: self.client.get_run(run_id)).inputs.dataset_inputs:
            split = next((t.value for t in d.tags if t.key == SPLIT), None)
            if split:
                out[split] = (d.dataset.name, d.dataset.digest)
        return out

    def copy_datasets(self, from_run: str, to_run: str) -> dict[str, tuple[str, str]]:
        """Log `from_run`'s dataset inputs on `to_run` too (a soup is measured on its ingredients'
        splits); returns them as `run_datasets` does."""
        inputs = list(retry(lambda: self.client.get_run(from_run)).inputs.dataset_inputs)
        if inputs:
            retry(lambda: self.client.log_inputs(to_run, datasets=inputs))
        return self.run_datasets(to_run)

    def create_model(self, run_id: str, name: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None) -> str:
        """A logged model (PENDING) named `name`, produced by run `run_id`; returns its id."""
        run = retry(lambda: self.client.get_run(run_id))
        model = retry(lambda: self.client.create_logged_model(
            run.info.experiment_id, name=model_name(name), source_run_id=run_id,
            params={k: str(v)[:6000] for k, v in (params or {}).items()},
            tags={k: str(v) for k, v in (tags or {}).items()}))
        retry(lambda: self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)]))
        return model.model_id

    def finish_model(self, model_id: str, status: str = "READY", files: Mapping[str, str] | None = None):
        """Upload `files` (name -> text) into the logged model's artifacts and mark it `status`
        (READY, or FAILED for a run that failed)."""
        if files:
            with tempfile.TemporaryDirectory() as tmp:
                for name, text in files.items():
                    (Path(tmp) / name).write_text(text)
                retry(lambda: self.client.log_model_artifacts(model_id, tmp))
        return retry(lambda: self.client.finalize_logged_model(model_id, status))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        retry(lambda: self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_dir: str | None = None) -> None:
        retry(lambda: self.client.log_artifact(run_id, str(local_path), artifact_dir))

    def keep_log(self, run_id: str, path: str | Path) -> str:
        """Keep a command's detail log on `run_id` too (a job's log file stays on the node that
        ran it); its artifact path is returned."""
        self.log_artifact(run_id, path, LOGS_DIR)
        return f"{LOGS_DIR}/{Path(path).name}"

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        retry(lambda: self.client.log_text(run_id, text, artifact_file))

    def download(self, run_id: str, path: str, dst: str | Path) -> Path:
        return Path(retry(lambda: self.client.download_artifacts(run_id, path, str(dst))))

    # -- sweeps and trials ----------------------------------------------------------------------
    def find_sweep(self, experiment_id: str, sweep_id: str):
        """The parent run of sweep `sweep_id`, or None."""
        runs = self.search(experiment_id, f"tags.`{ROLE}` = 'sweep' and tags.{SWEEP_ID} = {quoted(sweep_id)}")
        return runs[0] if runs else None

    def _trials_filter(self, experiment_id: str, sweep_id: str) -> str | None:
        """The filter of the trial runs of the live sweep `sweep_id`: nested under its run, not
        only tagged with its id. A sweep id may be reused once its sweep run was deleted, and
        MLflow leaves the deleted sweep's trials active: they belong to no live sweep."""
        parent = self.find_sweep(experiment_id, sweep_id)
        if parent is None:
            return None
        return (f"tags.`{ROLE}` = 'trial' and tags.{SWEEP_ID} = {quoted(sweep_id)} "
                f"and tags.`mlflow.parentRunId` = {quoted(parent.info.run_id)}")

    def trial_runs(self, experiment_id: str, sweep_id: str, status: str | None = None):
        """The sweep's trial runs, best held-out accuracy first."""
        f = self._trials_filter(experiment_id, sweep_id)
        if f is None:
            return []
        if status:
            f += f" and attributes.status = {quoted(status)}"
        return self.search(experiment_id, f, order_by=["metrics.heldout_acc DESC"])

    def find_trial(self, experiment_id: str, sweep_id: str, trial_key: str):
        """Runs of one trial, matched by its key (see `trial.trial_key`)."""
        f = self._trials_filter(experiment_id, sweep_id)
        return [] if f is None else self.search(experiment_id, f + f" and tags.trial_key = {quoted(trial_key)}")

    def discard_stale(self, runs: Iterable) -> None:
        """A trial restarted from scratch replaces its unfinished run: end it KILLED, delete it
        with the logged models it produced (else they would stay PENDING in the Models tab)."""
        for run in runs:
            if run.info.status != FINISHED:
                if run.info.status == RUNNING:
                    self.end_run(run.info.run_id, KILLED)
                models = {m.model_id for m in self.logged_models_of(run.info.experiment_id, run.info.run_id)}
                for model_id in models | ({run.data.tags[MODEL_TAG]} if run.data.tags.get(MODEL_TAG) else set()):
                    self.delete_logged_model(model_id)
                retry(lambda: self.client.delete_run(run.info.run_id))

    def logged_models_of(self, experiment_id: str, run_id: str, status: str | None = None) -> list:
        """The logged models run `run_id` produced (of `status`, e.g. PENDING, if given)."""
        f = f"source_run_id = {quoted(run_id)}" + (f" AND status = {quoted(status)}" if status else "")
        return list(retry(lambda: self.client.search_logged_models([experiment_id], filter_string=f)))

    def delete_logged_model(self, model_id: str) -> None:
        """Delete a logged model (one already gone is no error)."""
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            self.client.delete_logged_model(model_id)

    def delete_run(self, run_id: str) -> None:
        """Delete a run (it moves to MLflow's deleted lifecycle stage)."""
        retry(lambda: self.client.delete_run(run_id))

    # -- model registry -------------------------------------------------------------------------
    def delete_version(self, name: str, version: str | int) -> None:
        """Delete one version of registered model `name`."""
        retry(lambda: self.client.delete_model_version(name, str(version)))

    def registered_model(self, name: str):
        """The registered model `name`, or None."""
        return self._or_none(lambda: self.client.get_registered_model(name))

    def model_version(self, name: str, version: str | int):
        """Version `version` of registered model `name`, or None."""
        return self._or_none(lambda: self.client.get_model_version(name, str(version)))

    def version_by_alias(self, name: str, alias: str):
        """The version `alias` points at, or None (no such alias or model)."""
        return self._or_none(lambda: self.client.get_model_version_by_alias(name, alias))

    def model_versions(self, name: str) -> list:
        """Every version of registered model `name` (none for an unknown model)."""
        return list(self.client.search_model_versions(f"name = {quoted(name)}"))

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        """Point `alias` at `version`; `RegistryError` with MLflow's reason if it refuses."""
        try:
            self.client.set_registered_model_alias(name, alias, str(version))
        except mlflow.exceptions.MlflowException as err:  # e.g. a reserved alias ('latest', 'v3')
            raise RegistryError(err.message) from None

    def describe_model(self, name: str, text: str, version: str | int | None = None) -> None:
        """Set the description of registered model `name`, or of one of its versions."""
        if version is None:
            retry(lambda: self.client.update_registered_model(name, description=text))
        else:
            retry(lambda: self.client.update_model_version(name, str(version), description=text))

    def set_version_tag(self, name: str, version: str | int, key: str, value: str) -> None:
        retry(lambda: self.client.set_model_version_tag(name, str(version), key, value))

    def delete_version_tag(self, name: str, version: str | int, key: str) -> None:
        """Remove tag `key` from version `version` of registered model `name` (none there: no-op)."""
        retry(lambda: self.client.delete_model_version_tag(name, str(version), key))

    @staticmethod
    def _or_none(fetch: Callable[[], Any]):
        try:
            return fetch()
        except mlflow.exceptions.MlflowException:
            return None


def log_trial_result(tracker: Tracker, run_id: str, result, step: int | None = None,
                     model_id: str | None = None, datasets: Mapping[str, tuple[str, str]] | None = None) -> None:
    """Log a fine-tuning result: final metrics at `step` (default: the epoch count), the checkpoint
    with its sha256, and the logits of every evaluated split (`logitstore`: float16, with the
    labels' digest), which the cook uses instead of scoring the checkpoint again. Held-out
    accuracy is left out when the run logged it per epoch: the last epoch's point is the final
    value. With `model_id` the final metrics are also the logged model's, on their `datasets`."""
    from safetensors.torch import save_file

    from orchestrator.hashing import file_sha256
    from orchestrator.record.logits import LOGITS_PATH, SHA_TAG, SPLITS_TAG, save_logits, splits_tag

    final = result.metrics()
    if result.curves:
        final.pop("heldout_acc")
    tracker.log_metrics(run_id, final, step=result.config.train.epochs if step is None else step,
                        model_id=model_id, datasets=datasets)
    tracker.log_metrics(run_id, {"train_seconds": result.train_seconds})
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / Path(CHECKPOINT_PATH).name
        save_file({k: v.contiguous() for k, v in result.state_dict.items()}, str(ckpt),
                  metadata={"arch": result.config.model.arch})
        tracker.log_artifact(run_id, ckpt, str(Path(CHECKPOINT_PATH).parent))
        ckpt_sha = file_sha256(ckpt)
        tracker.set_tags(run_id, {"checkpoint_sha256": ckpt_sha})
        labeled = result.labeled_logits()
        logits = save_logits(Path(tmp) / Path(LOGITS_PATH).name, labeled, ckpt_sha)
        tracker.log_artifact(run_id, logits, str(Path(LOGITS_PATH).parent))
        tracker.set_tags(run_id, {SHA_TAG: file_sha256(logits), SPLITS_TAG: splits_tag(labeled)})


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


__all__ = ["Tracker", "RegistryError", "resolve_uri", "flatten"]


# --- sweeps located, soups logged and registered ----------------------------------------------

def locate_sweep(tracker: Tracker, sweep_id: str):
    """(experiment id, parent run) of sweep `sweep_id`, searched across all experiments."""
    try:
        wanted = quoted(sweep_id)
    except ValueError:
        return None, None  # `run_sweep` refuses such ids, so no sweep can carry one
    exps = [e.experiment_id for e in tracker.client.search_experiments()]
    runs = tracker.client.search_runs(exps, f"tags.`{ROLE}` = 'sweep' and tags.{SWEEP_ID} = {wanted}")
    if not runs:
        return None, None
    return runs[0].info.experiment_id, runs[0]


def soup_runs(tracker: Tracker, experiment_id: str, soup_key: str, status: str | None = None) -> list:
    """Soup runs with this key (recipe, settings and ingredients), of `status` if given."""
    f = f"tags.`{ROLE}` = 'soup' and tags.soup_key = {quoted(soup_key)}"
    return tracker.search(experiment_id, f + (f" and attributes.status = {quoted(status)}" if status else ""))


def find_soup(tracker: Tracker, experiment_id: str, soup_key: str):
    """A FINISHED soup run with this key, or None."""
    runs = soup_runs(tracker, experiment_id, soup_key, FINISHED)
    return runs[0] if runs else None


def stale_soups(tracker: Tracker, experiment_id: str, soup_key: str) -> list:
    """Unfinished soup runs with this key: being logged, or left by a cook killed while logging."""
    return [r for r in soup_runs(tracker, experiment_id, soup_key) if r.info.status != FINISHED]


def read_artifact_text(tracker: Tracker, run_id: str, path: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return tracker.download(run_id, path, tmp).read_text()


def log_soup_model(tracker: Tracker, run_id: str, weights: Path, config: dict, example_png: bytes,
                   name: str = "model", model_id: str | None = None):
    """Log the soup as a pyfunc built from code (`orchestrator/serving.py`) with its weights, as an
    MLflow logged model produced by run `run_id` (the PENDING `model_id` made by
    `Tracker.create_model`, or a new one named `name`); returns the logged model (`model_id`,
    `artifact_location`, `model_uri`).

    Only `MlflowClient` calls on this tracker's store (no fluent API, so no process-global
    tracking URI or active run is read or changed): the model is created, saved locally, uploaded
    and then marked READY, as `mlflow.pyfunc.log_model` does.
    """
    import pandas as pd

    client = tracker.client
    if model_id is None:
        model_id = tracker.create_model(run_id, name, retry(lambda: client.get_run(run_id)).data.params)
    model = retry(lambda: client.get_logged_model(model_id))
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "soup_config.json"
        cfg_path.write_text(json.dumps(config, indent=2))
        example = pd.DataFrame({"image": [example_png]})
        local = Path(tmp) / "model"
        with warnings.catch_warnings():  # MLflow's input-example code trips a pandas deprecation
            warnings.filterwarnings("ignore", message="Operation with range is deprecated", module=r"mlflow\.")
            _save_pyfunc(local, weights, cfg_path, example, model, run_id)
        retry(lambda: client.log_model_artifacts(model.model_id, str(local)))
    return retry(lambda: client.finalize_logged_model(model.model_id, "READY"))


def _save_pyfunc(local: Path, weights: Path, cfg_path: Path, example, model, run_id: str) -> None:
    """The soup as a pyfunc from code, saved in `local` for the logged `model` of run `run_id`."""
    mlflow.pyfunc.save_model(
        str(local), python_model=str(_PACKAGE / "serving.py"), code_paths=[str(_PACKAGE)],
        artifacts={"weights": str(weights), "config": str(cfg_path)},
        input_example=example, pip_requirements=_requirements(), signature=_SIGNATURE,
        mlflow_model=mlflow.models.Model(artifact_path=model.artifact_location, run_id=run_id,
                                         model_uuid=model.model_id, model_id=model.model_id))


# declared, not inferred: inferring from an example warns that integer columns cannot hold NaN
_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),
    outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.long, "label_index"),
                    ColSpec(Array(DataType.double), "probabilities")]))


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "torchvision", "open_clip_torch", "safetensors",
                                           "pydantic", "pyyaml", "pillow", "pandas", "mlflow")]


def register_soup(tracker: Tracker, logged_model, model_name: str, run_id: str,
                  tags: dict[str, Any], description: str | None = None):
    """Register a logged soup (from `log_soup_model`) as a new version of `model_name` (created if
    new), produced by run `run_id`, with its tags.

    The version's source is the logged model's ``models:/<model_id>`` URI, which the UI links to
    the model, wherever the store can resolve it: a tracking server resolves it in its own store,
    but a database store opened in this process resolves it through MLflow's process-global
    client. When that global points elsewhere, the source is the model's artifact location
    instead (the globals are read, never changed).
    """
    client = tracker.client
    if tracker.registered_model(model_name) is None:
        try:
            client.create_registered_model(model_name)
        except mlflow.exceptions.MlflowException:
            if tracker.registered_model(model_name) is None:  # not a concurrent creation
                raise
    resolvable = tracker.uri.startswith(("http://", "https://")) or \
        resolve_uri(mlflow.get_tracking_uri()) == tracker.uri
    source = logged_model.model_uri if resolvable else logged_model.artifact_location
    return retry(lambda: client.create_model_version(
        model_name, source, run_id=run_id, description=description,
        tags={k: str(v) for k, v in tags.items()}, model_id=logged_model.model_id))


def find_version(tracker: Tracker, model_name: str, soup_key: str):
    """The registered version of `model_name` carrying this soup key, or None."""
    try:
        versions = tracker.model_versions(model_name)
    except Exception:  # noqa: BLE001 - no such registered model yet
        return None
    return next((v for v in versions if v.tags.get("soup_key") == soup_key), None)


# --- the store checked before a command works --------------------------------------------------

class StoreError(ValueError):
    """An MLflow store that a command cannot use; the message names the URI and why."""


# The stores soup works with: MLflow's database stores (a scheme may name its driver, as in
# postgresql+psycopg2) and its tracking servers. MLflow's file store (a folder, `file:`) is not one:
# MLflow keeps it in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE is set.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https", "databricks")
STORES_HINT = "sqlite:///PATH, postgresql://..., http(s)://SERVER"
# Tables only an MLflow store has: `experiments` is created first, `alembic_version` when the schema
# is migrated right after (a store being created holds one without the other for a moment).
MLFLOW_TABLES = frozenset({"experiments", "alembic_version"})


def check_store(uri: str, write: bool = True, must_exist: bool = True) -> None:
    """Refuse a store that cannot be used, before a command does any work.

    A URI that names no store soup can use (a plain path, MLflow's file store, an unknown scheme)
    is refused for every command. For a local sqlite store: `must_exist`: the store is read, not
    started (a mistyped URI, or an empty database, is not made a store). A sqlite file that holds
    another program's tables is refused (MLflow would add its own beside them). `write`: the
    command logs to it, so a read-only file or folder is refused now, rather than after the work,
    as a retried error on every write. Writability is tried, not guessed from permission bits
    (which do not bind root): a write transaction is begun and rolled back. A locked store is in
    use by a writer, so it is accepted. Other stores (a tracking server, a database server) report
    their own problems on the first call.
    """
    _check_scheme(uri)
    path = _sqlite_file(uri)
    if path is None:
        return
    if path.is_dir():
        raise StoreError(f"MLflow store {uri} cannot be opened: {path} is a folder, not a sqlite file")
    if not path.exists():
        if must_exist:
            raise StoreError(f"no MLflow store at {uri} (set MLFLOW_TRACKING_URI to the sweep's store)")
        _check_new_store_folder(uri, path.parent, write)
        return
    _check_sqlite(uri, path, write, must_exist)


def store_schemes() -> tuple[str, ...]:
    """The URI schemes soup accepts: MLflow's database stores and tracking servers, and any store
    plugin installed for both tracking and the registry (a `Tracker` uses one URI for both),
    found as MLflow finds plugins: by their entry points."""
    from importlib.metadata import entry_points

    groups = ("mlflow.tracking_store", "mlflow.model_registry_store")
    plugins = set.intersection(*({e.name for e in entry_points(group=g)} for g in groups))
    builtin = DATABASE_SCHEMES + SERVER_SCHEMES
    return builtin + tuple(sorted(plugins - set(builtin)))


def _check_scheme(uri: str) -> None:
    """Refuse a URI that names no store soup can use with one line, not MLflow's traceback."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    if uri == "databricks" or scheme in store_schemes() or scheme.partition("+")[0] in DATABASE_SCHEMES:
        return
    if not scheme:  # MLflow takes a plain path for a file store
        raise StoreError(_path_problem(uri))
    if scheme == "file":
        raise StoreError(f"MLFLOW_TRACKING_URI {uri!r} is MLflow's file store, which soup does not "
                         "support (MLflow keeps it in maintenance mode and refuses it by default): it "
                         f"needs a database store or a tracking server: {STORES_HINT}")
    raise StoreError(_unknown_scheme(uri, scheme))


def _path_problem(uri: str) -> str:
    """Why a plain path is no tracking URI, with the URI that was probably meant."""
    if Path(uri).expanduser().is_dir():
        return (f"MLFLOW_TRACKING_URI {uri!r} is a path to a folder, not a URI: a folder is MLflow's "
                "file store, which soup does not support: it needs a database store or a tracking "
                f"server: {STORES_HINT}")
    return f"MLFLOW_TRACKING_URI {uri!r} is a path, not a URI: use sqlite:///{Path(uri).expanduser()}"


def _unknown_scheme(uri: str, scheme: str) -> str:
    """The refusal of a scheme MLflow has no store for, listing those soup accepts."""
    import difflib

    known = store_schemes()
    near = difflib.get_close_matches(scheme, known, n=1)
    guess = f" (did you mean {near[0]}?)" if near else ""
    return (f"MLFLOW_TRACKING_URI {_masked(uri)!r} has an unknown scheme {scheme!r}{guess}: soup "
            f"accepts {', '.join(known)} (a database scheme may name its driver, as in "
            "postgresql+psycopg2)")


def _masked(uri: str) -> str:
    """`uri` with its password, if any, masked: the error line may end up in a shared log."""
    from urllib.parse import urlparse

    password = urlparse(uri).password
    return uri.replace(f":{password}@", ":***@", 1) if password else uri


def _sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (without its query), or None for other stores."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    name = uri[len(prefix):].partition("?")[0]
    return Path(name) if name and name != ":memory:" else None


def _check_new_store_folder(uri: str, folder: Path, write: bool) -> None:
    """A store that MLflow will create needs an existing folder it can create files in."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise StoreError(f"MLflow store {uri} cannot be opened: {existing} is a file, not a folder")
    if existing != folder:
        raise StoreError(f"MLflow store {uri} cannot be opened: folder {folder} does not exist")
    if write:
        try:  # what sqlite will do to create the store (the probe file is removed at once)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            raise StoreError(f"MLflow store {uri} cannot be created: folder {folder} is not "
                             f"writable ({err.strerror or err})") from None


def _check_sqlite(uri: str, path: Path, write: bool, must_exist: bool) -> None:
    """Open the file as sqlite, check what it holds, and, with `write`, begin a write and roll it
    back; nothing is written to the file."""
    import sqlite3
    from urllib.parse import quote

    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, timeout=5,
                               isolation_level=None)
    except sqlite3.Error as err:
        raise StoreError(f"MLflow store {uri} cannot be opened: {err}") from None
    try:
        _sqlite_step(uri, "cannot be opened", lambda: conn.execute("PRAGMA schema_version").fetchone())
        _check_tables(uri, path, conn, must_exist)
        if write:
            _sqlite_step(uri, "is read-only", lambda: _begin_and_roll_back(conn), path.parent)
    finally:
        conn.close()


def _check_tables(uri: str, path: Path, conn, must_exist: bool) -> None:
    """Refuse another program's database (MLflow would add its tables beside that program's) and,
    where the store is read, an empty one (it holds no store; reading would make it one)."""
    tables = _sqlite_step(uri, "cannot be opened", lambda: [row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 7) != 'sqlite_' "
        "ORDER BY name")])
    if tables is None:  # locked by a writer: in use, as a store is
        return
    if not tables:
        if must_exist:
            raise StoreError(f"no MLflow store at {uri}: {path} is an empty database "
                             "(set MLFLOW_TRACKING_URI to the sweep's store)")
        return  # a new store: MLflow creates its tables in it
    if not MLFLOW_TABLES & set(tables):
        raise StoreError(f"MLflow store {uri} is not an MLflow database: it holds other tables "
                         f"(e.g. {tables[0]!r}); point MLFLOW_TRACKING_URI at an MLflow store or a new file")


def _begin_and_roll_back(conn) -> None:
    """A real write (a table created in a transaction that is rolled back): sqlite reports a
    read-only file at the BEGIN and a read-only folder when it creates its journal there."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE soup_write_probe (x)")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _sqlite_step(uri: str, failure: str, step: Callable[[], Any], folder: Path | None = None) -> Any:
    """Run one sqlite step and return its result; None when a writer holds a lock (the store is
    in use, so usable); any other error is a `StoreError`."""
    import sqlite3

    try:
        return step()
    except sqlite3.Error as err:
        code = getattr(err, "sqlite_errorname", "")
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return None  # another process is writing to it: it is a usable store
        why = str(err)
        if folder is not None and code.startswith("SQLITE_CANTOPEN"):
            why = f"its folder {folder} is not writable (sqlite keeps its journal there)"
        raise StoreError(f"MLflow store {uri} {failure}: {why}") from None
