"""Pick, promote and serve: aliases behind a gate, the pyfunc in a fresh process, a real server."""

import base64
import json
import os
import subprocess
import sys
import urllib.request

import pytest
from conftest import free_port, venv_bin

from orchestrator.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "tiny4-soup"


@pytest.fixture
def store(cooked, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cooked["uri"])
    return cooked


def _by_heldout(store):
    versions = store["client"].search_model_versions(f"name = '{MODEL}'")
    return sorted(versions, key=lambda v: float(v.tags["heldout_acc"]))


def _champion(store):
    return store["client"].get_model_version_by_alias(MODEL, "champion").version


def test_promotion_gate_force_and_listing(store, capsys):
    worst, best = _by_heldout(store)[0], _by_heldout(store)[-1]
    assert float(worst.tags["heldout_acc"]) < float(best.tags["heldout_acc"]), "need two accuracies"
    assert main(["promote", MODEL, "--version", str(best.version), "--alias", "champion"]) == 0
    assert _champion(store) == best.version
    assert main(["promote", MODEL, "--version", str(worst.version), "--alias", "champion"]) == 2
    err = capsys.readouterr().err
    assert f"{float(worst.tags['heldout_acc']):.2%}" in err and f"{float(best.tags['heldout_acc']):.2%}" in err
    assert _champion(store) == best.version, "a refused promotion moved the alias"
    assert main(["promote", MODEL, "--version", "999"]) == 2
    assert "no version 999" in capsys.readouterr().err
    assert main(["promote", MODEL, "--version", str(worst.version), "--alias", "canary", "--force",
                 "--reason", "shadow traffic"]) == 0
    tags = store["client"].get_model_version(MODEL, worst.version).tags
    assert "shadow traffic" in tags["forced_promotion"] and tags["promoted_canary_at"]
    capsys.readouterr()
    assert main(["models", MODEL]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and "canary" in listing and "greedy" in listing


def _examples(n=12):
    from orchestrator import data
    from orchestrator.config import DataConfig
    from orchestrator.data.images import encode_image

    test = data.load_task(DataConfig()).test
    return [encode_image(test.images[i]) for i in range(n)], test.labels[:n].tolist()


def test_champion_loads_in_a_fresh_process(store):
    images, labels = _examples()
    store["client"].set_registered_model_alias(MODEL, "champion", _by_heldout(store)[-1].version)
    code = (
        "import sys, json, base64, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
        "imgs = [base64.b64decode(s) for s in json.load(sys.stdin)]\n"
        "out = m.predict(pd.DataFrame({'image': imgs}))\n"
        "info = mlflow.models.get_model_info('models:/" + MODEL + "@champion')\n"
        "print(json.dumps({'labels': out['label'].tolist(), 'probs': out['probabilities'].tolist(),\n"
        "  'signature': info.signature is not None, 'example': info.saved_input_example_info is not None}))\n")
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(
        [base64.b64encode(b).decode() for b in images]), env=store["env"], text=True,
        capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["signature"] and out["example"]
    correct = sum(int(p) == y for p, y in zip(out["labels"], labels))
    assert correct >= 9, (out["labels"], labels)
    assert all(abs(sum(p) - 1) < 1e-4 and len(p) == 10 for p in out["probs"])


def test_mlflow_models_serve_answers_invocations(store, tmp_path):
    from servers import stop_session, wait_for_http

    images, labels = _examples(6)
    store["client"].set_registered_model_alias(MODEL, "champion", _by_heldout(store)[-1].version)
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:  # its own session: stopping it stops its uvicorn workers too
        server = subprocess.Popen([venv_bin("mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  env={**store["env"], "PATH": os.path.dirname(sys.executable) + os.pathsep
                                       + os.environ["PATH"]},  # as with the venv activated: uvicorn
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # /ping answers 200 once the model is loaded; generous: torch and the soup load slowly when busy
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, log, 600, "mlflow models serve")
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(b).decode()] for b in images]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=300).read())
    finally:
        stop_session(server)
    preds = reply["predictions"]
    print("served prediction:", json.dumps(preds[0]))
    assert len(preds) == 6 and sum(int(p["label"]) == y for p, y in zip(preds, labels)) >= 4
