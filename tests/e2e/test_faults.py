"""Faults: a failing trial is retried then recorded FAILED, a cook SIGKILLed mid-greedy is run
again without duplicates, and a tracking server restarted mid-sweep loses no run."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import SPACES, run, venv_bin
from mlflow.entities import LoggedModelStatus, ViewType
from mlflow.tracking import MlflowClient
from servers import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RECIPES = ("uniform", "greedy", "model-stock")


def _space(tmp, n: int, extra: str = "", failures: int = 1) -> str:
    text = (SPACES / "tiny4.yaml").read_text().replace("num_samples: 4", f"num_samples: {n}")
    text = text.replace("search:\n", "search:\n" + extra)
    if "max_failures" not in text:
        text = text.replace("sweep:\n", f"sweep:\n  max_failures: {failures}\n")
    path = tmp / "space.yaml"
    path.write_text(text)
    return str(path)


def _runs(uri, role, view=ViewType.ACTIVE_ONLY):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny4")
    return client.search_runs([exp.experiment_id], f"tags.`soup.role` = '{role}'", run_view_type=view)


def test_failing_trial_is_retried_then_failed_and_never_an_ingredient(hermetic):
    from orchestrator.cook.driver import cook
    from orchestrator.sweep.driver import run_sweep

    bad = "  model.pretrained: {grid: [tiny-glyphs, /nonexistent/base.safetensors]}\n"
    out = run_sweep(_space(hermetic["tmp"], 1, bad, failures=1), name="retry", storage_path=hermetic["storage"])
    assert (out.finished, out.failed) == (1, 1)
    every = _runs(hermetic["uri"], "trial", ViewType.ALL)
    bad_runs = [r for r in every if "nonexistent" in r.data.params["model.pretrained"]]
    assert len(bad_runs) == 2, "max_failures: 1 means two attempts"  # the first is replaced
    active = [r for r in _runs(hermetic["uri"], "trial") if "nonexistent" in r.data.params["model.pretrained"]]
    assert [r.info.status for r in active] == ["FAILED"] and "nonexistent" in active[0].data.tags["error"]
    res = cook("retry", recipes=("uniform",), tracking_uri=hermetic["uri"], use_ray=False)
    soup = _runs(hermetic["uri"], "soup")[0]
    assert active[0].info.run_id not in soup.data.tags["ingredients"]
    assert str(res.versions["uniform"]) == "1"


def test_cook_sigkilled_mid_greedy_then_rerun_has_no_duplicates(hermetic, swept3):
    # a copy of the shared 3-trial sweep's store (its artifacts stay where the sweep put them)
    shutil.copy(swept3["root"] / "mlflow.db", hermetic["tmp"] / "mlflow.db")
    # the cheap recipes: the learned soups add minutes and nothing to what this test checks
    cmd = [venv_bin("soup"), "cook", "--sweep", swept3["sweep"], "--no-ray", "--recipes", ",".join(RECIPES)]
    env = {**hermetic["env"], "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("greedy soup:"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    res = run(cmd, env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    again = run(cmd, env, timeout=900)
    assert again.returncode == 0 and "already cooked" in again.stdout
    soups = _runs(hermetic["uri"], "soup")
    assert sorted(r.data.tags["recipe"] for r in soups) == sorted(RECIPES)
    assert all(r.info.status == "FINISHED" for r in soups)
    versions = MlflowClient(hermetic["uri"]).search_model_versions("name = 'tiny4-soup'")
    assert sorted(v.tags["recipe"] for v in versions) == sorted(RECIPES)


# `soup cook` sending itself the signal `sys.argv[1]` as it calls `orchestrator.cook.<sys.argv[2]>`:
# a Ctrl-C (or a kill) as the soup's logged model gets its files, or as it is registered.
STOP_AT = """
import os, signal, sys, time
import orchestrator.cook.driver as cook
sig, point = signal.Signals[sys.argv[1]], sys.argv[2]
real = getattr(cook, point)
def stopped(*args, **kwargs):
    os.kill(os.getpid(), sig)
    time.sleep(30)  # SIGINT is handled at the next bytecode; SIGKILL never returns
    return real(*args, **kwargs)
