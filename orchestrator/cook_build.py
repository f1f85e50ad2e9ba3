"""The cook's compute, the half that runs in a Ray task: fetch the checked checkpoints, build
every recipe's soup, and evaluate the soups beside the baselines.

It knows nothing of MLflow runs or the registry beyond downloading a checkpoint by run id (the
task may run on a node that does not have the driver's copies); the driver (`cook`) decides what
to build, checks the ingredients first, and logs and registers what comes back.
"""

from __future__ import annotations

import queue
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import data, evaluate, models
from .config import FinetuneConfig, SearchSpace, validate
from .hashing import file_sha256
from .soups.ensemble import GreedyEnsemble
from .soups.greedy import rank_best_first
from .soups.recipe import Recipe, RecipeInputs, RecipeOptions, SoupResult
from .soups.stream import read_weights
from .splits import TaskData
from .tracking import CHECKPOINT_PATH, Tracker


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


def reference_state(space: SearchSpace) -> dict[str, torch.Tensor]:
    """The classifier the sweep fine-tuned, untrained: the keys and shapes ingredients must have."""
    classnames = data.load_task(space.base.data).classnames
    return models.build_classifier(space.base.model, classnames, pretrained_weights=False).state_dict()


def fetch_checkpoints(checkpoints: list[TrialCheckpoint], tracking_uri: str | None, tmp: Path,
                      verify: bool = True) -> list[Path]:
    """Local checkpoint paths for the build, wherever it runs: the driver's copy when this node
    has it, else a fresh download; either way its sha256 must be the one checked (`verify`
    False trusts the driver's copies: for the driver's own process, which just hashed them)."""
    tracker, paths = None, []
    for ckpt in checkpoints:
        path = Path(ckpt.path)
        if not (path.is_file() and (not verify or file_sha256(path) == ckpt.sha256)):
            tracker = tracker or Tracker(tracking_uri)
            path = tracker.download(ckpt.run_id, CHECKPOINT_PATH, tmp / ckpt.run_id)
            if file_sha256(path) != ckpt.sha256:
                raise CookError(f"run {ckpt.run_id}: checkpoint changed since it was checked "
                                f"(sha256 differs from {ckpt.sha256[:12]})")
        paths.append(path)
    return paths


# --- evaluation ---------------------------------------------------------------------------------

def _accs(model, task: TaskData) -> dict[str, float]:
    res = evaluate.evaluate_all(model, {"heldout": task.heldout, **task.reporting()})
    return {k: v[0] for k, v in res.items()}


def summary_row(name: str, kind: str, accs: dict[str, float], shifts) -> dict:
    """A table row: name, kind (soup, baseline, ingredient), accuracy per split, shift mean."""
    return {"name": name, "kind": kind, **accs, "shift_mean": evaluate.shift_mean(accs, shifts)}


def _measured_mismatch(logged: float, measured: float, n: int) -> str | None:
    """Why an ingredient's logged held-out accuracy cannot be trusted, or None: the cook measures
    it again, and a difference of more than one example's worth (1/n) is not rounding or a
    different device's arithmetic, it is a wrong or replaced figure or checkpoint."""
    if abs(logged - measured) * n <= 1 + 1e-6:
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


def _ensemble_rows(model, paths, checkpoints, task, scores, log):
    """Every ingredient scored alone, and the two logit ensembles, one checkpoint at a time;
    returns (rows of the ingredients, ensemble rows, {index: why excluded}).

    Ingredients are taken best first, so the greedy ensemble decides on each as it comes; only
    running logit sums are kept (all, and the greedy ensemble's), never every model's logits. An
    ingredient whose measured held-out accuracy contradicts its logged one is excluded here,
    before it is offered to any ensemble or recipe, and so is a checkpoint byte-identical to one
    already taken (two runs holding the same file would weigh double): the better-ranked copy
    whose figure holds is cooked, once.
    """
    splits = {"heldout": task.heldout, **task.reporting()}
    singles: list[dict | None] = [None] * len(paths)
    excluded: dict[int, str] = {}
    taken: dict[str, int] = {}  # sha256 -> the ingredient cooked for those bytes
    total: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    greedy = GreedyEnsemble(task.heldout.labels)
    for i in rank_best_first(scores, len(paths)):
        model.load_state_dict(read_weights(paths[i]))
        held = evaluate.logits(model, task.heldout).float()
        why = _why_excluded(checkpoints, i, held, task.heldout.labels, taken)
        if why:
            excluded[i] = why
            log(f"excluded run {checkpoints[i].run_id} ({checkpoints[i].name}): {why}")
            continue
        taken[checkpoints[i].sha256] = i
        per = {k: held if k == "heldout" else evaluate.logits(model, s).float() for k, s in splits.items()}
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
                       log: Callable[[str], None] = print, verify: bool = True) -> Built:
    """Build every recipe's soup and every baseline, and evaluate them all.

    `recipes` are the table's entries, not names: a Ray task builds whatever the driver resolved,
    whether or not the module that registered it was imported in the task's process.

    Checkpoints are streamed from local files: the driver's copies when this process can see
    them (checked again unless `verify` is False), else downloaded here from `tracking_uri` (a
    Ray task on another node). Progress lines (``greedy soup: ...``) go to `log`.
    """
    with tempfile.TemporaryDirectory(prefix="soup-build-") as tmp:
        paths = fetch_checkpoints(checkpoints, tracking_uri, Path(tmp), verify)
        return _build(validate(FinetuneConfig, base_cfg), checkpoints, paths, recipes, options, log)


def _build(cfg: FinetuneConfig, checkpoints, paths, recipes, options: RecipeOptions, log) -> Built:
    task = data.load_task(cfg.data)
    model = models.build_classifier(cfg.model, task.classnames)
    rows = [summary_row("zero-shot", "baseline", _accs(model, task), task.shifts)]
    scores = [c.heldout_acc for c in checkpoints]
    singles, ensembles, excluded = _ensemble_rows(model, paths, checkpoints, task, scores, log)
    use = [i for i in range(len(checkpoints)) if i not in excluded]
    singles = [singles[i] for i in use]
    best = max(range(len(singles)), key=lambda i: singles[i]["heldout"])
    rows += [{**singles[best], "name": "best individual", "kind": "baseline"}] + ensembles
    used = [checkpoints[i].run_id for i in use]
    inputs = RecipeInputs([paths[i] for i in use], used, [scores[i] for i in use], model,
                          task.heldout, options, log)
    soups = {}
    for recipe in recipes:
        soup = recipe.build(inputs)
        model.load_state_dict(soup.state_dict)
        rows.append(summary_row(f"{recipe.name} soup", "soup", _accs(model, task), task.shifts))
        soups[recipe.name] = soup
    return Built(rows, singles, soups, list(task.classnames), task.test.tensors(1)[0][0], used,
                 {checkpoints[i].run_id: why for i, why in excluded.items()})


def build_with_progress(base_cfg, checkpoints, recipes, options, tracking_uri
                        ) -> Iterator[tuple[str, object]]:
    """The build as a generator (for a streaming Ray task): yields ``("log", line)`` as it
    progresses, then ``("result", Built)``; an error in the build is raised here."""
    lines: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["built"] = build_and_evaluate(base_cfg, checkpoints, recipes, options,
                                                  tracking_uri, log=lines.put)
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the caller's thread
            outcome["error"] = err
        lines.put(None)

    threading.Thread(target=work, daemon=True, name="soup-build").start()
    while (line := lines.get()) is not None:
        yield "log", line
    if "error" in outcome:
        raise outcome["error"]
    yield "result", outcome["built"]
