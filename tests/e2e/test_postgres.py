"""End to end against the production shape: PostgreSQL behind a real `mlflow server`, over HTTP.

The tiny sweep runs on local Ray and the cook follows; every run, artifact and model version is
then read back through the server's REST API (the artifacts through its mlflow-artifacts proxy).
"""

import hashlib

import pytest
from conftest import tiny_space
from mlflow.tracking import MlflowClient
from servers import MlflowServer, pg_bindir, start_postgres

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RECIPES = ("uniform", "greedy", "model-stock")


@pytest.fixture(scope="module")
def pg_mlflow(tmp_path_factory):
    if pg_bindir() is None:
        pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's postgresql package)")
    tmp = tmp_path_factory.mktemp("pg")
    pg = start_postgres()
    server = None
    try:
        pg.createdb("mlflow")
        server = MlflowServer(pg.url("mlflow"), tmp / "artifacts", tmp / "mlflow-server.log").start()
        yield {"pg": pg, "server": server, "tmp": tmp}
    finally:
        if server:
            server.stop()
        pg.stop()


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_sweep_and_cook_against_postgres_backed_server(pg_mlflow, monkeypatch, tmp_path):
    import ray

    from orchestrator.cook.driver import cook
    from orchestrator.sweep.driver import run_sweep

    uri = pg_mlflow["server"].uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    space = tiny_space(tmp_path / "tiny2.yaml", 2)  # two trials: the backend is under test, not the sweep
    sweep = run_sweep(space, name="pg2", storage_path=str(tmp_path / "ray"), tracking_uri=uri)
    out = cook("pg2", tracking_uri=uri, recipes=RECIPES)  # the cheap ones: the backend is under test
    ray.shutdown()
    assert (sweep.finished, sweep.failed) == (2, 0)

    client = MlflowClient(uri)
    assert uri.startswith("http://")  # really over HTTP: the artifact URIs below only a server hands out
    exp = client.get_experiment_by_name("tiny4")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    roles = sorted(r.data.tags.get("soup.role") for r in runs)
    assert roles == ["soup"] * 3 + ["sweep"] + ["trial"] * 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)

    for trial in (r for r in runs if r.data.tags["soup.role"] == "trial"):
        ckpt = client.download_artifacts(trial.info.run_id, "checkpoint/model.safetensors", str(tmp_path))
        assert _sha(ckpt) == trial.data.tags["checkpoint_sha256"]
    # the artifacts live where the server was told to keep them, not with the client
    assert any((pg_mlflow["tmp"] / "artifacts").rglob("model.safetensors"))

    versions = client.search_model_versions("name = 'tiny4-soup'")
    assert sorted(v.tags["recipe"] for v in versions) == sorted(RECIPES)
    assert {v.version for v in versions} == set(out.versions.values())
    for v in versions:
        assert v.tags["sweep_id"] == "pg2" and v.status == "READY"
        assert v.tags["soup_run_id"] == out.soup_runs[v.tags["recipe"]]