setattr(cook, point, stopped)
from orchestrator.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _soup_models(uri) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny4").experiment_id
    return [m for m in client.search_logged_models([exp]) if m.name == "uniform-soup"]


@pytest.mark.parametrize("sig, point, left_as", [
    ("SIGINT", "log_soup_model", None), ("SIGKILL", "log_soup_model", LoggedModelStatus.PENDING),
    ("SIGKILL", "register_soup", LoggedModelStatus.READY)], ids=["ctrl-c", "kill-pending", "kill-ready"])
def test_cook_stopped_between_soup_run_and_registration_leaves_nothing_pending(hermetic, swept3, sig, point,
                                                                              left_as):
    """Ctrl-C between a soup's run and its registration withdraws the run and its logged model
    (nothing is left PENDING); after a SIGKILL there, which no code outlives, the rerun finishes
    the model it finds (PENDING: its files uploaded; READY: registered as it is). Either way the
    Models tab lists the soup once, READY, with one version (it used to keep a PENDING model for
    ever, and a rerun made a second one)."""
    shutil.copy(swept3["root"] / "mlflow.db", hermetic["tmp"] / "mlflow.db")
    cook = ["cook", "--sweep", swept3["sweep"], "--no-ray", "--recipes", "uniform", "--verbose"]
    stopped = run([sys.executable, "-c", STOP_AT, sig, point, *cook], hermetic["env"], timeout=900)
    left = _soup_models(hermetic["uri"])
    if sig == "SIGINT":
        assert stopped.returncode == 130 and "soup cook: interrupted by SIGINT" in stopped.stderr, stopped.stderr[-3000:]
        assert left == [] and _runs(hermetic["uri"], "soup") == []  # withdrawn, nothing PENDING
    else:
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
        assert [m.status for m in left] == [left_as] and len(_runs(hermetic["uri"], "soup")) == 1
    again = run([venv_bin("soup"), *cook], hermetic["env"], timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    models = _soup_models(hermetic["uri"])
    assert [m.status for m in models] == [LoggedModelStatus.READY], models
    assert sig == "SIGINT" or [m.model_id for m in models] == [m.model_id for m in left]  # not doubled
    versions = MlflowClient(hermetic["uri"]).search_model_versions("name = 'tiny4-soup'")
    assert len(versions) == 1 and models[0].model_id in versions[0].source  # models:/ID or its location


def _trial_logged(uri) -> bool:
    try:
        return bool(_runs(uri, "trial"))
    except Exception:  # noqa: BLE001 - the experiment may not exist yet
        return False


def test_tracking_server_restarted_mid_sweep_loses_no_run(hermetic):
    tmp = hermetic["tmp"]
    server = MlflowServer(f"sqlite:///{tmp / 'server.db'}", tmp / "artifacts", tmp / "server.log").start()
    env = {**hermetic["env"], "MLFLOW_TRACKING_URI": server.uri}
    cmd = [venv_bin("soup"), "sweep", _space(tmp, 3), "--name", "restart", "--storage-path", hermetic["storage"]]
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp / "sweep.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 600  # generous: a cold start of Ray and the first trial when busy
        while not _trial_logged(server.uri) and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
        # else the outage below would not be mid-sweep and the test would prove nothing
        assert proc.poll() is None and _trial_logged(server.uri), (tmp / "sweep.log").read_text()[-4000:]
        server.stop()  # mid-sweep: trials are logging epochs and checkpoints
        time.sleep(5)  # the outage itself, not a wait for readiness: start() waits for /health
        server.start()
        assert proc.wait(900) == 0, (tmp / "sweep.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()
        server.start()
    try:
        trials = _runs(server.uri, "trial")
        assert sorted(r.info.status for r in trials) == ["FINISHED"] * 3
        assert len({r.data.tags["trial_key"] for r in trials}) == 3
        for r in trials:
            assert "checkpoint_sha256" in r.data.tags and r.data.metrics["heldout_acc"] > 0
    finally:
        server.stop()
