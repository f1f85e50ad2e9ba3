"""The post-sweep job: rank the sweep's runs in MLflow, build soups, evaluate, log and register.

`cook` is the library function behind ``soup cook --sweep ID``. The soups are built and evaluated
in a Ray task (so a cluster's GPU is used when the sweep asked for one); MLflow logging stays in
the driver. Cooking the same sweep again with the same recipe and ingredients adds nothing.

Ingredients are files, never held all at once: the driver checks each checkpoint in one
streaming pass (sha256 of its bytes, NaN/Inf scan) and from its header (keys, shapes, dtypes);
the build task fetches the checkpoints itself by run id (it may run on another node) and checks
their sha256 again; the recipes stream them.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import data, evaluate, models
from .config import ConfigError, SearchSpace, validate
from .soups.greedy import model_counter
from .soups.stream import read_weights, scan_file
from .soups.weights import check_compatible, save_weights
from .tracking import (CHECKPOINT_PATH, FINISHED, Tracker, find_soup, find_version, locate_sweep,
                       log_soup_model, read_artifact_text, register_soup, stale_soups)

DEFAULT_RECIPES = ("uniform", "greedy", "learned")
# Held-out images the learned soup fits its coefficients on, read into memory (ImageNet's 2%
# slice is 25k images; the first 4096 of its seeded permutation are plenty for N coefficients).
LEARNED_HELDOUT_LIMIT = 4096


class CookError(ValueError):
    """The sweep cannot be cooked (unknown, or nothing usable); the message says why."""


@dataclass
class Ingredient:
    """A checked checkpoint: where the driver has it, and the sha256 any copy must have."""

    run_id: str
    name: str
    heldout_acc: float
    path: Path
    sha256: str


@dataclass(frozen=True)
class RecipeOptions:
    """How the recipes run: the greedy rule (`strict`: accuracy must rise, as the reference code),
    and how the learned soup gets its gradients (`learned_mode`: ``streaming`` holds two model
    sizes whatever the number of ingredients; ``stacked`` holds them all in bf16 on the device)."""

    strict: bool = False
    learned_mode: str = "streaming"


@dataclass
class CookOutcome:
    """What the cook produced: one table row per soup and baseline, and where things are."""

    sweep_id: str
    rows: list[dict]
    excluded: dict[str, str]
    versions: dict[str, str]
    soup_runs: dict[str, str]
    plot_png: bytes = b""  # also logged to MLflow (cook/soups.png on the sweep run)
    reused: list[str] = field(default_factory=list)


# --- ingredients ------------------------------------------------------------------------------

def reference_state(space: SearchSpace) -> dict[str, torch.Tensor]:
    """The classifier the sweep fine-tuned, untrained: the keys and shapes ingredients must have."""
    classnames = data.load_task(space.base.data).classnames
    return models.build_classifier(space.base.model, classnames, load_weights=False).state_dict()


def load_ingredients(tracker: Tracker, runs, parent_tags: dict, reference: dict, tmp: Path,
                     log: Callable[[str], None]) -> tuple[list[Ingredient], dict[str, str]]:
    """Download and check every finished trial; exclude (and name) any run that fails a check.

    One checkpoint at a time, streamed: memory does not grow with the number of runs.
    """
    good: list[Ingredient] = []
    excluded: dict[str, str] = {}
    for run in runs:
        rid, tags = run.info.run_id, run.data.tags
        path, reason = _check_run(tracker, rid, tags, parent_tags, reference, tmp)
        if reason:
            excluded[rid] = reason
            log(f"excluded run {rid} ({tags.get('mlflow.runName', '')}): {reason}")
            continue
        good.append(Ingredient(rid, tags.get("mlflow.runName", rid), run.data.metrics["heldout_acc"],
                               path, tags["checkpoint_sha256"]))
    return good, excluded


def _check_run(tracker, rid: str, tags: dict, parent_tags: dict, reference: dict, tmp: Path):
    """(local checkpoint path, None) for a usable run, else (None, why not)."""
    for tag in ("arch_sha256", "pretrained_sha256"):
        if tags.get(tag) != parent_tags.get(tag):
            return None, f"{tag} {tags.get(tag, 'missing')[:12]} differs from the sweep's base"
    try:
        path = tracker.download(rid, CHECKPOINT_PATH, tmp / rid)
    except Exception as err:  # noqa: BLE001 - any failure to fetch excludes the run
        return None, f"checkpoint artifact missing ({type(err).__name__})"
    try:  # the header first: a wrong architecture is refused without reading the weights
        reason = _incompatible(reference, path, rid)
        if reason is None:
            scan = scan_file(path)
            reason = ("checkpoint sha256 does not match its tag"
                      if scan.sha256 != tags.get("checkpoint_sha256") else scan.nonfinite)
    except (ValueError, OSError) as err:  # a corrupt header or a truncated file
        reason = f"unreadable checkpoint: {err}"
    return (None, reason) if reason else (path, None)


def _incompatible(reference: dict, path: Path, run_id: str) -> str | None:
    try:
        check_compatible([reference, path], ["the sweep's base classifier", run_id])
    except ValueError as err:
        return str(err)
    return None


def fetch_ingredients(ingredients: list[Ingredient], tracking_uri: str | None, tmp: Path,
                      verify: bool = True) -> list[Path]:
    """Local checkpoint paths for the build, wherever it runs: the driver's copy when this node
    has it, else a fresh download; either way its sha256 must be the one checked (`verify`
    False trusts the driver's copies: for the driver's own process, which just hashed them)."""
    from .tracking import Tracker

    tracker, paths = None, []
    for ing in ingredients:
        path = Path(ing.path)
        if not (path.is_file() and (not verify or models.file_sha256(path) == ing.sha256)):
            tracker = tracker or Tracker(tracking_uri)
            path = tracker.download(ing.run_id, CHECKPOINT_PATH, tmp / ing.run_id)
            if models.file_sha256(path) != ing.sha256:
                raise CookError(f"run {ing.run_id}: checkpoint changed since it was checked "
                                f"(sha256 differs from {ing.sha256[:12]})")
        paths.append(path)
    return paths


# --- the compute (runs in a Ray task) ---------------------------------------------------------

def _accs(model, task: data.TaskData) -> dict[str, float]:
    res = evaluate.evaluate_all(model, {"heldout": task.heldout, **task.reporting()})
    return {k: v[0] for k, v in res.items()}


def _summary(name: str, kind: str, accs: dict[str, float], shifts) -> dict:
    mean = sum(accs[s] for s in shifts) / len(shifts) if shifts else float("nan")
    return {"name": name, "kind": kind, **accs, "shift_mean": mean}


def _ensemble_rows(model, paths, ingredients, task, scores) -> tuple[list[dict], list[dict]]:
    """Every ingredient scored alone, and the two logit ensembles, one checkpoint at a time.

    Ingredients are taken best first, so the greedy ensemble decides on each as it comes; only
    running logit sums are kept (all, and the greedy ensemble's), never every model's logits.
    """
    from .soups.ensemble import GreedyEnsemble
    from .soups.greedy import rank_best_first

    splits = {"heldout": task.heldout, **task.reporting()}
    singles: list[dict | None] = [None] * len(paths)
    total: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    greedy = GreedyEnsemble(task.heldout.labels)
    for i in rank_best_first(scores, len(paths)):
        model.load_state_dict(read_weights(paths[i]))
        per = {k: evaluate.logits(model, s).float() for k, s in splits.items()}
        singles[i] = _summary(ingredients[i].name, "ingredient",
                              {k: evaluate.accuracy_of(per[k], s.labels) for k, s in splits.items()},
                              task.shifts)
        for sums in (total, kept) if greedy.offer(i, per["heldout"]) else (total,):
            for k, lg in per.items():
                sums[k] = lg if k not in sums else sums[k] + lg
    rows = [_summary(name, "baseline", {k: evaluate.accuracy_of(sums[k], s.labels) for k, s in splits.items()},
                     task.shifts) for name, sums in (("ensemble", total), ("greedy ensemble", kept))]
    return singles, rows


def build_and_evaluate(base_cfg: dict, ingredients: list[Ingredient], recipes, opts: RecipeOptions,
                       tracking_uri: str | None = None, log: Callable[[str], None] = print,
                       verify: bool = True) -> dict:
    """Build every recipe's soup and every baseline, and evaluate them all.

    Checkpoints are streamed from local files: the driver's copies when this process can see
    them (checked again unless `verify` is False), else downloaded here from `tracking_uri` (a
    Ray task on another node). Progress lines (``greedy soup: ...``) go to `log`.
    """
    with tempfile.TemporaryDirectory(prefix="soup-build-") as tmp:
        paths = fetch_ingredients(ingredients, tracking_uri, Path(tmp), verify)
        return _build(base_cfg, ingredients, paths, recipes, opts, log)


def _build(base_cfg, ingredients, paths, recipes, opts: RecipeOptions, log) -> dict:
    from .config import FinetuneConfig
    from .soups.registry import get_recipe

    cfg = validate(FinetuneConfig, base_cfg)
    task = data.load_task(cfg.data)
    model = models.build_classifier(cfg.model, task.classnames)
    rows = [_summary("zero-shot", "baseline", _accs(model, task), task.shifts)]
    names = [i.run_id for i in ingredients]
    scores = [i.heldout_acc for i in ingredients]
    singles, ens = _ensemble_rows(model, paths, ingredients, task, scores)
    best = max(range(len(singles)), key=lambda i: singles[i]["heldout"])
    rows += [{**singles[best], "name": "best individual", "kind": "baseline"}] + ens
    soups = {}
    for recipe in recipes:
        res = _run_recipe(get_recipe(recipe), recipe, paths, names, scores, model, task, opts, log)
        model.load_state_dict(res.state_dict)
        rows.append(_summary(f"{recipe} soup", "soup", _accs(model, task), task.shifts))
        soups[recipe] = res
    return {"rows": rows, "singles": singles, "soups": soups, "classnames": list(task.classnames),
            "example": task.test.tensors(1)[0][0]}


def _run_recipe(fn, recipe, paths, names, scores, model, task, opts: RecipeOptions, log):
    if recipe == "uniform":
        return fn(paths, names=names)
    if recipe == "greedy":
        # Integer correct counts, chunk by chunk: a candidate is dropped as soon as it cannot
        # reach the soup, with the same decisions as scoring every held-out example.
        return fn(paths, model_counter(model, task.heldout), scores, strict=opts.strict, names=names,
                  log=log)
    images, labels = task.heldout.tensors(limit=LEARNED_HELDOUT_LIMIT)
    return fn(paths, model, images, labels, names=names, log=log, mode=opts.learned_mode)


def _flushed(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log`, then stdout flushed: progress must show (and be seen by a watcher) as it happens."""
    def emit(line: str) -> None:
        log(line)
        sys.stdout.flush()
    return emit


def _build_streaming(base_cfg, ingredients, recipes, opts, tracking_uri):
    """Ray generator task: yields ``("log", line)`` as the build progresses, then
    ``("result", built)``; the driver relays the lines to the cook's own `log`."""
    lines: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["built"] = build_and_evaluate(base_cfg, ingredients, recipes, opts, tracking_uri,
                                                  log=lambda s: lines.put(s))
        except BaseException as err:  # noqa: BLE001 - re-raised in the task, so Ray reports it
            outcome["error"] = err
        lines.put(None)

    threading.Thread(target=work, daemon=True, name="soup-build").start()
    while (line := lines.get()) is not None:
        yield "log", line
    if "error" in outcome:
        raise outcome["error"]
    yield "result", outcome["built"]


# --- the driver -------------------------------------------------------------------------------

def soup_key(recipe: str, run_ids: list[str], strict: bool, learned_mode: str = "streaming") -> str:
    """Identity of a soup: recipe, rule and the ordered ingredients (idempotent registration)."""
    key = [recipe, strict if recipe == "greedy" else None, run_ids]
    if recipe == "learned" and learned_mode != "streaming":  # the default keeps its older keys
        key.append(learned_mode)
    text = json.dumps(key)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _remote_build(base_cfg, ingredients, recipes, opts, gpus: float, tracking_uri: str,
                  log: Callable[[str], None]):
    import ray

    from .sweep import init_ray

    init_ray(lambda s: None)
    task = ray.remote(num_cpus=1, num_gpus=gpus, num_returns="streaming")(_build_streaming)
    for ref in task.remote(base_cfg, ingredients, recipes, opts, tracking_uri):
        kind, value = ray.get(ref)
        if kind == "log":
            log(value)
        else:
            return value
    raise RuntimeError("the soup build task ended without a result")


def _build_soups(base, ingredients, recipes, opts, gpus: float | None, uri: str, progress):
    """The build, in a Ray task (`gpus` given) or in this process (which just checked the files)."""
    if gpus is None:
        return build_and_evaluate(base, ingredients, recipes, opts, uri, progress, verify=False)
    return _remote_build(base, ingredients, recipes, opts, gpus, uri, progress)


def cook(sweep_id: str, recipes=DEFAULT_RECIPES, model_name: str | None = None,
         tracking_uri: str | None = None, strict: bool = False, use_ray: bool = True,
         log: Callable[[str], None] = print, learned_mode: str | None = None) -> CookOutcome:
    """Cook sweep `sweep_id`: soups and baselines evaluated, logged under the sweep, registered.

    `learned_mode` overrides the space's ``cook.learned_mode`` (``streaming`` or ``stacked``)."""
    tracker = Tracker(tracking_uri)
    exp_id, parent = locate_sweep(tracker, sweep_id)
    if parent is None:
        raise CookError(f"no sweep {sweep_id!r} in {tracker.uri}")
    space = validate(SearchSpace, yaml.safe_load(read_artifact_text(
        tracker, parent.info.run_id, "space/resolved_config.yaml")), f"sweep {sweep_id} config")
    runs = tracker.trial_runs(exp_id, sweep_id, FINISHED)
    if not runs:
        raise CookError(f"sweep {sweep_id!r} has no FINISHED trial runs to cook")
    model_name = model_name or space.tracking.registered_model or f"{space.tracking.experiment_name}-soup"
    with tempfile.TemporaryDirectory() as tmp:
        ingredients, excluded = load_ingredients(tracker, runs, parent.data.tags,
                                                 reference_state(space), Path(tmp), log)
        if not ingredients:
            raise CookError(f"sweep {sweep_id!r}: every run was excluded: {excluded}")
        log(f"cooking {len(ingredients)} ingredients of sweep {sweep_id} "
            f"(best held-out {ingredients[0].heldout_acc:.1%}): {', '.join(recipes)}")
        base = space.base.model_dump(mode="json")
        gpus = min(space.sweep.resources.gpu, 1.0) if use_ray else None
        opts = RecipeOptions(strict, learned_mode or space.cook.learned_mode)
        built = _build_soups(base, ingredients, recipes, opts, gpus, tracker.uri, _flushed(log))
        return _log_all(tracker, exp_id, parent, sweep_id, space, ingredients, excluded, built,
                        model_name, opts, Path(tmp), log)


def _log_all(tracker, exp_id, parent, sweep_id, space, ingredients, excluded, built, model_name,
             opts: RecipeOptions, tmp: Path, log) -> CookOutcome:
    from .plots import soup_figure
    from .serving import encode_image

    out = CookOutcome(sweep_id, built["rows"], excluded, {}, {})
    plot = soup_figure(built["rows"], built["singles"], built["soups"].get("greedy"), tmp / "soups.png")
    out.plot_png = plot.read_bytes()
    by_name = {r["name"]: r for r in built["rows"]}
    ids = [i.run_id for i in ingredients]
    for recipe, res in built["soups"].items():
        key = soup_key(recipe, ids, opts.strict, opts.learned_mode)
        existing = find_soup(tracker, exp_id, key)
        version = find_version(tracker, model_name, key)
        if existing is not None and version is not None:
            log(f"{recipe} soup: already cooked as run {existing.info.run_id}, version {version.version}")
            out.soup_runs[recipe], out.versions[recipe] = existing.info.run_id, version.version
            out.reused.append(recipe)
            continue
        row = by_name[f"{recipe} soup"]
        if existing is None:  # a cook killed mid-logging left a half-logged run: replace it
            tracker.discard_stale(stale_soups(tracker, exp_id, key))
        save_weights(res.state_dict, tmp / f"{recipe}.safetensors", {"recipe": recipe})
        rid = existing.info.run_id if existing else _log_soup_run(
            tracker, exp_id, parent.info.run_id, sweep_id, recipe, key, res, ids, row, plot, tmp)
        config = {"model": space.base.model.model_dump(mode="json"), "classnames": built["classnames"],
                  "image_size": int(models.arch_config(space.base.model.arch)["vision_cfg"]["image_size"])}
        info = log_soup_model(tracker, rid, tmp / f"{recipe}.safetensors", config,
                              encode_image(built["example"]))
        tags = {"recipe": recipe, "sweep_id": sweep_id, "soup_key": key, "soup_run_id": rid,
                **({"learned_mode": opts.learned_mode} if recipe == "learned" else {}),
                "ingredients": ",".join(ids[i] for i in res.kept),
                **{f"{k}_acc": f"{v:.4f}" for k, v in row.items() if isinstance(v, float)}}
        mv = register_soup(tracker, info.model_uri, model_name, tags)
        out.soup_runs[recipe], out.versions[recipe] = rid, mv.version
        log(f"{recipe} soup: run {rid}, registered {model_name} version {mv.version}")
    tracker.log_text(parent.info.run_id, _markdown(built["rows"]), "cook/comparison.md")
    tracker.log_artifact(parent.info.run_id, plot, "cook")
    return out


def _log_soup_run(tracker, exp_id, parent_id, sweep_id, recipe, key, res, ids, row, plot, tmp) -> str:
    rid = tracker.create_run(exp_id, f"{recipe}-soup", {
        "soup.role": "soup", "sweep_id": sweep_id, "recipe": recipe, "soup_key": key,
        "ingredients": ",".join(ids), "kept_ingredients": ",".join(ids[i] for i in res.kept)},
        parent_run_id=parent_id)
    tracker.log_params(rid, {"recipe": recipe, "n_ingredients": len(ids), "n_kept": len(res.kept)})
    tracker.log_metrics(rid, {f"{k}_acc": v for k, v in row.items()
                              if isinstance(v, float) and not math.isnan(v)})
    for n, step in enumerate(res.steps, start=1):  # the greedy path: accuracy per ingredient tried
        if "heldout_acc" in step:
            tracker.log_metrics(rid, {"soup_heldout_acc": step["heldout_acc"]}, step=n)
    tracker.log_artifact(rid, tmp / f"{recipe}.safetensors", "soup")
    tracker.log_text(rid, json.dumps({"ingredients": ids, "coefficients": res.coefficients}, indent=1),
                     "soup/coefficients.json")
    tracker.log_artifact(rid, plot, "plots")
    tracker.end_run(rid, FINISHED)
    return rid


def _markdown(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c != "kind"]
    fmt = lambda v: f"{v:.1%}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


__all__ = ["cook", "CookOutcome", "CookError", "soup_key", "ConfigError"]
