"""Trust (issue: reliability): the cook believes only what it measures, a sweep id means one
sweep, two cooks at once register each soup once, an unfinished sweep is cooked only on request,
and a sweep that could never be scheduled is refused before anything is logged."""

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import SPACES, venv_bin
from mlflow.tracking import MlflowClient

from orchestrator.config import ConfigError
from orchestrator.cook.driver import CookError, cook
from orchestrator.hashing import file_sha256
from orchestrator.record.schema import CHECKPOINT_PATH, LOGITS_PATH, LOGITS_SHA
from orchestrator.record.tracking import Tracker
from orchestrator.soups.io.stream import read_weights
from orchestrator.soups.io.weights import save_weights

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SWEEP, MODEL = "s3", "tiny4-soup"  # the sweep of conftest's `swept3`
QUIET = lambda s: None  # noqa: E731
# Where a store keeps absolute paths to its own artifacts (so that a copy points at its copies).
PATH_COLUMNS = {"experiments": ("artifact_location",), "runs": ("artifact_uri",),
                "logged_models": ("artifact_location",), "model_versions": ("source", "storage_location")}


@pytest.fixture(scope="module")
def swept(swept3):
    """A real three-trial sweep of the tiny world in its own store, not cooked (shared: copied)."""
    return swept3


def copy_store(swept, dst: Path) -> str:
    """A private copy of the swept store (database and artifacts): tests may change it freely."""
    shutil.copytree(swept["root"], dst)
    with sqlite3.connect(dst / "mlflow.db") as db:
        for table, columns in PATH_COLUMNS.items():
            for col in columns:
                db.execute(f"UPDATE {table} SET {col} = replace({col}, ?, ?)",
                           (str(swept["root"]), str(dst)))
    return f"sqlite:///{dst / 'mlflow.db'}"


def _trials(uri):
    tracker = Tracker(uri)
    exp = tracker.client.get_experiment_by_name("tiny4").experiment_id
    return tracker, exp, tracker.trial_runs(exp, SWEEP, "FINISHED")


def _add_trial(tracker, exp, like, name, weights, heldout):
    """A FINISHED trial run of the sweep as `soup sweep` logs one, holding `weights` (a state
    dict, or a checkpoint file whose bytes are logged as they are)."""
    tags = {k: v for k, v in like.data.tags.items() if not k.startswith("mlflow.")}
    rid = tracker.create_run(exp, name, {**tags, "trial_key": name},
                             parent_run_id=like.data.tags["mlflow.parentRunId"])
    path = Path(tracker.uri[len("sqlite:///"):]).parent / name / "model.safetensors"
    if isinstance(weights, Path):
        path.parent.mkdir(parents=True)
        shutil.copyfile(weights, path)
    else:
        save_weights(weights, path)
    tracker.log_artifact(rid, path, "checkpoint")
    tracker.set_tags(rid, {"checkpoint_sha256": file_sha256(path)})
    tracker.log_metrics(rid, {"heldout_acc": heldout})
    tracker.end_run(rid)
    return rid


def test_a_logged_figure_the_cook_cannot_measure_is_excluded(swept, tmp_path):
    uri = copy_store(swept, tmp_path / "s")
    tracker, exp, runs = _trials(uri)
    best = runs[0]
    state = read_weights(tracker.download(best.info.run_id, CHECKPOINT_PATH, tmp_path / "best"))
    untrained = {k: torch.zeros_like(v) if k.startswith("head.") else v for k, v in state.items()}
    faked = _add_trial(tracker, exp, best, "replaced-checkpoint", untrained, 1.0)
    overwritten = runs[-1].info.run_id  # a real run whose figure was overwritten afterwards
    tracker.log_metrics(overwritten, {"heldout_acc": 1.0}, step=99)
    messages = []
    out = cook(SWEEP, recipes=("greedy",), tracking_uri=uri, use_ray=False, log=messages.append)
    for rid in (faked, overwritten):
        assert "logged held-out accuracy 100.00% but measured" in out.excluded[rid], out.excluded
        assert any(rid in m and "measured" in m for m in messages)
    # the added run logged no logits: its checkpoint is scored, and the cook says so
    assert any(f"run {faked} (replaced-checkpoint): no logged logits; scoring its checkpoint again" in m
               for m in messages), messages
    kept = tracker.client.get_model_version(MODEL, out.versions["greedy"]).tags["ingredients"]
    assert faked not in kept and overwritten not in kept and best.info.run_id in kept
    greedy = next(r for r in out.rows if r["name"] == "greedy soup")
    assert greedy["heldout"] >= next(r for r in out.rows if r["name"] == "best individual")["heldout"]


