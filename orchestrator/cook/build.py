"""The cook's compute, the half that runs in a Ray task: fetch the checked checkpoints, build
every recipe's soup, and evaluate the soups beside the baselines.

It knows nothing of MLflow runs or the registry beyond downloading a checkpoint by run id (the
task may run on a node that does not have the driver's copies); the driver (`cook`) decides what
to build, checks the ingredients first, and logs and registers what comes back.
"""

from __future__ import annotations

import contextlib
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orchestrator import data
from orchestrator.config import FinetuneConfig, SearchSpace, validate
from orchestrator.cook.meter import Meter
from orchestrator.data.splits import TaskData, fingerprint, resident
from orchestrator.hashing import file_sha256
from orchestrator.record import logits as logitstore
from orchestrator.record.schema import CHECKPOINT_PATH, LOGITS_PATH
from orchestrator.record.tracking import Tracker
from orchestrator.soups.ensemble import GreedyEnsemble
from orchestrator.soups.greedy import rank_best_first
from orchestrator.soups.io.stream import read_weights
from orchestrator.soups.recipe import Recipe, RecipeInputs, RecipeOptions, SoupResult
from orchestrator.train import evaluate, models
from orchestrator.train.accel import Accel, for_resources


class CookError(ValueError):
    """The sweep cannot be cooked (unknown, or nothing usable); the message says why."""


@dataclass
class TrialCheckpoint:
    """A trial's checkpoint that passed the driver's checks: where the driver has it, and the
    sha256 any copy must have."""

    run_id: str
    name: str
    heldout_acc: float
    path: Path
    sha256: str
    logits_path: Path | None = None  # its logged logits (`logitstore`), checked; None: none usable
    logits_sha256: str | None = None
    finished: int = 0  # its place in the order the sweep's trials finished (0 first)


@dataclass(frozen=True)
class BuildResources:
    """What the build task was given (`cook.resources`): its CPUs size torch's threads and the
    loaders' workers; a GPU puts the model, the inputs and every evaluation on CUDA under the
    same autocast as fine-tuning (bf16 where supported)."""

    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))

    def accel(self) -> Accel:
        return for_resources(self.gpus, loader_workers=self.threads - 1)


@dataclass
class Built:
    """What the build returns to the driver: the table rows, each ingredient's row, the soups."""

    rows: list[dict]
    singles: list[dict]  # one row per ingredient the recipes were given, in `used` order
    soups: dict[str, SoupResult]  # `kept` indices refer to `used`
    classnames: list[str]
    example: torch.Tensor  # one test image: the logged model's input example
    used: list[str] = field(default_factory=list)  # run ids given to the recipes, in order
    excluded: dict[str, str] = field(default_factory=dict)  # run id -> why the build excluded it
    phases: list[dict] = field(default_factory=list)  # `meter` totals, in order
    where: dict = field(default_factory=dict)  # device, precision, threads, input devices seen
    digests: dict = field(default_factory=dict)  # split -> `splits.fingerprint`: held-out (selection) and reporting


def reference_state(space: SearchSpace) -> dict[str, torch.Tensor]:
    """The classifier the sweep fine-tuned, as tensor names, shapes and dtypes only (meta tensors:
    nothing built or computed): the layout ingredients must have."""
    classnames = data.load_task(space.base.data).classnames
    return models.classifier_layout(space.base.model, len(classnames))


def fetch_checkpoints(checkpoints: list[TrialCheckpoint], tracking_uri: str | None,
                      tmp: Path) -> tuple[list[Path], list[Path | None], int]:
    """Local checkpoint and logits paths for the build, wherever it runs, and the bytes hashed
    here. Each file is hashed once: the driver's copies, when this node has them, were hashed by
    the driver as it checked them (they lie in its private temporary folder); a build on another
    node downloads its own copies and hashes those against the sha256 the driver checked. A
    trial without usable logits has None."""
    fetch = _Fetcher(tracking_uri, tmp)
    paths = [fetch(c.run_id, c.path, CHECKPOINT_PATH, c.sha256) for c in checkpoints]
    logits = [fetch(c.run_id, c.logits_path, LOGITS_PATH, c.logits_sha256) if c.logits_sha256 else None
              for c in checkpoints]
    return paths, logits, fetch.hashed


