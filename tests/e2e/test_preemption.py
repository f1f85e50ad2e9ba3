"""Preemption and scale, on CPU with the code paths a GPU cluster runs, on both of a trial's
launch paths: one worker in the Tune trial's actor (``launcher: auto``), and a Ray Train
`TorchTrainer` (``launcher: torch_trainer``; what several workers always use).

- The one-worker trial's actor SIGKILLed during epoch 3 of 5: Tune retries the trial from its
  epoch-2 checkpoint (``tune.get_checkpoint``), in the same MLflow run, which ends with each
  epoch logged once and a final checkpoint bit-identical to an uninterrupted run's.
- The same with a TorchTrainer's worker killed (Ray Train restarts the worker group), and with
  the whole trial lost at once (Tune retries the trial, whose new TorchTrainer finds its Train
  run's checkpoint by name); both end with the weights of the uninterrupted one-worker trial in
  the Tune actor: one training loop, launched two ways.
- The sweep's driver SIGKILLed (with its local Ray) during epoch 3 of its second trial:
  ``soup sweep --resume`` leaves the finished first trial alone and continues the second from
  its last checkpoint, not from epoch 1, in its run.
- Two Gloo workers with the same global batch and seed train what one worker trains.
"""

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import run, venv_bin
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from servers import kill_owned, new_mark, owned_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 5 epochs of about 60 steps (batch 16), mixup, smoothing and augmentation on: every random
# stream and the optimizer's state must survive the resume for the weights to come out identical.
SPACE = """
base:
  train: {{epochs: 5, batch_size: 16, warmup_steps: 10, lr: 3.0e-4, log_every_steps: 4,
          augment: light, label_smoothing: 0.1, mixup_alpha: 0.4, seed: 7}}
search:
  train.weight_decay: {{choice: [0.05]}}
sweep:
  num_samples: {trials}
  max_concurrent_trials: 1
  resources: {{workers: {workers}, cpu: 1, launcher: {launcher}}}
  max_failures: 2
  online_soup: {online}
tracking:
  experiment_name: {experiment}
"""


def _space(tmp: Path, experiment: str, workers: int = 1, trials: int = 1, launcher: str = "auto",
           online: bool = False, **train) -> str:
    text = SPACE.format(workers=workers, experiment=experiment, trials=trials, launcher=launcher,
                        online=str(online).lower())
    for k, v in train.items():
        text = text.replace("seed: 7}", f"seed: 7, {k}: {v}}}")
    path = tmp / f"{experiment}-{workers}.yaml"
    path.write_text(text)
    return str(path)


def _trials(uri: str, experiment: str, view=ViewType.ACTIVE_ONLY):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`soup.role` = 'trial'", run_view_type=view)


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _committed(storage: str, sweep: str, run) -> str | None:
    """The latest checkpoint that a restart of the trial of MLflow run `run` would resume from.

    In the Tune actor, the trial's ``checkpoint`` tag: it is set once ``tune.report`` returns,
    which is when Tune has registered the checkpoint (the report waits for Tune's next call).
    In a TorchTrainer, Ray Train's controller registers a reported checkpoint when it next polls
    the workers; the run's snapshot on storage says when it has."""
    if run.data.tags.get("launcher") != "torch_trainer":
        return run.data.tags.get("checkpoint")
    snap = Path(storage, sweep, f"train-{run.data.tags['trial_key']}", "checkpoint_manager_snapshot.json")
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not written yet, or being rewritten
        return None
    return latest.get("checkpoint_dir_name")


def _saved_epoch(storage: str, sweep: str) -> int | None:
    """The epoch of the last checkpoint of the sweep's running trial in the experiment state Tune
    last saved to storage (what ``Tuner.restore`` reads), or None while there is none. Each trial
    is a pair of JSON texts there, the second holding its last result; an epoch's report carries
    its checkpoint, the trial's final report none."""
    states = sorted(Path(storage, sweep).glob("experiment_state-*.json"))
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError, KeyError):  # being rewritten
        return None
    for trial, meta in trials:
        last = json.loads(meta).get("last_result") or {}
        if json.loads(trial).get("status") != "TERMINATED" and last.get("checkpoint_dir_name"):
            return int(last["epoch"])
    return None