def _replace_artifact(tracker, run_id: str, local: Path, folder: str) -> None:
    """Overwrite a run's artifact in place (a file store keeps one copy per path)."""
    tracker.log_artifact(run_id, local, folder)


def test_a_replaced_checkpoint_does_not_pass_with_its_trials_logits(swept, tmp_path):
    """A trial's checkpoint replaced and its sha256 tag updated to match: its logits were
    computed with the old checkpoint, so the cook scores the new one, and its figure fails."""
    uri = copy_store(swept, tmp_path / "s")
    tracker, _, runs = _trials(uri)
    victim = runs[0].info.run_id
    state = read_weights(tracker.download(victim, CHECKPOINT_PATH, tmp_path / "orig"))
    untrained = {k: torch.zeros_like(v) if k.startswith("head.") else v for k, v in state.items()}
    path = save_weights(untrained, tmp_path / "new" / "model.safetensors")
    _replace_artifact(tracker, victim, path, "checkpoint")
    tracker.set_tags(victim, {"checkpoint_sha256": file_sha256(path)})
    messages = []
    out = cook(SWEEP, recipes=("uniform",), tracking_uri=uri, use_ray=False, log=messages.append)
    assert any(victim in m and "computed with another checkpoint; scoring its checkpoint again" in m
               for m in messages), messages
    assert "but measured" in out.excluded[victim]


def test_logits_logged_for_another_label_order_are_scored_again(swept, tmp_path):
    """Logits whose labels are not the split's (another order) are not used: the checkpoint is
    scored again, named in a message, and the trial is cooked as usual."""
    from safetensors import safe_open

    from orchestrator.record import logits as logitstore

    uri = copy_store(swept, tmp_path / "s")
    tracker, _, runs = _trials(uri)
    rid = runs[-1].info.run_id
    path = tracker.download(rid, LOGITS_PATH, tmp_path / "l")
    logged = logitstore.load_logits(path)
    with safe_open(str(path), "pt") as f:
        labels = {k: f.get_tensor(f"labels/{k}") for k in logged}
    labeled = {k: (labels[k].roll(1) if k == "heldout" else labels[k], v.logits) for k, v in logged.items()}
    (tmp_path / "new").mkdir()
    out_path = logitstore.save_logits(tmp_path / "new" / "logits.safetensors", labeled,
                                      logitstore.checkpoint_of(path))
    _replace_artifact(tracker, rid, out_path, "logits")
    tracker.set_tags(rid, {LOGITS_SHA: file_sha256(out_path)})
    messages = []
    out = cook(SWEEP, recipes=("uniform",), tracking_uri=uri, use_ray=False, log=messages.append)
    assert any(f"run {rid}" in m and "other labels (or another order); scoring its checkpoint again" in m
               for m in messages), messages
    assert rid not in out.excluded and {p["name"]: p for p in out.phases}["baselines"]["passes"] > 0
    version = tracker.client.get_model_version(MODEL, out.versions["uniform"])
    assert rid in version.tags["ingredients"].split(",")


