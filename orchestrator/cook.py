"""The post-sweep job: rank the sweep's runs in MLflow, build soups, evaluate, log and register.

`cook` is the library function behind ``soup cook --sweep ID``. The soups are built and evaluated
in a Ray task (so a cluster's GPU is used when the sweep asked for one); MLflow I/O stays in the
driver. Cooking the same sweep again with the same recipe and ingredients adds nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import data, evaluate, models
from .config import ConfigError, SearchSpace, validate
from .soups.weights import check_compatible, load_weights, save_weights, weighted_average
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
    run_id: str
    name: str
    heldout_acc: float
    state: dict[str, torch.Tensor]


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

def _bad_weights(state: dict[str, torch.Tensor]) -> str | None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            return f"tensor {k!r} has NaN or Inf values"
    return None


def reference_state(space: SearchSpace) -> dict[str, torch.Tensor]:
    """The classifier the sweep fine-tuned, untrained: the keys and shapes ingredients must have."""
    classnames = data.load_task(space.base.data).classnames
    return models.build_classifier(space.base.model, classnames, load_weights=False).state_dict()


def load_ingredients(tracker: Tracker, runs, parent_tags: dict, reference: dict, tmp: Path,
                     log: Callable[[str], None]) -> tuple[list[Ingredient], dict[str, str]]:
    """Download and check every finished trial; exclude (and name) any run that fails a check."""
    good: list[Ingredient] = []
    excluded: dict[str, str] = {}
    for run in runs:
        rid, tags = run.info.run_id, run.data.tags
        reason = None
        for tag in ("arch_sha256", "pretrained_sha256"):
            if tags.get(tag) != parent_tags.get(tag):
                reason = f"{tag} {tags.get(tag, 'missing')[:12]} differs from the sweep's base"
        if reason is None:
            try:
                path = tracker.download(rid, CHECKPOINT_PATH, tmp / rid)
            except Exception as err:  # noqa: BLE001 - any failure to fetch excludes the run
                reason = f"checkpoint artifact missing ({type(err).__name__})"
            else:
                if models.file_sha256(path) != tags.get("checkpoint_sha256"):
                    reason = "checkpoint sha256 does not match its tag"
                else:
                    state = load_weights(path)
                    reason = _bad_weights(state) or _incompatible(reference, state, rid)
        if reason:
            excluded[rid] = reason
            log(f"excluded run {rid} ({tags.get('mlflow.runName', '')}): {reason}")
            continue
        good.append(Ingredient(rid, tags.get("mlflow.runName", rid), run.data.metrics["heldout_acc"], state))
    return good, excluded


def _incompatible(reference: dict, state, run_id: str) -> str | None:
    try:
        check_compatible([reference, state], ["the sweep's base classifier", run_id])
    except ValueError as err:
        return str(err)
    return None


# --- the compute (runs in a Ray task) ---------------------------------------------------------

def _accs(model, task: data.TaskData) -> dict[str, float]:
    res = evaluate.evaluate_all(model, {"heldout": task.heldout, **task.reporting()})
    return {k: v[0] for k, v in res.items()}


def _summary(name: str, kind: str, accs: dict[str, float], shifts) -> dict:
    mean = sum(accs[s] for s in shifts) / len(shifts) if shifts else float("nan")
    return {"name": name, "kind": kind, **accs, "shift_mean": mean}


def _ensemble_rows(model, ingredients, task, scores) -> tuple[list[dict], list[dict]]:
    from .soups.ensemble import greedy_ensemble

    splits = {"heldout": task.heldout, **task.reporting()}
    per = []
    for ing in ingredients:
        model.load_state_dict(ing.state)
        per.append({k: evaluate.logits(model, s) for k, s in splits.items()})
    singles = [_summary(ing.name, "ingredient", {k: evaluate.accuracy_of(p[k], s.labels)
                                                  for k, s in splits.items()}, task.shifts)
               for ing, p in zip(ingredients, per)]
    kept = greedy_ensemble([p["heldout"] for p in per], task.heldout.labels, scores)[0]
    rows = []
    for name, idx in (("ensemble", range(len(per))), ("greedy ensemble", kept)):
        accs = {k: evaluate.accuracy_of(torch.stack([per[i][k] for i in idx]).mean(0), s.labels)
                for k, s in splits.items()}
        rows.append(_summary(name, "baseline", accs, task.shifts))
    return singles, rows


def build_and_evaluate(base_cfg: dict, ingredients: list[Ingredient], recipes, strict: bool) -> dict:
    """Build every recipe's soup and every baseline, and evaluate them all."""
    from .config import FinetuneConfig
    from .soups.registry import get_recipe

    cfg = validate(FinetuneConfig, base_cfg)
    task = data.load_task(cfg.data)
    model = models.build_classifier(cfg.model, task.classnames)
    rows = [_summary("zero-shot", "baseline", _accs(model, task), task.shifts)]
    states = [i.state for i in ingredients]
    names = [i.run_id for i in ingredients]
    scores = [i.heldout_acc for i in ingredients]
    singles, ens = _ensemble_rows(model, ingredients, task, scores)
    best = max(range(len(singles)), key=lambda i: singles[i]["heldout"])
    rows += [{**singles[best], "name": "best individual", "kind": "baseline"}] + ens
    soups = {}
    for recipe in recipes:
        res = _run_recipe(get_recipe(recipe), recipe, states, names, scores, model, task, strict)
        model.load_state_dict(res.state_dict)
        rows.append(_summary(f"{recipe} soup", "soup", _accs(model, task), task.shifts))
        soups[recipe] = res
    return {"rows": rows, "singles": singles, "soups": soups, "classnames": list(task.classnames),
            "example": task.test.tensors(1)[0][0]}