class _Fetcher:
    def __init__(self, tracking_uri: str | None, tmp: Path) -> None:
        self.uri, self.tmp, self.tracker, self.hashed = tracking_uri, tmp, None, 0

    def __call__(self, run_id: str, local: Path | None, artifact: str, sha256: str) -> Path:
        if local is not None and Path(local).is_file():
            return Path(local)
        self.tracker = self.tracker or Tracker(self.uri)
        path = self.tracker.download(run_id, artifact, self.tmp / run_id)
        self.hashed += path.stat().st_size
        if file_sha256(path) != sha256:
            raise CookError(f"run {run_id}: {artifact} changed since it was checked "
                            f"(sha256 differs from {sha256[:12]})")
        return path


# --- evaluation ---------------------------------------------------------------------------------

def _splits(task: TaskData) -> dict:
    return {"heldout": task.heldout, **task.reporting()}


def _accs(model, task: TaskData, accel: Accel) -> dict[str, float]:
    res = evaluate.evaluate_all(model, _splits(task), accel)
    return {k: v[0] for k, v in res.items()}


def summary_row(name: str, kind: str, accs: dict[str, float], shifts) -> dict:
    """A table row: name, kind (soup, baseline, ingredient), accuracy per split, shift mean."""
    return {"name": name, "kind": kind, **accs, "shift_mean": evaluate.shift_mean(accs, shifts)}


def _measured_mismatch(logged: float, measured: float, n: int) -> str | None:
    """Why an ingredient's logged held-out accuracy cannot be trusted, or None: the cook measures
    it again, and a difference of more than one example's worth (1/n) is not rounding or a
    different device's arithmetic, it is a wrong or replaced figure or checkpoint."""
    if abs(round(logged * n) - round(measured * n)) <= 1:  # in examples: float32 figures round
        return None
    return (f"logged held-out accuracy {logged:.2%} but measured {measured:.2%} on the same "
            f"{n} examples: excluded, its figure or its checkpoint is not what the trial produced")


def _why_excluded(checkpoints: list[TrialCheckpoint], i: int, heldout_logits: torch.Tensor,
                  labels: torch.Tensor, taken: dict[str, int]) -> str | None:
    """Why ingredient `i` must not be cooked (its logged figure is contradicted, or its bytes are
    already taken), or None."""
    measured = evaluate.accuracy_of(heldout_logits, labels)
    why = _measured_mismatch(checkpoints[i].heldout_acc, measured, len(labels))
    if not why and checkpoints[i].sha256 in taken:
        first = checkpoints[taken[checkpoints[i].sha256]]
        why = f"checkpoint byte-identical to run {first.run_id} ({first.name}): cooked once, as that run"
    return why


def _logged_or_scored(ckpt: TrialCheckpoint, path: Path, logits_path: Path | None, splits: dict,
                      ctx: _Build) -> dict[str, torch.Tensor]:
    """Ingredient `ckpt`'s logits on every split: the ones its trial logged when they are provably
    for these examples (split, size, labels digest), else computed again from its checkpoint,
    with a line saying so and why."""
    found, why = None, None
    if logits_path is not None:
        ctx.meter.add_bytes(Path(logits_path).stat().st_size)
        if logitstore.checkpoint_of(logits_path) != ckpt.sha256:  # the checkpoint was replaced
            why = "its logged logits were computed with another checkpoint"
        else:
            found = logitstore.load_logits(logits_path)
    why = why or logitstore.mismatch(logitstore.described(found) if found else None,
                                     {k: s.labels for k, s in splits.items()})
    if why is None:
        return {k: found[k].logits.float() for k in splits}
    ctx.log(f"run {ckpt.run_id} ({ckpt.name}): {why}; scoring its checkpoint again")
    ctx.model.load_state_dict(read_weights(path))
    return {k: evaluate.logits(ctx.model, s, accel=ctx.accel).float() for k, s in splits.items()}