def test_byte_identical_checkpoints_are_cooked_once(swept, tmp_path):
    uri = copy_store(swept, tmp_path / "s")
    tracker, exp, runs = _trials(uri)
    best = runs[0]
    checkpoint = tracker.download(best.info.run_id, CHECKPOINT_PATH, tmp_path / "best")
    twin = _add_trial(tracker, exp, best, "twin", checkpoint, best.data.metrics["heldout_acc"])
    messages = []
    out = cook(SWEEP, recipes=("uniform",), tracking_uri=uri, use_ray=False, log=messages.append)
    (dup,) = [rid for rid in (twin, best.info.run_id) if rid in out.excluded]
    other = best.info.run_id if dup == twin else twin
    assert f"byte-identical to run {other}" in out.excluded[dup]
    version = tracker.client.get_model_version(MODEL, out.versions["uniform"])
    assert version.tags["ingredients"].split(",").count(other) == 1 and dup not in version.tags["ingredients"]
    assert len(version.tags["ingredients"].split(",")) == 3  # three trials, one of them twice


def test_a_sweep_id_names_one_sweep_in_the_whole_store(swept, tmp_path):
    import ray

    from orchestrator.sweep.driver import run_sweep

    uri = copy_store(swept, tmp_path / "s")
    other = tmp_path / "other.yaml"
    other.write_text(swept["space"].read_text().replace("experiment_name: tiny4", "experiment_name: other"))
    client = MlflowClient(uri)
    before = [e.name for e in client.search_experiments()]
    with pytest.raises(ConfigError, match=f"sweep id '{SWEEP}' is taken by a sweep in experiment 'tiny4'"):
        run_sweep(other, name=SWEEP, storage_path=str(tmp_path / "ray"), tracking_uri=uri)
    with pytest.raises(ConfigError, match="taken by a sweep in experiment 'tiny4'"):
        run_sweep(other, name=SWEEP, resume=True, storage_path=str(tmp_path / "ray"), tracking_uri=uri)
    assert [e.name for e in client.search_experiments()] == before and not ray.is_initialized()


def test_a_sweep_id_reused_after_its_sweep_run_was_deleted_means_the_new_sweep(swept, tmp_path):
    """Delete sweep s3's run, sweep s3 again with 2 trials: MLflow leaves the deleted sweep's 3
    trials active, but they belong to no live sweep, so the new sweep counts 2 and the cook
    cooks those 2 (it used to count 5 and keep a deleted sweep's trial in the greedy soup)."""
    import ray
    from conftest import tiny_space

    from orchestrator.sweep.driver import run_sweep

    uri = copy_store(swept, tmp_path / "s")
    tracker, exp, old = _trials(uri)
    tracker.delete_run(tracker.find_sweep(exp, SWEEP).info.run_id)
    try:
        out = run_sweep(tiny_space(tmp_path / "tiny2.yaml", 2), name=SWEEP, log=QUIET,
                        storage_path=str(tmp_path / "ray_results"), tracking_uri=uri)
    finally:
        ray.shutdown()
    assert (out.finished, out.failed) == (2, 0)
    new = {r.info.run_id for r in tracker.trial_runs(exp, SWEEP, "FINISHED")}
    assert len(new) == 2 and not new & {r.info.run_id for r in old}
    lines = []
    cooked = cook(SWEEP, recipes=("uniform", "greedy"), tracking_uri=uri, use_ray=False, log=lines.append)
    assert any(line.startswith("cooking 2 ingredients of sweep s3") for line in lines), lines
    for recipe, version in cooked.versions.items():
        kept = set(tracker.model_version(MODEL, version).tags["ingredients"].split(","))
        assert kept and kept <= new, (recipe, kept)