def _progress(line: str) -> None:
    print(line, flush=True)  # long work shows progress (a Ray task's output reaches the driver)


def _run_recipe(fn, recipe, states, names, scores, model, task, strict):
    if recipe == "uniform":
        return fn(states, names=names)
    if recipe == "greedy":
        def heldout_acc(state):
            model.load_state_dict(state)
            return evaluate.accuracy(model, task.heldout)
        return fn(states, heldout_acc, scores, strict=strict, names=names, log=_progress)
    images, labels = task.heldout.tensors(limit=LEARNED_HELDOUT_LIMIT)
    return fn(states, model, images, labels, log=lambda s: None)


# --- the driver -------------------------------------------------------------------------------

def soup_key(recipe: str, run_ids: list[str], strict: bool) -> str:
    """Identity of a soup: recipe, rule and the ordered ingredients (idempotent registration)."""
    text = json.dumps([recipe, strict if recipe == "greedy" else None, run_ids])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _remote_build(base_cfg, ingredients, recipes, strict, gpus: float):
    import ray

    from .sweep import init_ray

    init_ray(lambda s: None)
    task = ray.remote(num_cpus=1, num_gpus=gpus)(build_and_evaluate)
    return ray.get(task.remote(base_cfg, ingredients, recipes, strict))


def cook(sweep_id: str, recipes=DEFAULT_RECIPES, model_name: str | None = None,
         tracking_uri: str | None = None, strict: bool = False, use_ray: bool = True,
         log: Callable[[str], None] = print) -> CookOutcome:
    """Cook sweep `sweep_id`: soups and baselines evaluated, logged under the sweep, registered."""
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
        gpus = space.sweep.resources.gpu if use_ray else 0
        built = (_remote_build(base, ingredients, recipes, strict, min(gpus, 1.0)) if use_ray
                 else build_and_evaluate(base, ingredients, recipes, strict))
        return _log_all(tracker, exp_id, parent, sweep_id, space, ingredients, excluded, built,
                        model_name, strict, Path(tmp), log)


def _log_all(tracker, exp_id, parent, sweep_id, space, ingredients, excluded, built, model_name,
             strict, tmp: Path, log) -> CookOutcome:
    from .plots import soup_figure
    from .serving import encode_image

    out = CookOutcome(sweep_id, built["rows"], excluded, {}, {})
    plot = soup_figure(built["rows"], built["singles"], built["soups"].get("greedy"), tmp / "soups.png")
    out.plot_png = plot.read_bytes()
    by_name = {r["name"]: r for r in built["rows"]}
    ids = [i.run_id for i in ingredients]
    for recipe, res in built["soups"].items():
        key = soup_key(recipe, ids, strict)
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


def check_weighted_sum(states, coefficients) -> dict[str, torch.Tensor]:
    """The weighted sum a soup's recorded coefficients stand for (used to verify soups)."""
    return weighted_average(states, coefficients)


__all__ = ["cook", "CookOutcome", "CookError", "soup_key", "ConfigError"]