def _in_epoch_3(uri: str, experiment: str, storage: str, finished: int = 0, saved: bool = False) -> bool:
    """True once `finished` trials have finished, and the running trial's epoch-2 checkpoint is
    committed (with `saved`, also in Tune's saved experiment state) and it has logged a step of
    epoch 3."""
    runs = _trials(uri, experiment)
    if sum(r.info.status == "FINISHED" for r in runs) < finished:
        return False
    runs = [r for r in runs if r.info.status == "RUNNING"]
    if not runs or _committed(storage, experiment, runs[0]) != "epoch0002-end":
        return False
    if saved and _saved_epoch(storage, experiment) != 2:
        return False
    run_id = runs[0].info.run_id
    epochs = _history(uri, run_id, "epoch")
    if not any(v == 2 for _, v in epochs):
        return False
    end_of_2 = next(s for s, v in epochs if v == 2)
    return any(s > end_of_2 for s, _ in _history(uri, run_id, "train_loss"))


def _weights(uri: str, run_id: str, tmp: Path) -> dict[str, torch.Tensor]:
    folder = MlflowClient(uri).download_artifacts(run_id, "checkpoint", str(tmp))
    return load_file(str(Path(folder) / "model.safetensors"))


def _start_sweep(space: str, name: str, hermetic, mark: str) -> subprocess.Popen:
    cmd = [venv_bin("soup"), "sweep", space, "--name", name, "--storage-path", hermetic["storage"]]
    log = open(hermetic["tmp"] / f"{name}.log", "w")
    return subprocess.Popen(cmd, env={**hermetic["env"], **dict([mark.split("=")])}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_epoch_3(proc, hermetic, experiment: str, name: str, finished: int = 0, saved: bool = False) -> None:
    deadline = time.time() + 600  # generous: a cold start of Ray on a loaded machine
    storage = hermetic["storage"]
    while not _in_epoch_3(hermetic["uri"], experiment, storage, finished, saved) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.05)
    log = (hermetic["tmp"] / f"{name}.log").read_text()[-4000:]
    assert proc.poll() is None, "the sweep ended before the kill:\n" + log
    assert _in_epoch_3(hermetic["uri"], experiment, storage, finished, saved), "epoch 3 never started:\n" + log


def _descendants(root: int) -> set[int]:
    """Every live process below `root` in the process tree (Ray's workers are children of the
    raylet that the sweep's local Ray started), read from /proc."""
    parent = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat", "rb") as f:
                    parent[int(e)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _ray_processes(mark: str, session: int, *titles: bytes) -> list[int]:
    """The sweep's Ray processes whose title (``ray::<actor class>...``) names one of `titles`."""
    out = []
    for pid in owned_pids(mark, session) | _descendants(session):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if any(t in cmdline for t in titles):
                out.append(pid)
        except OSError:
            continue
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The sha256 and weights of the final checkpoint of the same trial, never interrupted."""
    import ray

    from orchestrator.sweep.driver import run_sweep

    tmp = tmp_path_factory.mktemp("clean")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_sweep(_space(tmp, "clean"), name="clean", storage_path=str(tmp / "ray_results"), tracking_uri=uri)
    ray.shutdown()
    (trial,) = _trials(uri, "clean")
    assert trial.info.status == "FINISHED"
    return {"sha256": trial.data.tags["checkpoint_sha256"], "weights": _weights(uri, trial.info.run_id, tmp),
            "heldout": trial.data.metrics["heldout_acc"], "run": trial, "uri": uri}


def _recorded(uri: str, experiment: str) -> int:
    """Trials in the online soup's record on the sweep run (0 when it has none yet)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`soup.role` = 'sweep'")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return len(json.loads(Path(client.download_artifacts(parent.info.run_id, "online/record.json",
                                                                 tmp)).read_text())["entries"])
        except Exception:  # noqa: BLE001 - no record yet
            return 0