def _ensemble_rows(ctx: _Build, paths, logit_paths, checkpoints, task, scores):
    """Every ingredient scored alone, and the two logit ensembles, one ingredient at a time;
    returns (rows of the ingredients, ensemble rows, {index: why excluded}).

    Each ingredient's logits are those its trial logged (no forward pass) when they match the
    splits, else computed again. Ingredients are taken best first, so the greedy ensemble
    decides on each as it comes; only running logit sums are kept (all, and the greedy
    ensemble's), never every model's logits. An ingredient whose held-out accuracy (from its
    logits) contradicts its logged figure is excluded here, before it is offered to any ensemble
    or recipe, and so is a checkpoint byte-identical to one already taken (two runs holding the
    same file would weigh double): the better-ranked copy whose figure holds is cooked, once.
    """
    splits = _splits(task)
    singles: list[dict | None] = [None] * len(paths)
    excluded: dict[int, str] = {}
    taken: dict[str, int] = {}  # sha256 -> the ingredient cooked for those bytes
    total: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    greedy = GreedyEnsemble(task.heldout.labels)
    for i in rank_best_first(scores, len(paths)):
        per = _logged_or_scored(checkpoints[i], paths[i], logit_paths[i], splits, ctx)
        why = _why_excluded(checkpoints, i, per["heldout"], task.heldout.labels, taken)
        if why:
            excluded[i] = why
            ctx.log(f"excluded run {checkpoints[i].run_id} ({checkpoints[i].name}): {why}")
            continue
        taken[checkpoints[i].sha256] = i
        singles[i] = summary_row(checkpoints[i].name, "ingredient",
                                 {k: evaluate.accuracy_of(per[k], s.labels) for k, s in splits.items()},
                                 task.shifts)
        for sums in (total, kept) if greedy.offer(i, per["heldout"]) else (total,):
            for k, lg in per.items():
                sums[k] = lg if k not in sums else sums[k] + lg
    if not total:
        raise CookError("every ingredient was excluded: " + "; ".join(
            f"run {checkpoints[i].run_id}: {why}" for i, why in excluded.items()))
    rows = [summary_row(name, "baseline",
                        {k: evaluate.accuracy_of(sums[k], s.labels) for k, s in splits.items()},
                        task.shifts) for name, sums in (("ensemble", total), ("greedy ensemble", kept))]
    return singles, rows, excluded


# --- the build ----------------------------------------------------------------------------------

def build_and_evaluate(base_cfg: dict, checkpoints: list[TrialCheckpoint], recipes: list[Recipe],
                       options: RecipeOptions, tracking_uri: str | None = None,
                       log: Callable[[str], None] = print,
                       resources: BuildResources = BuildResources()) -> Built:
    """Build every recipe's soup and every baseline, and evaluate them all, on the device and
    with the threads of `resources`.

    `recipes` are the table's entries, not names: a Ray task builds whatever the driver resolved,
    whether or not the module that registered it was imported in the task's process.

    Checkpoints and logits are read from local files: the driver's copies when this node can see
    them (the driver hashed them), else downloaded here from `tracking_uri` and hashed (a Ray
    task on another node). Progress lines (``greedy soup: ...``, and one per phase with
    its forward passes, bytes read and time) go to `log`.
    """
    with tempfile.TemporaryDirectory(prefix="soup-build-") as tmp, _threads(resources.threads):
        meter = Meter(log)
        with meter.phase("fetch"):
            paths, logits, hashed = fetch_checkpoints(checkpoints, tracking_uri, Path(tmp))
            meter.add_bytes(hashed)  # downloads hashed here (none where the driver's copies are seen)
        return _build(validate(FinetuneConfig, base_cfg), checkpoints, paths, logits, recipes,
                      options, meter, resources)


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op threads set to the task's CPUs for the block, then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Build:
    """What every step of one build shares: the model on its device, the meter, the log."""

    model: torch.nn.Module
    accel: Accel
    meter: Meter
    log: Callable[[str], None]