@pytest.mark.parametrize("resources, message", [
    ("{cpu: 64, gpu: 0}", (r"'sweep.resources': a trial worker asks for 64 CPU and 0 GPU, but the largest "
                           r"node of this Ray has \d+ CPU")),
    ("{workers: 64, cpu: 1}", (r"'sweep.resources': a trial of 64 workers asks for 64 CPU and 0 GPU, but this "
                               r"local Ray has \d+ CPU")),
    ("{cpu: 1}\n  online_soup: true\ncook:\n  resources: {cpu: 64}",
     (r"'sweep.online_soup': the online soup holds cook.resources \(64 CPU, 0 GPU\) for the whole sweep, and "
      r"beside it a trial needs 1 CPU and 0 GPU, but this local Ray has \d+ CPU")),
], ids=["worker", "workers", "online-soup"])
def test_a_sweep_that_could_never_be_scheduled_is_refused_before_anything_is_logged(hermetic, resources, message):
    import ray

    from orchestrator.sweep.driver import run_sweep

    space = hermetic["tmp"] / "huge.yaml"
    space.write_text((SPACES / "tiny4.yaml").read_text().replace("resources: {cpu: 1}", f"resources: {resources}")
                     .replace("batch_size: 128", "batch_size: 128\n    micro_batch_size: 2"))
    try:
        with pytest.raises(ConfigError, match=r"key " + message):
            run_sweep(space, name="huge", storage_path=hermetic["storage"])
    finally:
        ray.shutdown()
    assert MlflowClient(hermetic["uri"]).get_experiment_by_name("tiny4") is None


def test_an_unfinished_sweep_is_cooked_only_with_partial(swept, tmp_path):
    uri = copy_store(swept, tmp_path / "s")
    tracker, exp, runs = _trials(uri)
    parent = runs[0].data.tags["mlflow.parentRunId"]
    tracker.client.update_run(parent, status="RUNNING")  # as while its trials still train
    before = len(tracker.client.search_registered_models())
    with pytest.raises(CookError, match=f"sweep '{SWEEP}' has not finished .*RUNNING.*--partial"):
        cook(SWEEP, recipes=("uniform",), tracking_uri=uri, use_ray=False, log=QUIET)
    assert len(tracker.client.search_registered_models()) == before
    out = cook(SWEEP, recipes=("uniform",), tracking_uri=uri, use_ray=False, log=QUIET, partial=True)
    version = tracker.client.get_model_version(MODEL, out.versions["uniform"])
    assert version.tags["partial_sweep"] == "true"
    assert tracker.client.get_run(out.soup_runs["uniform"]).data.tags["partial_sweep"] == "true"


def test_a_store_whose_artifacts_were_deleted_is_one_error_line(swept, tmp_path, capsys, monkeypatch):
    from orchestrator.cli import main

    uri = copy_store(swept, tmp_path / "s")
    shutil.rmtree(tmp_path / "s" / "mlartifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["cook", "--sweep", SWEEP, "--no-ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be read from its artifacts" in err[0], err
    assert not MlflowClient(uri).search_registered_models()


@pytest.mark.parametrize("ray_task", [False, True], ids=["in-process", "ray"])
def test_two_cooks_at_once_register_each_soup_once(swept, tmp_path, ray_task):
    uri = copy_store(swept, tmp_path / "s")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    cmd = [venv_bin("soup"), "cook", "--sweep", SWEEP, "--recipes", "uniform,greedy"]
    cmd += [] if ray_task else ["--no-ray"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    # the second to log waited for the first, withdrew a duplicate version, or found it done
    assert any(m in "".join(outs) for m in ("another cook", "already cooked")), outs
    client = MlflowClient(uri)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(v.tags["recipe"] for v in versions) == ["greedy", "uniform"], outs
    exp = client.get_experiment_by_name("tiny4").experiment_id
    soups = client.search_runs([exp], "tags.`soup.role` = 'soup'")
    assert sorted(r.data.tags["recipe"] for r in soups) == ["greedy", "uniform"]
    assert all(r.info.status == "FINISHED" for r in soups)
    assert {v.run_id for v in versions} == {r.info.run_id for r in soups}


@pytest.mark.fresh_store
def test_a_sweep_id_too_long_for_a_folder_is_refused_before_anything_starts(hermetic):
    import ray

    from orchestrator.sweep.driver import run_sweep

    with pytest.raises(ConfigError, match="must be at most 100 printable characters without '/'.*it has 300"):
        run_sweep(SPACES / "tiny4.yaml", name="s" * 300, storage_path=hermetic["storage"])
    assert not ray.is_initialized() and not Path(hermetic["storage"]).exists()
    assert not Path(hermetic["uri"][len("sqlite:///"):]).exists()