def _check_each_epoch_once(uri: str, trial, resumed_at: int | None):
    """The trial's run is FINISHED with each epoch logged once, trained in one attempt or, if
    `resumed_at`, in a second that started at that epoch from the epoch-2 checkpoint."""
    assert trial.info.status == "FINISHED"
    run_id = trial.info.run_id
    epochs = _history(uri, run_id, "epoch")
    assert [v for _, v in epochs] == [1, 2, 3, 4, 5], epochs
    assert len(_history(uri, run_id, "heldout_acc")) == 5
    steps = [s for s, _ in _history(uri, run_id, "train_loss")]
    assert len(steps) == len(set(steps)), "a training step was logged twice"
    starts = [v for _, v in _history(uri, run_id, "attempt_start_epoch")]
    assert starts == ([1] if resumed_at is None else [1, resumed_at]), starts
    if resumed_at is not None:
        assert trial.data.tags["resumed_from"] == f"epoch{resumed_at - 1:04d}-end"
    assert any(k.startswith("system/cpu") for k in trial.data.metrics), "no system metrics"


def _check_one_run_each_epoch_once(uri: str, experiment: str, resumed_at: int):
    every = _trials(uri, experiment, ViewType.ALL)
    assert len(every) == 1, "the trial's run was replaced, not continued"
    (trial,) = every
    _check_each_epoch_once(uri, trial, resumed_at)
    return trial


