"""Integration: real local Ray runs a tiny sweep into a real (temporary) MLflow store."""

import hashlib
import json
import math
import os
import sys

import pytest
import torch
from conftest import SPACES, run, tiny_space, venv_bin
from mlflow.tracking import MlflowClient

from orchestrator.record.logits import load_logits
from orchestrator.sweep.driver import run_sweep

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SHIFTS = ("rotate", "noise", "blur", "invert", "rendered")


def sweep_runs(uri, experiment="tiny4"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("soup.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("soup.role") == "trial"]
    return client, parents, trials


def check_trial(client, trial, parent_id, tmp_path):
    tags, params, metrics = trial.data.tags, trial.data.params, trial.data.metrics
    assert tags["mlflow.parentRunId"] == parent_id
    for tag in ("sweep_id", "trial_id", "base_arch", "pretrained", "pretrained_sha256", "checkpoint_sha256"):
        assert tags.get(tag), tag
    assert tags["base_arch"] == "tiny-clip-glyphs"
    for p in ("train.lr", "train.mixup_alpha", "train.augment", "train.epochs", "model.arch", "data.split_seed"):
        assert p in params, p
    for m in ("heldout_acc", "test_acc", "shift_mean_acc", *[f"shift_{s}_acc" for s in SHIFTS]):
        assert 0.0 <= metrics[m] <= 1.0, m
    assert math.isclose(metrics["shift_mean_acc"], sum(metrics[f"shift_{s}_acc"] for s in SHIFTS) / 5,
                        rel_tol=1e-6)
    # MLflow step = global step: train_loss every train.log_every_steps and at each epoch's end,
    # heldout_acc and epoch once per epoch at its last step
    epochs = sorted(client.get_metric_history(trial.info.run_id, "epoch"), key=lambda m: m.step)
    assert [m.value for m in epochs] == list(range(1, int(params["train.epochs"]) + 1))
    steps = sorted(m.step for m in client.get_metric_history(trial.info.run_id, "train_loss"))
    assert len(steps) == len(set(steps)) and {m.step for m in epochs} <= set(steps)
    held = client.get_metric_history(trial.info.run_id, "heldout_acc")
    assert sorted(m.step for m in held) == [m.step for m in epochs]
    ckpt = client.download_artifacts(trial.info.run_id, "checkpoint/model.safetensors", str(tmp_path))
    with open(ckpt, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tags["checkpoint_sha256"]
    path = client.download_artifacts(trial.info.run_id, "logits/logits.safetensors", str(tmp_path))
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tags["logits_sha256"]
    logits = load_logits(path)
    assert set(logits) == {"heldout", "test", *SHIFTS}
    assert all(v.logits.dtype == torch.float16 and v.logits.shape[1] == 10 for v in logits.values())
    assert json.loads(tags["logits_splits"]) == {k: [v.n, v.labels_sha256] for k, v in logits.items()}


def test_tiny_sweep_logs_every_trial_to_mlflow(cooked, tmp_path):
    """The shared tiny4 sweep (conftest's `cooked`: a cook adds soups, never touches a trial)."""
    out = cooked["sweep"]
    assert (out.finished, out.failed) == (4, 0)
    client, parents, trials = sweep_runs(cooked["uri"])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["sweep_id"] == "c4"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "space")}
    assert arts == {"space/tiny4.yaml", "space/resolved_config.yaml"}
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    assert len({t.data.tags["trial_id"] for t in trials}) == 4
    for trial in trials:
        check_trial(client, trial, parent.info.run_id, tmp_path)


def test_existing_sweep_name_needs_resume(hermetic):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="--resume needs --name"):
        run_sweep(SPACES / "tiny4.yaml", resume=True, storage_path=hermetic["storage"])
    with pytest.raises(ConfigError, match="no sweep 'nope'"):
        run_sweep(SPACES / "tiny4.yaml", name="nope", resume=True, storage_path=hermetic["storage"])


def test_ray_job_submit_runs_the_sweep(hermetic):
    from conftest import REPO
    from servers import RayHead, listening_addresses

    from orchestrator.runtime.connect import is_loopback

    env = {**hermetic["env"], "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    space = tiny_space(hermetic["tmp"] / "tiny2.yaml", 2)  # the job's path to the sweep is under test
    head = RayHead(hermetic["tmp"] / "ray-head.log", env).start()
    try:
        submit = run([venv_bin("ray"), "job", "submit", "--address", head.dashboard,
                      "--working-dir", str(REPO),
                      "--runtime-env-json", f'{{"env_vars": {{"MLFLOW_TRACKING_URI": "{hermetic["uri"]}"}}}}',
                      "--", "soup", "sweep", str(space), "--name", "job",
                      "--storage-path", hermetic["storage"]], env, timeout=900)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
        assert "succeeded" in submit.stdout.lower()  # "Job 'raysubmit_...' succeeded"
        listening = listening_addresses(head.pids())
        assert listening and all(is_loopback(ip) for ip, _ in listening), sorted(listening)
    finally:
        head.stop()  # this head only: `ray stop` would stop every Ray on the machine
    assert not head.pids(), "the head left processes behind"
    client, parents, trials = sweep_runs(hermetic["uri"])
    assert len(parents) == 1 and parents[0].data.tags["sweep_id"] == "job"
    assert sum(t.info.status == "FINISHED" for t in trials) == 2
