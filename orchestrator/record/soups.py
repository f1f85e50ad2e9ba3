"""Sweeps and soups in the store: a sweep found by its id, soup runs found by their key, and a
soup logged as an MLflow model and registered as a version of a registered model.

A soup is a run (role `schema.ROLE_SOUP`, nested under its sweep's run) found again by its
`schema.SOUP_KEY` tag, which is what makes cooking the same sweep twice add nothing; its logged
model is a pyfunc built from code (`orchestrator/serving.py`, shipped with the package folder),
never a pickle.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

from orchestrator.record.schema import (
    FINISHED,
    ONLINE_RECORD,
    PYFUNC_CONFIG,
    PYFUNC_CONFIG_FILE,
    PYFUNC_WEIGHTS,
    READY,
    ROLE,
    ROLE_SOUP,
    SOUP_KEY,
)
from orchestrator.record.tracking import (
    PACKAGE_DIR,
    Tracker,
    read_artifact_text,
    resolve_uri,
    retry,
    status_is,
    sweep_filter,
    tag_is,
)

__all__ = ["locate_sweep", "soup_runs", "find_soup", "stale_soups", "log_soup_model", "register_soup",
           "find_version", "online_record", "save_online_record"]


# --- sweeps and soup runs found ----------------------------------------------------------------

def locate_sweep(tracker: Tracker, sweep_id: str):
    """(experiment id, parent run) of sweep `sweep_id`, searched across all experiments."""
    try:
        wanted = sweep_filter(sweep_id)
    except ValueError:
        return None, None  # `run_sweep` refuses such ids, so no sweep can carry one
    exps = [e.experiment_id for e in tracker.client.search_experiments()]
    runs = tracker.client.search_runs(exps, wanted)
    if not runs:
        return None, None
    return runs[0].info.experiment_id, runs[0]


def soup_runs(tracker: Tracker, experiment_id: str, soup_key: str, status: str | None = None) -> list:
    """Soup runs with this key (recipe, settings and ingredients), of `status` if given."""
    f = f"{tag_is(ROLE, ROLE_SOUP)} and {tag_is(SOUP_KEY, soup_key)}"
    return tracker.search(experiment_id, f + (f" and {status_is(status)}" if status else ""))


def find_soup(tracker: Tracker, experiment_id: str, soup_key: str):
    """A FINISHED soup run with this key, or None."""
    runs = soup_runs(tracker, experiment_id, soup_key, FINISHED)
    return runs[0] if runs else None


def stale_soups(tracker: Tracker, experiment_id: str, soup_key: str) -> list:
    """Unfinished soup runs with this key: being logged, or left by a cook killed while logging."""
    return [r for r in soup_runs(tracker, experiment_id, soup_key) if r.info.status != FINISHED]


# --- the online soup's record ------------------------------------------------------------------

def online_record(tracker: Tracker, sweep_run_id: str) -> list[dict]:
    """The online soup's entries on the sweep run (`schema.ONLINE_RECORD`), in the order the trials
    were offered; [] when the sweep has none. A store that cannot be read raises (after the
    retries): an empty record would make a restarted soup take every trial again."""
    try:
        text = read_artifact_text(tracker, sweep_run_id, ONLINE_RECORD)
    except FileNotFoundError:  # `Tracker.download`: the run holds none (other errors raise)
        return []
    return json.loads(text)["entries"]


def save_online_record(tracker: Tracker, sweep_run_id: str, entries: list[dict]) -> None:
    """Write the whole record again (one small JSON: an entry per finished trial)."""
    tracker.log_text(sweep_run_id, json.dumps({"entries": entries}, indent=1), ONLINE_RECORD)


# --- a soup logged and registered --------------------------------------------------------------

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
        cfg_path = Path(tmp) / PYFUNC_CONFIG_FILE
        cfg_path.write_text(json.dumps(config, indent=2))
        example = pd.DataFrame({"image": [example_png]})
        local = Path(tmp) / "model"
        with warnings.catch_warnings():  # MLflow's input-example code trips a pandas deprecation
            warnings.filterwarnings("ignore", message="Operation with range is deprecated", module=r"mlflow\.")
            _save_pyfunc(local, weights, cfg_path, example, model, run_id)
        retry(lambda: client.log_model_artifacts(model.model_id, str(local)))
    return retry(lambda: client.finalize_logged_model(model.model_id, READY))


def _save_pyfunc(local: Path, weights: Path, cfg_path: Path, example, model, run_id: str) -> None:
    """The soup as a pyfunc from code, saved in `local` for the logged `model` of run `run_id`."""
    mlflow.pyfunc.save_model(
        str(local), python_model=str(PACKAGE_DIR / "serving.py"), code_paths=[str(PACKAGE_DIR)],
        artifacts={PYFUNC_WEIGHTS: str(weights), PYFUNC_CONFIG: str(cfg_path)},
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
    return next((v for v in versions if v.tags.get(SOUP_KEY) == soup_key), None)