def _kill_in_epoch_3_and_check(hermetic, uninterrupted, name: str, titles: tuple[bytes, ...], count,
                               launcher: str = "auto"):
    """Run the trial, SIGKILL its processes titled `titles` in epoch 3 (`count(n)` says whether
    n found is right), let the sweep finish, and check that it continued its run from epoch 3
    to the uninterrupted run's weights."""
    mark = new_mark()
    proc = _start_sweep(_space(hermetic["tmp"], name, launcher=launcher), name, hermetic, mark)
    try:
        _wait_for_epoch_3(proc, hermetic, name, name)
        victims = _ray_processes(mark, proc.pid, *titles)
        assert count(len(victims)), victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(600) == 0, (hermetic["tmp"] / f"{name}.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_owned(mark, session=proc.pid)
    trial = _check_one_run_each_epoch_once(hermetic["uri"], name, resumed_at=3)
    assert trial.data.tags["launcher"] == ("torch_trainer" if launcher == "torch_trainer" else "trial")
    assert trial.data.tags["checkpoint_sha256"] == uninterrupted["sha256"]


def test_trial_actor_killed_mid_epoch_resumes_bit_identical_in_the_same_run(hermetic, uninterrupted):
    """A one-worker trial's process OOM-killed or lost, as its node would be: Tune retries the
    trial (sweep.max_failures) in a new actor, handing it the trial's latest checkpoint."""
    _kill_in_epoch_3_and_check(hermetic, uninterrupted, "actorkill", (b"ImplicitFunc",), lambda n: n == 1)


def test_worker_killed_mid_epoch_resumes_bit_identical_in_the_same_run(hermetic, uninterrupted):
    """A TorchTrainer's worker OOM-killed, or its process lost: Ray Train restarts the worker group."""
    _kill_in_epoch_3_and_check(hermetic, uninterrupted, "workerkill", (b"RayTrainWorker",), lambda n: n == 1,
                               launcher="torch_trainer")


def test_node_lost_mid_epoch_resumes_from_the_checkpoint(hermetic, uninterrupted):
    """Everything of a TorchTrainer trial dies at once, as when the node that ran it is lost: the
    Tune trial (the TorchTrainer's driver), the Train controller and the worker. Tune retries the
    trial (sweep.max_failures), whose new driver finds the run and the committed checkpoint by
    name. One machine stands in for the cluster: Ray refuses a second node on loopback-only Ray."""
    _kill_in_epoch_3_and_check(hermetic, uninterrupted, "nodelost",
                               (b"ImplicitFunc", b"TrainController", b"RayTrainWorker"), lambda n: n >= 3,
                               launcher="torch_trainer")


# What `--verbose` brings back to the terminal on a resume where a trial still trains: Ray's
# detail, which a quiet sweep keeps in its detail log (Tune's tables; each path's own lines).
VERBOSE = {"auto": ("(run_trial", "╭"),
           "torch_trainer": ("Reporting training result", "(RayTrainWorker", "(TrainController", "╭")}


@pytest.mark.parametrize("launcher", ["auto", "torch_trainer"])
def test_driver_killed_then_resume_continues_from_the_checkpoint(hermetic, uninterrupted, launcher):
    """Two trials of the uninterrupted run's config, one at a time: the driver and its local Ray
    are SIGKILLed once the first has finished and the second is in epoch 3 (in the Tune actor:
    once Tune's saved state holds its epoch-2 checkpoint). `--resume` leaves the finished trial
    alone and continues the other from the epoch after its last checkpoint, in its run.

    The one-worker sweep has an online soup: the resumed sweep's new soup actor rebuilds it from
    the record on the sweep run and counts no trial twice (one point per finished trial; the
    second trial's checkpoint is byte-identical to the first's, which it says, and takes once)."""
    mark, name = new_mark(), f"driverkill-{launcher}"
    in_trial = launcher != "torch_trainer"
    space = _space(hermetic["tmp"], name, trials=2, launcher=launcher, online=in_trial)
    proc = _start_sweep(space, name, hermetic, mark)
    try:
        _wait_for_epoch_3(proc, hermetic, name, name, finished=1, saved=in_trial)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    finally:
        kill_owned(mark, session=proc.pid)  # nothing of the killed sweep logs on behind the resume
    before = {t.info.status: t for t in _trials(hermetic["uri"], name)}
    assert sorted(before) == ["FINISHED", "RUNNING"], before
    recorded = _recorded(hermetic["uri"], name) if in_trial else 0
    last = before["RUNNING"].data.tags.get("checkpoint", "")
    assert last == "epoch0002-end", before["RUNNING"].data.tags
    if in_trial:  # what a restore reads, and the newest checkpoint on storage, say epoch 2
        assert _saved_epoch(hermetic["storage"], name) == 2
    # --verbose (here, where a trial still trains) brings Ray's detail back to the terminal
    state = hermetic["tmp"] / "state"  # where a detail log would go
    cmd = [venv_bin("soup"), "sweep", space, "--name", name, "--storage-path", hermetic["storage"],
           "--resume", "--verbose"]
    res = run(cmd, {**hermetic["env"], "XDG_STATE_HOME": str(state)}, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    terminal = res.stdout + res.stderr
    for detail in VERBOSE[launcher]:
        assert detail in terminal, detail
    assert "detail log" not in terminal and not state.exists()

    client = MlflowClient(hermetic["uri"])
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`soup.role` = 'sweep'", run_view_type=ViewType.ALL)
    assert parent.info.status == "FINISHED"
    every = {t.info.run_id: t for t in _trials(hermetic["uri"], name, ViewType.ALL)}
    assert len(every) == 2, "a run was replaced or left behind, not continued"
    assert len({t.data.tags["trial_key"] for t in every.values()}) == 2
    done, resumed = every[before["FINISHED"].info.run_id], every[before["RUNNING"].info.run_id]
    first = [v for _, v in _history(hermetic["uri"], resumed.info.run_id, "attempt_start_epoch")][-1]
    print(f"{launcher}: last checkpoint before the kill {last}; first resumed epoch {first:g}")
    _check_each_epoch_once(hermetic["uri"], done, resumed_at=None)  # not trained again
    _check_each_epoch_once(hermetic["uri"], resumed, resumed_at=3)
    for trial in (done, resumed):
        assert trial.data.tags["checkpoint_sha256"] == uninterrupted["sha256"]
    if in_trial:
        _check_online_soup_counted_once(client, parent, recorded, [done, resumed], res.stdout)


def _check_online_soup_counted_once(client, parent, recorded: int, trials, terminal: str) -> None:
    """The online soup after a driver kill and resume: one record entry and one point per
    finished trial, the byte-identical second checkpoint taken once, the soup registered."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent.info.run_id, "online/record.json", tmp)
        entries = json.loads(Path(path).read_text())["entries"]
    print(f"online soup: {recorded} trial(s) recorded before the kill; after the resume {len(entries)}: "
          f"{[(e['name'].split()[0], e['kept'], e.get('excluded', '')[:40]) for e in entries]}")
    assert [e["run_id"] for e in entries] == [t.info.run_id for t in trials]
    assert [e["kept"] for e in entries] == [True, False] and "byte-identical" in entries[1]["excluded"]
    for key in ("soup_kept", "soup_heldout_acc"):
        steps = sorted(m.step for m in client.get_metric_history(parent.info.run_id, key))
        assert steps == [1, 2], (key, steps)
    assert "online soup: registered as online-greedy" in terminal, terminal[-2000:]


def test_two_gloo_workers_train_what_one_worker_trains(hermetic, uninterrupted):
    """Same global batch, seed and data, split over two DDP processes. The sharded gradient equals
    the whole batch's up to float summation order, which AdamW turns into differences of up to
    about lr per step on weights whose gradient is near zero (its update is m / sqrt(v)). So the
    yardstick is the same reordering on one process: accumulating two micro-batches of 8."""
    from orchestrator.config import SearchSpace, load_yaml, with_overrides
    from orchestrator.sweep.driver import run_sweep
    from orchestrator.train.finetune import finetune

    out = run_sweep(_space(hermetic["tmp"], "two", workers=2), name="two", storage_path=hermetic["storage"])
    assert out.finished == 1
    (trial,) = _trials(hermetic["uri"], "two")
    assert trial.data.tags["workers"] == "2"
    two = _weights(hermetic["uri"], trial.info.run_id, hermetic["tmp"])
    one = uninterrupted["weights"]
    assert two.keys() == one.keys()
    diff = max((two[k].float() - one[k].float()).abs().max().item() for k in one)

    base = load_yaml(SearchSpace, _space(hermetic["tmp"], "ref")).base
    cfg = with_overrides(base, {"train.weight_decay": 0.05})
    micro = finetune(with_overrides(cfg, {"train.micro_batch_size": 8})).state_dict
    reorder = max((micro[k].float() - one[k].float()).abs().max().item() for k in one)
    print(f"2 workers vs 1: largest absolute weight difference {diff:.3g} (one process accumulating "
          f"2 micro-batches: {reorder:.3g}); held-out accuracy {trial.data.metrics['heldout_acc']:.4f} "
          f"(2 workers) vs {uninterrupted['heldout']:.4f} (1 worker)")
    assert diff <= 2 * reorder + 1e-6
    assert abs(trial.data.metrics["heldout_acc"] - uninterrupted["heldout"]) <= 2 / 269
    first = [_history(hermetic["uri"], trial.info.run_id, "train_loss")[0],
             _history(uninterrupted["uri"], uninterrupted["run"].info.run_id, "train_loss")[0]]
    assert first[0][0] == first[1][0] and first[0][1] == pytest.approx(first[1][1], rel=1e-4), first


def test_a_reused_trial_actor_keeps_nothing_from_the_trial_before(hermetic, uninterrupted):
    """Tune reuses a one-worker trial's actor for the next trial (one process, `pid` in each
    trial's results): a trial of the uninterrupted run's config, trained after a trial of
    another config (RandAugment) in the same process, ends with the weights the
    uninterrupted trial had in a fresh one. (The driver-kill test runs two trials of one config
    in one reused actor.)"""
    from orchestrator.sweep.driver import run_sweep

    path = Path(_space(hermetic["tmp"], "reuse", trials=1))
    path.write_text(path.read_text().replace(
        "train.weight_decay: {choice: [0.05]}",
        "train.weight_decay: {choice: [0.05]}\n  train.augment: {grid: [randaugment, light]}"))
    out = run_sweep(path, name="reuse", storage_path=hermetic["storage"])
    assert out.finished == 2
    pids = {}
    for result in Path(hermetic["storage"], "reuse").glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        pids[rows[0]["config"]["train.augment"]] = {r["pid"] for r in rows}
    assert pids["randaugment"] == pids["light"] and len(pids["light"]) == 1, pids
    runs = {t.data.params["train.augment"]: t for t in _trials(hermetic["uri"], "reuse")}
    assert int(runs["light"].data.tags["trial_id"].rsplit("_", 1)[1]) > \
        int(runs["randaugment"].data.tags["trial_id"].rsplit("_", 1)[1]), "the light trial ran first"
    assert runs["light"].data.tags["checkpoint_sha256"] == uninterrupted["sha256"]
    assert runs["randaugment"].data.tags["checkpoint_sha256"] != uninterrupted["sha256"]
