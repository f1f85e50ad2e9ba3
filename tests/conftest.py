import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

# Hermetic session: a private HOME and Ray token, set before anything imports ray (Ray's auth
# mode and token are read once per process).
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="soup-test-home-"))
atexit.register(shutil.rmtree, _SESSION_HOME, True)
(_SESSION_HOME / ".ray").mkdir()
(_SESSION_HOME / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
os.environ.update({
    "HOME": str(_SESSION_HOME),
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN_PATH": str(_SESSION_HOME / ".ray" / "auth_token"),
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_TRACKING_URI": "sqlite:///" + str(_SESSION_HOME / "unused-mlflow.db"),
})
os.environ.pop("RAY_ADDRESS", None)
from orchestrator.runtime.connect import LOOPBACK_ONLY  # noqa: E402 - imports no ray

os.environ.update(LOOPBACK_ONLY)  # every local Ray the suite starts listens on 127.0.0.1 only

REPO = Path(__file__).resolve().parents[1]
SPACES = Path(__file__).resolve().parent / "spaces"
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_finetune_config():
    """A one-epoch fine-tune config: enough to exercise every code path quickly."""
    from orchestrator.config import FinetuneConfig, validate

    return validate(FinetuneConfig, {"train": {"epochs": 1, "batch_size": 128, "warmup_steps": 2}})


def _empty_store() -> Path:
    """An MLflow sqlite store with MLflow's whole schema and nothing in it, made once per session
    by MLflow itself (in a child process, so that no connection of ours stays open on it): MLflow
    runs every schema migration when it first opens a new store (about 2 s here), and most tests
    would otherwise each pay that for a store they then fill."""
    db = _SESSION_HOME / "empty-store" / "mlflow.db"
    if not db.exists():
        db.parent.mkdir(exist_ok=True)
        code = "import sys; from mlflow.tracking import MlflowClient; MlflowClient(sys.argv[1]).search_experiments()"
        subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}"], check=True, capture_output=True)
    return db


@pytest.fixture
def hermetic(request, tmp_path, monkeypatch):
    """A private MLflow store and Tune storage per test (HOME and the Ray token are per session).

    The store is a copy of `_empty_store` (MLflow's schema, no experiment but MLflow's Default);
    a test marked ``fresh_store`` (one that checks a refused command creates no store) gets none."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    if request.node.get_closest_marker("fresh_store") is None:
        shutil.copy(_empty_store(), tmp_path / "mlflow.db")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield {"tmp": tmp_path, "storage": str(tmp_path / "ray_results"), "uri": env["MLFLOW_TRACKING_URI"],
           "env": {**os.environ, **env}}
    import ray

    if ray.is_initialized():
        ray.shutdown()


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held together while chosen, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def venv_bin(name: str) -> str:
    """A console script of the interpreter running the tests (the project's venv)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


def tiny_space(path: Path, trials: int, concurrency: int | None = None) -> Path:
    """tests/spaces/tiny4.yaml with `trials` trials (`concurrency` at a time, else its 2), written
    to `path`."""
    text = (SPACES / "tiny4.yaml").read_text().replace("num_samples: 4", f"num_samples: {trials}")
    if concurrency is not None:
        text = text.replace("max_concurrent_trials: 2", f"max_concurrent_trials: {concurrency}")
    path.write_text(text)
    return path


def run(cmd, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, text=True, capture_output=True, **kw)


@pytest.fixture(scope="session")
def swept3(tmp_path_factory):
    """A finished, uncooked three-trial sweep "s3" of the tiny world in its own store (`root`),
    shared read-only: tests that change it work on a copy (test_trust, test_cook_stops)."""
    import ray

    from orchestrator.sweep.driver import run_sweep

    root = tmp_path_factory.mktemp("swept3") / "store"
    root.mkdir()
    space = tiny_space(root.parent / "tiny3.yaml", 3)
    out = run_sweep(space, name="s3", storage_path=str(root.parent / "ray_results"),
                    tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    ray.shutdown()
    assert out.finished == 3
    return {"root": root, "space": space, "sweep": "s3", "outcome": out}


@pytest.fixture(scope="session")
def cooked(tmp_path_factory):
    """One tiny sweep, cooked twice (Ray task, then built again in-process, `rebuild`), shared by
    the cook and serving tests."""
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.cook.driver import cook
    from orchestrator.sweep.driver import run_sweep

    tmp = tmp_path_factory.mktemp("cook")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sweep = run_sweep(SPACES / "tiny4.yaml", name="c4", storage_path=str(tmp / "ray_results"),
                      tracking_uri=uri)
    first = cook("c4", tracking_uri=uri)
    second = cook("c4", tracking_uri=uri, use_ray=False, rebuild=True)  # built again, registered once
    ray.shutdown()
    yield {"tmp": tmp, "uri": uri, "sweep": sweep, "first": first, "second": second,
           "client": MlflowClient(uri), "env": {**os.environ, "MLFLOW_TRACKING_URI": uri}}


HAND = "hand-soup"  # the registered model of the hand-made registry (versions 1-3, no training)


@pytest.fixture(scope="session")
def registry_template(tmp_path_factory) -> Path:
    """A store with one registered model made by hand, no sweep: versions 1-3 with held-out
    accuracy 0.90, 0.80, 0.95; version 1 is 'champion' (shared: tests use `registry`, a copy)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("registry") / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(HAND)
    for acc in ("0.90", "0.80", "0.95"):
        client.create_model_version(HAND, str(db.parent / "model"), tags={
            "recipe": "uniform", "heldout_acc": acc, "test_acc": "0.50", "shift_mean_acc": "0.40"})
    client.set_registered_model_alias(HAND, "champion", "1")
    return db


@pytest.fixture
def registry(registry_template, tmp_path, monkeypatch):
    """This test's own copy of the hand-made registry, named by MLFLOW_TRACKING_URI."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(registry_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return {"db": db, "uri": uri, "client": MlflowClient(uri, registry_uri=uri), "tmp": tmp_path}
