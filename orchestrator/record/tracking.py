"""The MLflow facade: run hierarchy, artifacts, search, logged models and the model registry.

`Tracker` wraps an explicit `MlflowClient`; the other modules of `record` (`trials`, `soups`,
`promotion`) work through it, and the names they write and read are `schema`'s. The one module
outside `record` that imports mlflow is `serving`, whose pyfunc model class MLflow loads at
serving time.

A sweep is one parent run; each trial is a nested run (``mlflow.parentRunId``) found again by its
``sweep_id`` and ``trial_key`` tags, which is what makes retries and resumes idempotent. Everything
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
from mlflow.tracking import MlflowClient

from orchestrator.record.schema import (
    DATASET_CONTEXT,
    DATASET_SPLIT,
    DESCRIPTION,
    END_REASON,
    FINISHED,
    GIT_COMMIT,
    HELDOUT_ACC,
    KILLED,
    LOCAL_ARTIFACTS,
    LOGGED_MODEL_ID,
    LOGS_DIR,
    PARENT_RUN,
    READY,
    ROLE,
    ROLE_SWEEP,
    ROLE_TRIAL,
    RUNNING,
    SOURCE_NAME,
    SOURCE_TYPE,
    SWEEP_ID,
    TRIAL_KEY,
    USER,
    metric_order,
    metric_split,
    tag_filter,
)

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

__all__ = ["Tracker", "RegistryError", "resolve_uri", "retry", "flatten", "searchable", "quoted",
           "tag_is", "status_is", "sweep_filter", "model_name", "source_tags", "read_artifact_text",
           "PACKAGE_DIR", "DEFAULT_URI"]

DEFAULT_URI = "sqlite:///mlflow.db"
# orchestrator/: its git checkout names a run's source commit; a logged soup ships it (`soups`)
PACKAGE_DIR = Path(__file__).resolve().parents[1]


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
        return (Path(uri[len("sqlite:///"):]).parent / LOCAL_ARTIFACTS).as_uri()
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


def tag_is(key: str, value: str) -> str:
    """The search clause "tag `key` is `value`" (``tags.`soup.role` = 'trial'``)."""
    return f"{tag_filter(key)} = {quoted(value)}"


def status_is(status: str) -> str:
    """The search clause "the run's status is `status`"."""
    return f"attributes.status = {quoted(status)}"


def sweep_filter(sweep_id: str) -> str:
    """The search filter of the parent run of sweep `sweep_id` (ValueError: an id no filter holds)."""
    return f"{tag_is(ROLE, ROLE_SWEEP)} and {tag_is(SWEEP_ID, sweep_id)}"


def model_name(text: str) -> str:
    """`text` as a logged model's name, which MLflow forbids to hold ``/ : . % " '``:
    ``t07 lr=3.1e-05 ep=10`` -> ``t07-lr3_1e-05-ep10``."""
    return re.sub(r"[/:.%\"']", "_", text.replace("=", "").replace(" ", "-")) or "model"


@functools.lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """The source tags the UI shows for a run: user, and the git commit when this package runs
    from a git checkout (as MLflow's fluent API sets them)."""
    tags = {USER: _user(), SOURCE_TYPE: "JOB", SOURCE_NAME: "orchestrator"}
    root = PACKAGE_DIR.parent
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=30, check=False)
            if out.returncode == 0 and out.stdout.strip():
                tags[GIT_COMMIT] = out.stdout.strip()
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
            tags[PARENT_RUN] = parent_run_id
        run = retry(lambda: self.client.create_run(experiment_id, tags=tags, run_name=name))
        return run.info.run_id

    def end_run(self, run_id: str, status: str = FINISHED) -> None:
        retry(lambda: self.client.set_terminated(run_id, status))

    def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a resumed sweep), dropping its ``end_reason`` tag."""
        retry(lambda: self.client.update_run(run_id, status=RUNNING))
        if END_REASON in self.client.get_run(run_id).data.tags:
            retry(lambda: self.client.delete_tag(run_id, END_REASON))

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
            tags=[InputTag(DATASET_CONTEXT, s.role), InputTag(DATASET_SPLIT, s.split)]) for s in splits]
        retry(lambda: self.client.log_inputs(run_id, datasets=inputs))

    def run_datasets(self, run_id: str) -> dict[str, tuple[str, str]]:
        """Split key -> (dataset name, digest) of the run's dataset inputs."""
        out = {}
        for d in retry(lambda: self.client.get_run(run_id)).inputs.dataset_inputs:
            split = next((t.value for t in d.tags if t.key == DATASET_SPLIT), None)
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

    def finish_model(self, model_id: str, status: str = READY, files: Mapping[str, str] | None = None):
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
        """Artifact `path` of run `run_id`, downloaded under `dst`. One that the run does not hold
        is `FileNotFoundError` at once: the listing of its folder is retried like every call
        (the server may restart), but a missing file is an answer, not an outage to wait out."""
        if not self.has_artifact(run_id, path):
            raise FileNotFoundError(f"run {run_id} has no artifact {path!r}")
        return Path(retry(lambda: self.client.download_artifacts(run_id, path, str(dst))))

    def has_artifact(self, run_id: str, path: str) -> bool:
        """Whether run `run_id` holds artifact `path` (a file or a folder)."""
        folder = str(Path(path).parent)
        listed = retry(lambda: self.client.list_artifacts(run_id, None if folder == "." else folder))
        return any(f.path == str(Path(path)) for f in listed)

    # -- sweeps and trials ----------------------------------------------------------------------
    def find_sweep(self, experiment_id: str, sweep_id: str):
        """The parent run of sweep `sweep_id`, or None."""
        runs = self.search(experiment_id, sweep_filter(sweep_id))
        return runs[0] if runs else None

    def _trials_filter(self, experiment_id: str, sweep_id: str) -> str | None:
        """The filter of the trial runs of the live sweep `sweep_id`: nested under its run, not
        only tagged with its id. A sweep id may be reused once its sweep run was deleted, and
        MLflow leaves the deleted sweep's trials active: they belong to no live sweep."""
        parent = self.find_sweep(experiment_id, sweep_id)
        if parent is None:
            return None
        return " and ".join([tag_is(ROLE, ROLE_TRIAL), tag_is(SWEEP_ID, sweep_id),
                             tag_is(PARENT_RUN, parent.info.run_id)])

    def trial_runs(self, experiment_id: str, sweep_id: str, status: str | None = None):
        """The sweep's trial runs, best held-out accuracy first."""
        f = self._trials_filter(experiment_id, sweep_id)
        if f is None:
            return []
        if status:
            f += f" and {status_is(status)}"
        return self.search(experiment_id, f, order_by=[metric_order(HELDOUT_ACC)])

    def find_trial(self, experiment_id: str, sweep_id: str, trial_key: str):
        """Runs of one trial, matched by its key (see `trial.trial_key`)."""
        f = self._trials_filter(experiment_id, sweep_id)
        return [] if f is None else self.search(experiment_id, f"{f} and {tag_is(TRIAL_KEY, trial_key)}")

    def discard_stale(self, runs: Iterable) -> None:
        """A trial restarted from scratch replaces its unfinished run: end it KILLED, delete it
        with the logged models it produced (else they would stay PENDING in the Models tab)."""
        for run in runs:
            if run.info.status != FINISHED:
                if run.info.status == RUNNING:
                    self.end_run(run.info.run_id, KILLED)
                models = {m.model_id for m in self.logged_models_of(run.info.experiment_id, run.info.run_id)}
                left = run.data.tags.get(LOGGED_MODEL_ID)
                for model_id in models | ({left} if left else set()):
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


def read_artifact_text(tracker: Tracker, run_id: str, path: str) -> str:
    """The text of artifact `path` of run `run_id` (downloaded to a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        return tracker.download(run_id, path, tmp).read_text()
