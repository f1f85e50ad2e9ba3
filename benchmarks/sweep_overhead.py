"""Benchmark: orchestration overhead of the tiny sweep, and where it goes.

Runs a search space (default search_spaces/tiny_digits.yaml) on a local Ray into a temporary
MLflow store and prints the sweep's wall time against the ideal: the sum of the trials' own
training time divided by the number of trials that can run at once. The ratio is what Ray,
MLflow logging, process start-up, data building and evaluation cost on top; the breakdown
sums each phase over the trials (from the ``time_*_s`` metrics each trial logs).

    .venv/bin/python benchmarks/sweep_overhead.py [SPACE.yaml] [--workers N] [--before REV]

``--workers N`` runs every trial on N Ray Train workers (DDP over Gloo here); one worker trains
in the Tune trial's own actor. ``--before REV`` first runs the same sweep with the code of git
revision REV (exported to a temporary folder), so that both ratios are measured side by side on
the same machine in one run. ``--floor`` (or ``--floor-only``) also measures what Ray itself
costs a trial of that shape, with trial functions that do nothing: for one worker, Tune's start
of the first trial and its turnaround from one trial to the next in a reused actor; for several,
Ray Train's start-up from the Tune trial's start to the worker function's first line (the floor
under our ``worker_start``), by stage. For one worker it also runs the sweep floor: the same
training times in trial functions that only import what any open_clip trial logging to MLflow
imports, open and end their MLflow run and keep a core busy for the time, on a fresh store and a
local Ray like ours: what a Tune + MLflow + open_clip sweep pays here whatever its code, so that
ours / floor is what our own code adds; and that floor once more with the work any trial of the
space must do besides training (build the task and the model with its zero-shot head, evaluate
test and every shift once), so that ours / (floor + required) is what our code adds beyond it.

``--running-ray`` first starts a private Ray head (``ray start --head`` on loopback, its own
ports and temp dir: the tests' `RayHead`), untimed, and runs every sweep measured (ours, the
floors, and with ``--before`` the older code through this script) on it, as ``soup sweep`` runs
under ``ray job submit`` on a cluster that is already up; without it each sweep starts and stops
its own local Ray inside its timed wall, as ``soup sweep`` does on a laptop.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("worker_start", "data", "model", "heldout_per_epoch", "final_evaluation", "log_result")


_TOKEN_DIR = tempfile.mkdtemp(prefix="soup-bench-token-")
atexit.register(shutil.rmtree, _TOKEN_DIR, True)
_TOKEN = Path(_TOKEN_DIR) / "auth_token"  # Ray reads it once a process
_ADDRESS: str | None = None  # with --running-ray: the head every sweep runs on


def _hermetic(tmp: str) -> None:
    """A fresh MLflow store in `tmp`, and a fresh home for the drivers and trials, except on a
    running head (``--running-ray``), whose home, already in ``HOME``, every sweep on it shares."""
    if not _ADDRESS:
        home = Path(tmp) / "home"
        (home / ".ray").mkdir(parents=True)
        os.environ["HOME"] = str(home)
    if not _TOKEN.exists():
        _TOKEN.write_text(uuid.uuid4().hex)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(_TOKEN),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
                       "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})  # a local Ray on loopback only
    if _ADDRESS:
        os.environ["RAY_ADDRESS"] = _ADDRESS
    else:
        os.environ.pop("RAY_ADDRESS", None)


@contextlib.contextmanager
def running_head(space: Path):
    """A private Ray head on loopback for the whole benchmark (``--running-ray``), with the data
    of `space` already built in its home (a cluster that has run the space's world before),
    ready before anything is timed and stopped at the end without touching any other Ray. It
    takes as many CPUs as the machine, as ``ray start`` does."""
    global _ADDRESS
    sys.path.insert(0, str(REPO / "tests"))
    # the tests' head; their conftest, imported with it, sets a HOME and token that _hermetic replaces
    from servers import RayHead

    with tempfile.TemporaryDirectory(prefix="soup-bench-head-") as tmp:
        _hermetic(tmp)
        from orchestrator import data
        from orchestrator.config import SearchSpace
        from orchestrator.config.loading import load_yaml

        data.load_task(load_yaml(SearchSpace, space).base.data)
        head = RayHead(Path(tmp) / "ray-head.log", env=dict(os.environ), num_cpus=os.cpu_count() or 1)
        head.start()
        try:
            _ADDRESS = head.address
            yield head.address
        finally:
            _ADDRESS = None
            head.stop()


def _on(address: str, token: str) -> None:
    """In a child run (``--on``): measure on its parent's head, with its token (and home)."""
    global _ADDRESS, _TOKEN
    _ADDRESS, _TOKEN = address, Path(token)


def measure(space: Path, workers: int | None) -> dict:
    """Run the sweep here (the code on sys.path) and return its figures."""
    with tempfile.TemporaryDirectory(prefix="soup-bench-") as tmp:
        _hermetic(tmp)
        import yaml

        text = yaml.safe_load(space.read_text())
        if workers:
            text.setdefault("sweep", {}).setdefault("resources", {})["workers"] = workers
        path = Path(tmp) / space.name
        path.write_text(yaml.safe_dump(text))
        import ray

        from orchestrator.record.tracking import Tracker
        from orchestrator.sweep.driver import run_sweep

        t0, lines = time.time(), []
        out = run_sweep(path, name="bench", storage_path=f"{tmp}/ray_results",
                        log=lambda line: lines.append((time.time() - t0, line)))
        wall = time.time() - t0
        cpus = ray.cluster_resources().get("CPU", 1)
        ray.shutdown()
        runs = Tracker().trial_runs(out.experiment_id, out.sweep_id, "FINISHED")
        res = text.get("sweep", {}).get("resources", {})
        per_trial = res.get("workers", 1) * res.get("cpu", 1)
        conc = max(1, min(text.get("sweep", {}).get("max_concurrent_trials", 2), int(cpus // per_trial)))
        phases = {p: sum(r.data.metrics.get(f"time_{p}_s", float("nan")) for r in runs) for p in PHASES}
        return {"trials": len(runs), "concurrency": conc, "wall": wall,
                "train": sum(r.data.metrics["train_seconds"] for r in runs), "phases": phases,
                "timeline": _timeline(t0, lines, runs)}


def _timeline(t0: float, lines: list[tuple[float, str]], runs) -> dict:
    """Seconds from `run_sweep`'s call: the driver's log lines (Ray started, the sweep begun), and
    per trial its MLflow run's start and end with its training time (`--timeline` prints them)."""
    trials = sorted(({"name": r.info.run_name.split(" ", 1)[0], "start": r.info.start_time / 1000 - t0,
                      "end": r.info.end_time / 1000 - t0, "train": r.data.metrics["train_seconds"],
                      "final_evaluation": r.data.metrics.get("time_final_evaluation_s", float("nan")),
                      "log_result": r.data.metrics.get("time_log_result_s", float("nan"))}
                     for r in runs), key=lambda t: t["start"])
    return {"log": [(round(t, 2), line[:90]) for t, line in lines], "trials": trials}


def print_timeline(tl: dict, wall: float) -> None:
    print("timeline (seconds from run_sweep's call):")
    for t, line in tl["log"]:
        print(f"  {t:6.1f}  driver: {line}")
    for tr in tl["trials"]:
        outside = tr["end"] - tr["start"] - tr["train"]
        print(f"  {tr['start']:6.1f} -> {tr['end']:6.1f}  {tr['name']}: trained {tr['train']:.1f}s, "
              f"{outside:.1f}s of its run outside training (final evaluation {tr['final_evaluation']:.1f}s, "
              f"logging the result {tr['log_result']:.1f}s)")
    first, last = min(t["start"] for t in tl["trials"]), max(t["end"] for t in tl["trials"])
    print(f"  before the first trial's run: {first:.1f}s; after the last trial's end: {wall - last:.1f}s")


# Ray's tasks on the way from a Tune trial's start to its worker function, in the order they
# run (the worker group's three actors start together); Ray's public state API times each one.
STAGES = (("Tune trial actor", ("ImplicitFunc.__init__",)),
          ("Train controller actor", ("TrainController.__init__",)),
          ("worker group (worker, sync and placement-group cleaner actors)",
           ("RayTrainWorker.__init__", "SynchronizationActor.__init__", "PlacementGroupCleaner.__init__")),
          ("train context (with a DatasetManager actor)", ("RayTrainWorker.init_train_context",)))


def _stages(start: float) -> list[tuple[str, float, float]]:
    """Per stage of `STAGES`: mean seconds over the trials (run one at a time) from the stage's
    first task submitted to its last finished, and of that the mean seconds its actors waited
    for a process (lease and start, before ``__init__`` runs)."""
    from ray.util.state import list_tasks

    time.sleep(3)  # task events reach the state API within a second or two
    events: dict[str, list[dict]] = {}
    for t in list_tasks(detail=True, limit=10000, raise_on_missing_output=False):
        ev = {e["state"]: e["created_ms"] / 1000 for e in (t.events or [])}
        if min(ev.values(), default=0) >= start:
            events.setdefault(t.name, []).append(ev)
    out = []
    for label, names in STAGES:
        runs = [sorted(events.get(n, []), key=lambda ev: ev["PENDING_NODE_ASSIGNMENT"]) for n in names]
        n = min((len(r) for r in runs), default=0)
        if not n:
            continue
        span = [max(r[i].get("FINISHED", 0) for r in runs) - min(r[i]["PENDING_NODE_ASSIGNMENT"] for r in runs)
                for i in range(n)]
        wait = [max(r[i].get("RUNNING", 0) - r[i]["PENDING_NODE_ASSIGNMENT"] for r in runs)
                for i in range(n)] if names[0].endswith("__init__") else [0.0] * n
        out.append((label, sum(span) / n, sum(wait) / n))
    return out


def floor(trials: int, workers: int) -> tuple[float, list[tuple[str, float, float]]]:
    """Mean seconds from a Tune trial's start to its TorchTrainer's worker function, for a worker
    function that does nothing (Ray Train's own start-up on this machine), trials one at a time;
    and that time by stage (`_stages`)."""
    with tempfile.TemporaryDirectory(prefix="soup-floor-") as tmp:
        _hermetic(tmp)
        import ray.train
        from ray import tune
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        from orchestrator.runtime import connect  # before ray: the local Ray stays on loopback
        from orchestrator.sweep.driver import DRIVER_BUNDLE

        def worker(config):
            ray.train.report({"waited": time.time() - config["t0"]})

        def driver(config):
            TorchTrainer(worker, train_loop_config={"t0": time.time()},
                         scaling_config=ray.train.ScalingConfig(num_workers=workers),
                         run_config=ray.train.RunConfig(storage_path=f"{tmp}/train",
                                                        name=tune.get_context().get_trial_id(),
                                                        callbacks=[TuneReportCallback()])).fit()

        connect.init_ray(lambda line: None)
        start = time.time()
        grid = tune.Tuner(tune.with_resources(driver, DRIVER_BUNDLE),
                          param_space={"i": tune.grid_search(list(range(trials)))},
                          tune_config=tune.TuneConfig(max_concurrent_trials=1),
                          run_config=tune.RunConfig(storage_path=f"{tmp}/tune", verbose=0)).fit()
        stages = _stages(start)
        ray.shutdown()
        return sum(r.metrics["waited"] for r in grid) / trials, stages


def tune_floor(trials: int) -> tuple[float, float]:
    """For trials that train in the Tune actor: seconds from ``Tuner.fit()`` to the first trial
    function's first line, and the mean seconds between one trial function's first line and the
    next one's (one at a time, actor reused: Tune's own turnaround), for functions that do
    nothing but report."""
    with tempfile.TemporaryDirectory(prefix="soup-floor-") as tmp:
        _hermetic(tmp)
        from orchestrator.runtime import connect  # noqa: I001 (before ray: the local Ray stays on loopback)
        import ray
        from ray import tune

        def trial(config):
            tune.report({"started": time.time()})

        connect.init_ray(lambda line: None)
        t0 = time.time()
        grid = tune.Tuner(tune.with_resources(trial, {"cpu": 1}),
                          param_space={"i": tune.grid_search(list(range(trials)))},
                          tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
                          run_config=tune.RunConfig(storage_path=f"{tmp}/tune", verbose=0)).fit()
        ray.shutdown()
        starts = sorted(r.metrics["started"] for r in grid)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        return starts[0] - t0, sum(gaps) / max(1, len(gaps))


def sweep_floor(trains: list[float], concurrency: int, space: Path | None = None) -> float:
    """Wall seconds of the sweep that any Tune + MLflow + open_clip trial would pay for, on the
    same path as ours: a fresh MLflow store's first client, the Ray ours starts (or joins), and Tune
    running one trial per entry of `trains` (in that order, `concurrency` at a time, actors
    reused), each importing torch, torchvision, open_clip and mlflow, opening an MLflow run in the
    store, keeping one core busy for that many seconds (as a one-thread training does), ending
    the run. Timed from before the store's first client, as ours is from `run_sweep`'s call.

    With `space`, each trial also does the work that fine-tuning `space`'s model and reporting
    it requires whatever the code: the task and the model with its zero-shot head built before
    the training time, test and every shift evaluated once after it (the forward passes whose
    accuracies every trial logs)."""
    with tempfile.TemporaryDirectory(prefix="soup-floor-") as tmp:
        _hermetic(tmp)
        from orchestrator.runtime import connect  # noqa: I001 (before ray: the local Ray stays on loopback)
        import ray
        from mlflow.tracking import MlflowClient
        from ray import tune

        def trial(config):
            import open_clip  # noqa: F401 (imports torch and torchvision)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(config["uri"])
            run = client.create_run(config["experiment"])
            required = _required_work(config["space"]) if config["space"] else None
            end = time.time() + config["train"]
            while time.time() < end:
                pass
            if required:
                required()
            client.set_terminated(run.info.run_id)
            tune.report({"done": 1})

        t0 = time.time()
        uri = os.environ["MLFLOW_TRACKING_URI"]
        experiment = MlflowClient(uri).create_experiment("floor")
        connect.init_ray(lambda line: None, dashboard=False)
        tune.Tuner(tune.with_resources(trial, {"cpu": 1}),
                   param_space={"train": tune.grid_search(trains), "uri": uri, "experiment": experiment,
                                "space": str(space) if space else ""},
                   tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
                   run_config=tune.RunConfig(storage_path=f"{tmp}/tune", verbose=0)).fit()
        wall = time.time() - t0
        ray.shutdown()
        return wall


def _required_work(space: str):
    """In a floor trial: build `space`'s task and model (one torch thread, as a one-CPU trial
    trains), and return the final evaluation on test and every shift, to run after training."""
    import torch

    from orchestrator import data
    from orchestrator.config import SearchSpace
    from orchestrator.config.loading import load_yaml
    from orchestrator.train import evaluate
    from orchestrator.train.accel import accel_for
    from orchestrator.train.finetune import build_model

    torch.set_num_threads(1)
    cfg = load_yaml(SearchSpace, Path(space)).base
    task = data.load_task(cfg.data)
    accel = accel_for(cfg.train, cfg.data.workers)
    model = accel.prepare(build_model(cfg, task, accel, lead=True))
    return lambda: evaluate.evaluate_all(model, task.reporting(), accel)


def ideal_wall(m: dict) -> float:
    """The sweep's wall time if it were its trials' training alone, packed `concurrency` at a time."""
    return m["train"] / m["concurrency"]


def print_sweep_floor(m: dict, space: Path) -> None:
    """The floor sweeps (`sweep_floor`, without and with the required work) with our trials'
    training times, beside ours."""
    trains = [t["train"] for t in m["timeline"]["trials"]]  # in the order our trials started
    ideal = ideal_wall(m)
    wall = sweep_floor(trains, m["concurrency"])
    print(f"[floor] the same {len(trains)} training times, {m['concurrency']} at a time, in trial functions "
          f"that only import torch, torchvision, open_clip and mlflow, open and end an MLflow run and keep "
          f"a core busy for the time (a fresh store, {'the running head' if _ADDRESS else 'a local Ray'}, "
          f"Tune, actors reused): sweep wall "
          f"{wall:.1f}s  ideal wall: {ideal:.1f}s  overhead ratio: {wall / ideal:.2f}  "
          f"(ours {m['wall'] / ideal:.2f}: ours / floor {m['wall'] / wall:.2f} in wall time)")
    need = sweep_floor(trains, m["concurrency"], space)
    print(f"[floor + required] the same, each trial also building the task and the model with its "
          f"zero-shot head before its training time and evaluating test and every shift after it: "
          f"sweep wall {need:.1f}s  overhead ratio: {need / ideal:.2f}  "
          f"(ours / this {m['wall'] / need:.2f} in wall time)")


def print_floor(start: float, stages: list[tuple[str, float, float]]) -> None:
    """The stages: the Tune trial actor's own start comes before the trial function (and is not
    in `start`); the others are in it, and what is left of `start` is the calls between them."""
    for i, (label, span, wait) in enumerate(stages):
        print(f"  {label}{' (before the trial function)' if i == 0 else ''}: {span:.1f}s"
              + (f", of which {wait:.1f}s waiting for a process" if wait else ""))
    print(f"  the rest of the {start:.1f}s (calls between the stages, the worker's process group): "
          f"{start - sum(s for _, s, _ in stages[1:]):.1f}s")


def print_floors(workers: int, m: dict | None) -> None:
    """Ray's own cost of a trial of `workers` workers, beside ours (`m`) when given."""
    ours = "" if m is None else (f" (our trials: {m['phases']['worker_start'] / max(1, m['trials']):.2f}s "
                                 f"from the trial function's start to the loop's, imports and data "
                                 f"included, run {m['concurrency']} at a time)")
    if workers == 1:
        first, turnaround = tune_floor(6)
        print(f"Tune's floor for a trial in its actor: {first:.2f}s from Tuner.fit() to the first trial "
              f"function's first line; {turnaround:.2f}s from one trial function's start to the next "
              f"(reused actor, functions that only report){ours}")
        return
    start, stages = floor(3, workers)
    print(f"Ray Train's floor: {start:.1f}s from a trial function's start to an empty worker function"
          f"{ours}, by stage:")
    print_floor(start, stages)


def report(label: str, m: dict) -> None:
    ideal = ideal_wall(m)
    print(f"[{label}] trials finished: {m['trials']}  concurrency: {m['concurrency']}")
    print(f"[{label}] sum of trial training time: {m['train']:.1f}s  ideal wall: {ideal:.1f}s  "
          f"sweep wall: {m['wall']:.1f}s  overhead ratio (wall / ideal): {m['wall'] / ideal:.2f}")
    phases = {k: v for k, v in m.get("phases", {}).items() if v == v}  # drop NaN (not logged)
    if phases:
        parts = "  ".join(f"{k} {v:.1f}s" for k, v in phases.items())
        rest = m["wall"] * m["concurrency"] - m["train"] - sum(phases.values())
        # A trial whose workers cannot all be placed yet counts its wait for another trial's
        # workers in its worker_start: the phases then overlap and leave no rest to report.
        tail = (f"rest (Tune scheduling, trial start and end, idle slots) {rest:.1f}s" if rest >= 0 else
                "no rest: worker_start includes waiting for the other trial's workers to end")
        print(f"[{label}] summed over trials: training {m['train']:.1f}s  {parts}  {tail}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("space", nargs="?", default=str(REPO / "search_spaces" / "tiny_digits.yaml"))
    ap.add_argument("--workers", type=int, default=None, help="Ray Train workers per trial")
    ap.add_argument("--before", help="a git revision to measure first, side by side")
    ap.add_argument("--floor", action="store_true", help="also measure Ray Train's start-up alone")
    ap.add_argument("--timeline", action="store_true",
                    help="also print when Ray started and each trial's MLflow run began and ended")
    ap.add_argument("--running-ray", action="store_true",
                    help="run every sweep on a Ray head started (untimed) before them, as under ray job submit")
    ap.add_argument("--floor-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)  # internal: a child run writes its figures
    ap.add_argument("--on", nargs=2, metavar=("ADDRESS", "TOKEN"), help=argparse.SUPPRESS)  # internal: its head
    args = ap.parse_args()
    space = Path(args.space).resolve()
    if args.floor_only:
        print_floors(args.workers or 1, None)
        return
    if args.json:
        if args.on:
            _on(*args.on)
        Path(args.json).write_text(json.dumps(measure(space, args.workers)))
        return
    with running_head(space) if args.running_ray else contextlib.nullcontext() as address:
        if address:
            print(f"every sweep below runs on a Ray head at {address}, started before them (not timed), "
                  f"the space's data already built in its home")
        run_all(args, space)


def run_all(args, space: Path) -> None:
    """Ours (after the code of ``--before``, when given), then the floors asked for."""
    if args.before:
        with tempfile.TemporaryDirectory(prefix="soup-before-") as old:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
            env = {**os.environ, "PYTHONPATH": old, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
            workers = ["--workers", str(args.workers)] if args.workers else []
            if _ADDRESS:  # this script's measure, on the head, with the older code on the path
                figures = Path(old) / "figures.json"
                cmd = [sys.executable, __file__, str(space), *workers, "--json", str(figures),
                       "--on", _ADDRESS, str(_TOKEN)]
            else:  # that revision's own benchmark, as it measured itself
                cmd = [sys.executable, str(Path(old) / "benchmarks" / "sweep_overhead.py"), str(space), *workers]
            run = subprocess.run(cmd, env=env, cwd=old, capture_output=True, text=True)
            if run.returncode != 0:
                before = None
            else:
                before = json.loads(figures.read_text()) if _ADDRESS else _parse_old(run.stdout)
            if before is None:
                sys.exit(f"the {args.before} run failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        report(f"before {args.before}" + (f", {args.workers} workers per trial" if args.workers else ""), before)
    m = measure(space, args.workers)
    report("now" + (f", {args.workers} workers per trial" if args.workers else ""), m)
    if args.timeline:
        print_timeline(m["timeline"], m["wall"])
    if args.floor:
        print_floors(args.workers or 1, m)
        if (args.workers or 1) == 1:
            print_sweep_floor(m, space)
    if args.before:
        print(f"overhead ratio before / now: {before['wall'] / ideal_wall(before):.2f}"
              f" / {m['wall'] / ideal_wall(m):.2f}")


def _parse_old(stdout: str) -> dict | None:
    """Figures from the printed lines of an older version of this benchmark (or of this one)."""
    import re

    trials = re.search(r"trials finished: (\d+)\s+concurrency: (\d+)", stdout)
    train = re.search(r"sum of trial training time: ([\d.]+)s", stdout)
    wall = re.search(r"sweep wall(?: time)?: ([\d.]+)s", stdout)  # both of its wordings
    if not (trials and train and wall):
        return None
    return {"trials": int(trials[1]), "concurrency": int(trials[2]), "train": float(train[1]),
            "wall": float(wall[1])}


if __name__ == "__main__":
    main()