def _build(cfg: FinetuneConfig, checkpoints, paths, logit_paths, recipes, options: RecipeOptions,
           meter: Meter, resources: BuildResources) -> Built:
    accel = resources.accel()
    task = data.load_task(cfg.data)
    evaluated = resident(task)  # every soup is scored on the same splits: read them once when they fit
    model = accel.prepare(models.build_classifier(cfg.model, task.classnames))
    base = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    ctx = _Build(model, accel, meter, meter.log)
    meter.watch(model)
    with meter.phase("zero-shot"):
        rows = [summary_row("zero-shot", "baseline", _accs(model, evaluated, accel), task.shifts)]
    scores = [c.heldout_acc for c in checkpoints]
    with meter.phase("baselines"):
        singles, ensembles, excluded = _ensemble_rows(ctx, paths, logit_paths, checkpoints, task, scores)
    use = [i for i in range(len(checkpoints)) if i not in excluded]
    singles = [singles[i] for i in use]
    best = max(range(len(singles)), key=lambda i: singles[i]["heldout"])
    rows += [{**singles[best], "name": "best individual", "kind": "baseline"}] + ensembles
    used = [checkpoints[i].run_id for i in use]
    labels = [f"{checkpoints[i].name} ({checkpoints[i].run_id[:8]})" if checkpoints[i].name != checkpoints[i].run_id
              else checkpoints[i].run_id for i in use]  # progress lines and errors name the trial
    inputs = RecipeInputs([paths[i] for i in use], labels, [scores[i] for i in use], model,
                          evaluated.heldout, options, meter.log, base=base,
                          finish_order=[checkpoints[i].finished for i in use])
    soups = {}
    for recipe in recipes:
        with meter.phase(recipe.name):
            soup = recipe.build(inputs)
        with meter.phase(f"{recipe.name} evaluation", quiet=True):
            model.load_state_dict(soup.state_dict)
            rows.append(summary_row(f"{recipe.name} soup", "soup", _accs(model, evaluated, accel), task.shifts))
        soups[recipe.name] = soup
    where = {"device": str(accel.device), "precision": accel.precision,
             "threads": torch.get_num_threads(), "input_devices": sorted(meter.devices)}
    return Built(rows, singles, soups, list(task.classnames), task.test.tensors(1)[0][0], used,
                 {checkpoints[i].run_id: why for i, why in excluded.items()}, _merged(meter), where,
                 {k: fingerprint(v) for k, v in {"heldout": task.heldout, **task.reporting()}.items()})


def _merged(meter: Meter) -> list[dict]:
    """The phases in order, every soup's final evaluation summed into one `evaluation` row."""
    out, evaluation = [], {"name": "evaluation", "passes": 0, "bytes": 0, "seconds": 0.0}
    for p in meter.totals():
        if p["name"].endswith(" evaluation"):
            for k in ("passes", "bytes", "seconds"):
                evaluation[k] += p[k]
        else:
            out.append(p)
    return out + [evaluation] if evaluation["passes"] else out


def build_with_progress(base_cfg, checkpoints, recipes, options, tracking_uri,
                        resources: BuildResources = BuildResources()) -> Iterator[tuple[str, object]]:
    """The build as a generator (for a streaming Ray task): yields ``("log", line)`` as it
    progresses, then ``("result", Built)``; an error in the build is raised here."""
    yield from with_progress(build_and_evaluate, base_cfg, checkpoints, recipes, options, tracking_uri,
                             resources=resources)


def with_progress(fn: Callable, *args, **kwargs) -> Iterator[tuple[str, object]]:
    """``fn(*args, log=..., **kwargs)`` as a generator (for a streaming Ray task): yields
    ``("log", line)`` for each line it logs, as it logs it, then ``("result", value)``; an error
    in `fn` is raised here."""
    lines: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["value"] = fn(*args, log=lines.put, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the caller's thread
            outcome["error"] = err
        lines.put(None)

    threading.Thread(target=work, daemon=True, name=f"soup-{getattr(fn, '__name__', 'task')}").start()
    while (line := lines.get()) is not None:
        yield "log", line
    if "error" in outcome:
        raise outcome["error"]
    yield "result", outcome["value"]
