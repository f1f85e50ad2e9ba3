"""The post-sweep job's driver: rank the sweep's runs in MLflow, check them, have the soups built,
then log and register what comes back.

`cook` is the library function behind ``soup cook --sweep ID``. The compute (fetch, build,
evaluate: `build`) runs in a Ray task, so that a cluster's GPU is used when the sweep asked
for one; MLflow logging and registration stay here. Cooking the same sweep again with the same
recipe, settings and ingredients adds nothing.

Ingredients are files, never held all at once: the driver checks each checkpoint in one
streaming pass (sha256 of its bytes, NaN/Inf scan) and from its header (keys, shapes, dtypes);
the build task reads the driver's copies where its node sees them, else downloads its own by run
id and hashes those (each copy is hashed once); the recipes stream them.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from orchestrator.config import (
    ConfigError,
    CookResources,
    SearchSpace,
    parse_budget,
    validate,
)
from orchestrator.cook import locking
from orchestrator.cook.build import (
    BuildResources,
    Built,
    CookError,
    TrialCheckpoint,
    build_and_evaluate,
    build_with_progress,
    reference_state,
)
from orchestrator.cook.meter import phase_table
from orchestrator.cook.report import markdown_table, verdict
from orchestrator.hashing import file_sha256, json_sha256, text_sha256
from orchestrator.record.schema import (
    BASE_DIGESTS,
    CHECKPOINT_PATH,
    CHECKPOINT_SHA,
    CLASSES,
    CLASSES_SHA,
    COEFFICIENTS,
    COOK_COST,
    COOK_DIR,
    COOK_FIGURE,
    COOK_OWNER,
    COOK_TABLE,
    DATA_DIGESTS,
    END_REASON,
    FINISHED,
    HELDOUT_ACC,
    INGREDIENTS,
    KEPT_INGREDIENTS,
    KILLED,
    LOGITS_PATH,
    LOGITS_SHA,
    MAX_CLASSES_TAG,
    N_CLASSES,
    N_INGREDIENTS,
    N_KEPT,
    PARTIAL_SWEEP,
    PENDING,
    PLOTS_DIR,
    READY,
    RECIPE,
    RESOLVED_SPACE,
    ROLE,
    ROLE_SOUP,
    RUN_NAME,
    SHIFT_MEAN_ACC,
    SOUP_DIR,
    SOUP_HELDOUT_ACC,
    SOUP_KEY,
    SOUP_RUN_ID,
    STOP_REASON,
    SWEEP_ID,
    TEST_ACC,
    accuracy_metric,
    cook_record,
    soup_artifact,
    soup_run_name,
)
from orchestrator.record.soups import (
    find_soup,
    find_version,
    locate_sweep,
    log_soup_model,
    online_record,
    register_soup,
)
from orchestrator.record.tracking import Tracker, read_artifact_text
from orchestrator.runtime import connect, task
from orchestrator.soups.io.stream import scan_file
from orchestrator.soups.io.weights import check_compatible, save_weights
from orchestrator.soups.recipe import (
    RecipeOptions,
    SoupResult,
    default_recipes,
    get_recipe,
    option_defaults,
)
from orchestrator.train import models


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
    phases: list[dict] = field(default_factory=list)  # forward passes, bytes, seconds per phase
    where: dict = field(default_factory=dict)  # the build's device, precision, threads
    singles: list[dict] = field(default_factory=list)  # one row per ingredient cooked, kind "ingredient"
    parent_run_id: str = ""  # the sweep's run, where the cook logs its figure (and the CLI its log)
    tracking_uri: str = ""


@dataclass
class CookContext:
    """Where and how one cook logs: the store, the sweep's run, the ingredients, a scratch dir."""

    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    sweep_id: str
    space: SearchSpace
    run_ids: list[str]  # the ingredients, in the order they were given to the recipes
    model_name: str
    options: RecipeOptions
    tmp: Path
    partial: bool = False  # the sweep had not finished: its soups are tagged partial_sweep
    names: dict[str, str] = field(default_factory=dict)  # ingredient run id -> its run name
    record: str = ""  # `record_key` of this cook's inputs: where its record is kept
    classnames: list[str] = field(default_factory=list)  # the soups' classes, in output order
    digests: dict[str, str] = field(default_factory=dict)  # split -> digest of the data selected and measured on
    stopped: str = ""  # why the sweep's stopper ended it early (`schema.STOP_REASON`), if it did


@dataclass
class SoupRecord:
    """One built soup on its way to MLflow: its recipe, identity and table row."""

    recipe: str
    key: str
    settings: dict[str, Any]
    result: SoupResult
    row: dict

    def kept_ids(self, run_ids: Sequence[str]) -> str:
        """The run ids of the ingredients the recipe kept, comma-separated, in the order added."""
        return ",".join(run_ids[i] for i in self.result.kept)


# --- ingredients ------------------------------------------------------------------------------

def load_ingredients(tracker: Tracker, runs, parent_tags: dict, reference: dict, tmp: Path,
                     log: Callable[[str], None]) -> tuple[list[TrialCheckpoint], dict[str, str]]:
    """Download and check every finished trial; exclude (and name) any run that fails a check.

    One checkpoint at a time, streamed: memory does not grow with the number of runs. A progress
    line every `PROGRESS_EVERY_S` seconds and at the end.
    """
    good: list[TrialCheckpoint] = []
    excluded: dict[str, str] = {}
    start = shown = time.perf_counter()
    size, with_logits = 0.0, 0
    for k, run in enumerate(runs, start=1):
        rid, tags = run.info.run_id, run.data.tags
        path, reason = _check_run(tracker, rid, tags, parent_tags, reference, tmp)
        if reason:
            excluded[rid] = reason
            log(f"excluded run {rid} ({tags.get(RUN_NAME, '')}): {reason}")
        else:
            logits = _fetch_logits(tracker, rid, tags, tmp, log)
            size, with_logits = size + _mib(path, logits), with_logits + bool(logits)
            good.append(TrialCheckpoint(rid, tags.get(RUN_NAME, rid), run.data.metrics[HELDOUT_ACC],
                                        path, tags[CHECKPOINT_SHA], logits,
                                        tags.get(LOGITS_SHA) if logits else None))
        if k == len(runs) or time.perf_counter() - shown >= PROGRESS_EVERY_S:  # progress, not a list
            shown = time.perf_counter()
            log(f"fetch and check: {k}/{len(runs)} trials, {size:.1f} MiB ({with_logits} with logits), "
                f"{shown - start:.1f} s")
    return good, excluded


PROGRESS_EVERY_S = 10.0


def _mib(*paths: Path | None) -> float:
    return sum(Path(p).stat().st_size for p in paths if p) / 2**20


def _fetch_logits(tracker: Tracker, rid: str, tags: dict, tmp: Path, log) -> Path | None:
    """The run's logged logits, downloaded and checked against their sha256 tag; None (the build
    then scores the checkpoint again) when there are none or they cannot be trusted."""
    if not tags.get(LOGITS_SHA):
        return None  # logged before logits were kept: the build says so when it scores it
    try:
        path = tracker.download(rid, LOGITS_PATH, tmp / rid)
    except Exception as err:  # noqa: BLE001 - any failure to fetch means scoring again
        log(f"run {rid}: logged logits cannot be fetched ({type(err).__name__}); they will be computed again")
        return None
    if file_sha256(path) != tags[LOGITS_SHA]:
        log(f"run {rid}: logged logits do not match their sha256 tag; they will be computed again")
        return None
    return path


def _check_run(tracker, rid: str, tags: dict, parent_tags: dict, reference: dict, tmp: Path):
    """(local checkpoint path, None) for a usable run, else (None, why not)."""
    for tag in BASE_DIGESTS:
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
                      if scan.sha256 != tags.get(CHECKPOINT_SHA) else scan.nonfinite)
    except (ValueError, OSError) as err:  # a corrupt header or a truncated file
        reason = f"unreadable checkpoint: {err}"
    return (None, reason) if reason else (path, None)


def _incompatible(reference: dict, path: Path, run_id: str) -> str | None:
    try:
        check_compatible([reference, path], ["the sweep's base classifier", run_id])
    except ValueError as err:
        return str(err)
    return None


# --- the build, here or in a Ray task ---------------------------------------------------------

def _flushed(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log`, then stdout flushed: progress must show (and be seen by a watcher) as it happens."""
    def emit(line: str) -> None:
        log(line)
        sys.stdout.flush()
    return emit


def ray_for(res: CookResources, autoscale: bool = False) -> None:
    """Ray started (or joined), and checked to have a node for a task with the cook's resources."""
    connect.init_ray(lambda s: None)
    _check_fits(res, autoscale)


def _check_fits(res: CookResources, autoscale: bool) -> None:
    """Refuse a build task no node of this Ray can ever run (it would wait for ever), unless a
    cluster's autoscaler may still add one (``sweep.autoscale``)."""
    miss = connect.misfit(res.cpu, res.gpu)
    if miss is None or (autoscale and not miss.local):
        return
    raise CookError(f"cook.resources asks for {res.cpu:g} CPU and {res.gpu:g} GPU, but the largest "
                    f"node of this Ray has {miss.largest_has}: "
                    "the build could never run (soup cook --cpus N --gpus N sets what it asks for)")


def _build_soups(base, checkpoints, recipes, options, res: CookResources, use_ray: bool, uri: str,
                 progress, autoscale: bool = False) -> Built:
    """The build, in a Ray task with the cook's resources, or in this process (which just
    checked the files) with the same device and threads."""
    wanted = BuildResources(res.cpu, res.gpu)
    if not use_ray:
        return build_and_evaluate(base, checkpoints, recipes, options, uri, progress, resources=wanted)
    ray_for(res, autoscale)
    return task.run_with_progress(build_with_progress, (base, checkpoints, recipes, options, uri, wanted),
                                  num_cpus=res.cpu, num_gpus=res.gpu, log=progress,
                                  memory_bytes=int(res.memory_gib * 2**30))


# --- the driver -------------------------------------------------------------------------------

def recipe_options(space: SearchSpace, strict: bool = False, learned_mode: str | None = None,
                   learned_sample: int | None = None) -> RecipeOptions:
    """The recipes' options: the space's ``cook`` section, with the given overrides."""
    c = space.cook
    return RecipeOptions(strict, learned_mode or c.learned_mode,
                         parse_budget(c.memory_budget) if c.memory_budget else None,
                         learned_sample or c.learned_sample, c.learned_steps)


def soup_key(recipe: str, run_ids: Sequence[str], settings: Mapping[str, Any]) -> str:
    """Identity of a soup: recipe, its settings and the ordered ingredients (idempotent
    registration). The layout is the first releases' ``[recipe, greedy rule, run ids]``, then
    any other setting that is not at its default, so the soups they registered keep their keys
    (the learned soup's default mode was ``streaming`` then: that mode stays out of the key)."""
    defaults = {**option_defaults(), "learned_mode": "streaming"}
    rest = [v for k, v in sorted(settings.items()) if k != "strict" and v != defaults.get(k)]
    return json_sha256([recipe, settings.get("strict"), list(run_ids), *rest])[:24]


@dataclass(frozen=True)
class CookTarget:
    """The sweep a cook is about, as found in MLflow (read only)."""

    tracker: Tracker
    experiment_id: str
    parent: Any
    space: SearchSpace
    runs: list
    model_name: str


def find_target(sweep_id: str, tracking_uri: str | None, model_name: str | None,
                partial: bool) -> CookTarget:
    """The sweep's run, its space and its FINISHED trials; CookError when it cannot be cooked."""
    tracker = Tracker(tracking_uri)
    exp_id, parent = locate_sweep(tracker, sweep_id)
    if parent is None:
        raise CookError(f"no sweep {sweep_id!r} in {tracker.uri}")
    _check_finished(parent, sweep_id, partial)
    space = _sweep_space(tracker, parent, sweep_id)
    runs = tracker.trial_runs(exp_id, sweep_id, FINISHED)
    if not runs:
        raise CookError(f"sweep {sweep_id!r} has no FINISHED trial runs to cook")
    name = model_name or space.tracking.registered_model or f"{space.tracking.experiment_name}-soup"
    return CookTarget(tracker, exp_id, parent, space, runs, name)


def cook_resources(space: SearchSpace, cpu: float | None = None, gpu: float | None = None,
                   memory_gib: float | None = None) -> CookResources:
    """The space's ``cook.resources`` with any of them overridden (``soup cook --cpus ...``)."""
    given = {k: v for k, v in (("cpu", cpu), ("gpu", gpu), ("memory_gib", memory_gib)) if v is not None}
    return validate(CookResources, {**space.cook.resources.model_dump(), **given},
                    "cook.resources with --cpus/--gpus/--memory-gib")


def cook(sweep_id: str, recipes: Sequence[str] | None = None, model_name: str | None = None,
         tracking_uri: str | None = None, strict: bool = False, use_ray: bool = True,
         log: Callable[[str], None] = print, learned_mode: str | None = None,
         partial: bool = False, resources: Mapping[str, float | None] | None = None,
         rebuild: bool = False, learned_sample: int | None = None) -> CookOutcome:
    """Cook sweep `sweep_id`: soups and baselines evaluated, logged under the sweep, registered.

    `recipes` default to the built-in ones; `learned_mode` overrides the space's
    ``cook.learned_mode`` (``auto``, ``stacked``, ``sampled`` or ``streaming``) and
    `learned_sample` its ``cook.learned_sample``, `resources` its ``cook.resources``
    (``cpu``, ``gpu``, ``memory_gib``). A sweep that has not FINISHED (still running,
    interrupted or failed) is cooked only with `partial`, and its soups say so.

    A sweep already cooked from the same trials, recipes and settings is recognised before
    anything is fetched or built (its record, `cook/records/`, and every soup's run and version
    are there): the recorded table is returned, at no forward pass. `rebuild` builds and
    evaluates it again all the same (what is registered is reused, never duplicated).
    """
    table = recipes_named(recipes)
    target = find_target(sweep_id, tracking_uri, model_name, partial)
    tracker, space, parent = target.tracker, target.space, target.parent
    options = recipe_options(space, strict, learned_mode, learned_sample)
    record = record_key(target, table, options)
    if not rebuild and (done := already_cooked(target, record, log)) is not None:
        return done
    res = cook_resources(space, **(resources or {}))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        checkpoints, excluded = load_ingredients(tracker, target.runs, parent.data.tags,
                                                 reference_state(space), Path(tmp), log)
        if not checkpoints:
            raise CookError(f"sweep {sweep_id!r}: every run was excluded: {excluded}")
        online = online_record(tracker, parent.info.run_id)
        rank_ingredients(checkpoints, target.runs, online)
        fetched = {"name": "fetch and check", "passes": 0, "seconds": time.perf_counter() - start,
                   "bytes": int(_mib(*[p for c in checkpoints for p in (c.path, c.logits_path)]) * 2**20)}
        log(f"cooking {len(checkpoints)} ingredients of sweep {sweep_id} "
            f"(best held-out {checkpoints[0].heldout_acc:.1%}): {', '.join(r.name for r in table)} "
            f"on {_device_words(res)}")
        built = _build_soups(space.base.model_dump(mode="json"), checkpoints, table, options, res,
                             use_ray, tracker.uri, _flushed(log), space.sweep.autoscale)
        built.phases = [fetched, *(p for p in built.phases if p["name"] != "fetch" or p["bytes"])]
        excluded.update(built.excluded)
        _compare_online(built, online, log)
        ctx = CookContext(tracker, target.experiment_id, parent.info.run_id, sweep_id, space, built.used,
                          model_name=target.model_name, options=options, tmp=Path(tmp),
                          partial=parent.info.status != FINISHED,
                          names={c.run_id: c.name for c in checkpoints}, record=record,
                          classnames=built.classnames, digests=built.digests,
                          stopped=parent.data.tags.get(STOP_REASON, ""))
        out = _log_all(ctx, built, excluded, log)
        _report_cost(ctx, built, log)
        return out


def cook_online(sweep_id: str, tracking_uri: str | None = None, use_ray: bool = True,
                log: Callable[[str], None] = print) -> CookOutcome:
    """Register the online soup of a sweep run with ``sweep.online_soup`` (what ``soup sweep`` does
    at its end): recipe ``online-greedy``, the greedy rule over the trials in the order its
    online soup took them (`finish_order`), evaluated and registered as every soup is."""
    return cook(sweep_id, recipes=["online-greedy"], tracking_uri=tracking_uri, use_ray=use_ray, log=log)


def rank_ingredients(checkpoints: list[TrialCheckpoint], runs, online: list[dict]) -> None:
    """Each checkpoint's place in the order the sweep's trials finished (`finish_order`), and the
    checkpoints sorted best first, as MLflow ranked them; among equal figures the first finished
    (so that of byte-identical checkpoints the cook takes the one the online soup took)."""
    order = finish_order(runs, online)
    for c in checkpoints:
        c.finished = order[c.run_id]
    checkpoints.sort(key=lambda c: (-c.heldout_acc, c.finished))


def finish_order(runs, online: list[dict]) -> dict[str, int]:
    """Each run's place in the order the sweep's trials finished: the online soup's record
    (the order it was offered them), then any other run by its end time."""
    recorded = [e["run_id"] for e in online]
    rest = sorted((r for r in runs if r.info.run_id not in recorded),
                  key=lambda r: (r.info.end_time or 0, r.info.run_id))
    return {rid: n for n, rid in enumerate([*recorded, *(r.info.run_id for r in rest)])}


def _compare_online(built: Built, online: list[dict], log: Callable[[str], None]) -> None:
    """Say whether the `online-greedy` soup kept what the sweep's online soup kept (the same rule
    over the same order and the same held-out examples; only a different device's arithmetic
    could tell them apart)."""
    soup = built.soups.get("online-greedy")
    if soup is None or not online:
        return
    kept = [built.used[i] for i in soup.kept]
    live = [e["run_id"] for e in online if e.get("kept") and e["run_id"] in built.used]
    if kept == live:
        log(f"online-greedy soup: kept the {len(kept)} ingredients the sweep's online soup kept, in its order")
    else:
        log(f"online-greedy soup: kept {len(kept)} ingredients where the sweep's online soup kept "
            f"{len(live)} (first difference at {next((a for a, b in zip(kept, live) if a != b), '-')})")


def record_key(target: CookTarget, table: Sequence, options: RecipeOptions) -> str:
    """Identity of a cook's inputs, read from MLflow's records alone (nothing downloaded): the
    trials (run, checkpoint and logits digests, held-out figure), the sweep's state, the
    registered model, the recipes and their settings. It names the cook's record on the sweep
    run (`schema.cook_record`)."""
    trials = [[r.info.run_id, r.data.tags.get(CHECKPOINT_SHA), r.data.tags.get(LOGITS_SHA),
               r.data.metrics.get(HELDOUT_ACC)] for r in target.runs]
    recipes = [[r.name, r.settings(options)] for r in table]
    return json_sha256([target.model_name, target.parent.info.status, trials, recipes])[:24]


def already_cooked(target: CookTarget, record: str, log: Callable[[str], None]) -> CookOutcome | None:
    """The outcome of an earlier cook of the same inputs whose every soup is still logged and
    registered (said per recipe, with a cost table of no forward pass), or None."""
    start = time.perf_counter()
    try:
        rec = json.loads(read_artifact_text(target.tracker, target.parent.info.run_id, cook_record(record)))
    except Exception:  # noqa: BLE001 - no record (never cooked, or by a release that kept none)
        return None
    found = {}
    for recipe, key in rec["soups"].items():
        run, version = find_soup(target.tracker, target.experiment_id, key), \
            find_version(target.tracker, target.model_name, key)
        if run is None or version is None:
            return None  # deleted since: cook it again
        found[recipe] = (run.info.run_id, version.version)
    for recipe, (run_id, version) in found.items():
        log(f"{recipe} soup: already cooked as run {run_id}, version {version}")
    phases = [{"name": "already cooked", "passes": 0, "bytes": 0, "seconds": time.perf_counter() - start}]
    for line in ["nothing built: every soup of these inputs is already cooked", *phase_table(phases)]:
        log(line)
    return CookOutcome(target.parent.data.tags.get(SWEEP_ID, ""), rec["rows"], rec["excluded"],
                       {r: v for r, (_, v) in found.items()}, {r: i for r, (i, _) in found.items()},
                       reused=list(found), phases=phases, singles=rec["singles"],
                       parent_run_id=target.parent.info.run_id, tracking_uri=target.tracker.uri)


def _keep_record(ctx: CookContext, built: Built, excluded: dict[str, str], keys: dict[str, str]) -> None:
    """What `already_cooked` returns for a later cook of the same inputs."""
    rec = {"soups": keys, "rows": built.rows, "singles": built.singles, "excluded": excluded}
    ctx.tracker.log_text(ctx.parent_run_id, json.dumps(rec, indent=1), cook_record(ctx.record))


def _device_words(res: CookResources) -> str:
    return (f"{res.gpu:g} GPU and {res.cpu:g} CPUs" if res.gpu else f"the CPU ({res.cpu:g} CPUs)")


def _report_cost(ctx: CookContext, built: Built, log) -> None:
    """The cost table (forward passes, bytes, time per phase) printed and kept on the sweep run."""
    where = built.where
    head = (f"built on {where.get('device')} ({where.get('precision')}, {where.get('threads')} threads; "
            f"inputs on {', '.join(where.get('input_devices', [])) or 'none'})")
    lines = [head, *phase_table(built.phases)]
    for line in lines:
        log(line)
    ctx.tracker.log_text(ctx.parent_run_id, "\n".join(lines) + "\n", COOK_COST)


def recipes_named(names: Sequence[str] | None) -> list:
    """The recipes of these names (the defaults when none), or a CookError naming the unknown."""
    try:
        return [get_recipe(r) for r in (names or default_recipes())]
    except ValueError as err:
        raise CookError(str(err)) from None


def _check_finished(parent, sweep_id: str, partial: bool) -> None:
    """Refuse a sweep whose run has not FINISHED unless `partial`: its finished trials are only
    some of the sweep's, and a soup of them must not pass for the sweep's soup."""
    status = parent.info.status
    if status == FINISHED or partial:
        return
    why = parent.data.tags.get(END_REASON, "")
    raise CookError(
        f"sweep {sweep_id!r} has not finished (its run is {status}{': ' + why if why else ''}); "
        f"finish it (soup sweep SPACE --name {shlex.quote(sweep_id)} --resume) or pass --partial to cook "
        "the trials finished so far")


def _sweep_space(tracker: Tracker, parent, sweep_id: str) -> SearchSpace:
    """The space the sweep ran, from the copy logged with its run."""
    try:
        text = read_artifact_text(tracker, parent.info.run_id, RESOLVED_SPACE)
    except Exception as err:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise CookError(f"sweep {sweep_id!r}: its logged space ({RESOLVED_SPACE}) cannot "
                        f"be read from its artifacts ({type(err).__name__}): were they deleted?") from None
    return validate(SearchSpace, yaml.safe_load(text), f"sweep {sweep_id} config")


def _log_all(ctx: CookContext, built: Built, excluded: dict[str, str], log) -> CookOutcome:
    from orchestrator.cook.report import soup_figure

    out = CookOutcome(ctx.sweep_id, built.rows, excluded, {}, {}, phases=built.phases, where=built.where,
                      singles=built.singles, parent_run_id=ctx.parent_run_id, tracking_uri=ctx.tracker.uri)
    figure = ctx.tmp / Path(COOK_FIGURE).name  # logged into COOK_DIR: its name is the artifact's
    plot = soup_figure(built.rows, built.singles, built.soups.get("greedy"), figure)
    out.plot_png = plot.read_bytes()
    by_name, keys = {r["name"]: r for r in built.rows}, {}
    for recipe, result in built.soups.items():
        settings = get_recipe(recipe).settings(ctx.options)
        soup = SoupRecord(recipe, soup_key(recipe, ctx.run_ids, settings), settings, result,
                          by_name[f"{recipe} soup"])
        keys[recipe] = soup.key
        run_id, version, reused = _log_and_register(ctx, soup, built, plot, log)
        out.soup_runs[recipe], out.versions[recipe] = run_id, version
        if reused:
            out.reused.append(recipe)
            log(f"{recipe} soup: already cooked as run {run_id}, version {version}")
        else:
            log(f"{recipe} soup: run {run_id}, registered {ctx.model_name} version {version}")
    ctx.tracker.log_text(ctx.parent_run_id, markdown_table(built.rows, _columns(built.rows)), COOK_TABLE)
    ctx.tracker.log_artifact(ctx.parent_run_id, plot, COOK_DIR)
    ctx.tracker.describe(ctx.parent_run_id, _cooked_description(ctx, built.rows))
    ctx.tracker.describe_model(ctx.model_name, MODEL_DESCRIPTION.format(name=ctx.model_name))
    _keep_record(ctx, built, excluded, keys)
    return out


MODEL_DESCRIPTION = f"""Model soups: weight averages of CLIP models fine-tuned from one pretrained checkpoint with different hyperparameters (Wortsman et al., 2022).

Each version is one soup cooked from a sweep by `soup cook`. Its description and tags give its recipe (`{RECIPE}`), its accuracies (`{HELDOUT_ACC}` is the selection split; `{TEST_ACC}` and `{SHIFT_MEAN_ACC}` are for reporting) and its lineage (`{SWEEP_ID}`, `{SOUP_RUN_ID}`, `{INGREDIENTS}`).

Pick a version on held-out accuracy, then point the `champion` alias at it (`soup promote {{name}} --version N --alias champion`, which refuses a version whose held-out accuracy is below the current champion's, or the UI). Production loads `models:/{{name}}@champion`."""


def _cooked_description(ctx: CookContext, rows: list[dict]) -> str:
    """The sweep run's description after a cook: its comparison table, the verdict, the plot."""
    return "\n".join([
        (f"**Sweep `{ctx.sweep_id}`**, cooked from {len(ctx.run_ids)} trials into registered model "
         f"`{ctx.model_name}`."), "", markdown_table(rows, _columns(rows)),
        *(f"- {line}" for line in verdict(rows)), "",
        *([f"Stopped early: {ctx.stopped}.", ""] if ctx.stopped else []),
        # a path relative to the UI's page: a tracking server serves the run's artifact there
        f"![test against mean shift accuracy](get-artifact?path={quote(COOK_FIGURE, safe='')}"
        f"&run_uuid={ctx.parent_run_id})",
        "", ("The figure (test against mean shift accuracy, every trial and soup, and the greedy path) "
             f"is `{COOK_FIGURE}` in this run's artifacts; the cost of the cook is `{COOK_COST}`.")])


def _soup_description(ctx: CookContext, soup: SoupRecord, run_id: str | None = None) -> str:
    """A soup's description (its run's, and with `run_id` its registered version's): recipe,
    kept ingredients, its row of the table, and where it comes from."""
    kept = [ctx.run_ids[i] for i in soup.result.kept]
    settings = ", ".join(f"{k}={v}" for k, v in sorted(soup.settings.items())) or "defaults"
    lines = [f"{soup.recipe} soup of sweep `{ctx.sweep_id}` (settings: {settings}): "
             f"{len(kept)} of {len(ctx.run_ids)} ingredients kept"
             + (f" (mixing weights in `{COEFFICIENTS}`)." if soup.result.coefficients else "."),
             "", markdown_table([soup.row], [c for c in soup.row if c not in ("kind", "name")]),
             "", "Kept ingredients, in the order added:",
             *(f"- {ctx.names.get(r, r)} (run `{r}`)" for r in kept)]
    if ctx.partial:
        lines += ["", f"Cooked from a sweep that had not finished (tag `{PARTIAL_SWEEP}`)."]
    if run_id:
        lines += ["", f"Lineage: soup run `{run_id}`, under sweep run `{ctx.parent_run_id}`."]
    return "\n".join(lines)


def _columns(rows: list[dict]) -> list[str]:
    return [c for c in rows[0] if c != "kind"]


def _log_and_register(ctx: CookContext, soup: SoupRecord, built: Built, plot: Path,
                      log: Callable[[str], None]) -> tuple[str, str, bool]:
    """(soup run id, registered version, whether both existed already) for one soup; another cook
    logging the same soup meanwhile is waited for, or settled with (`locking`)."""
    from orchestrator.data.images import encode_image

    what = f"{soup.recipe} soup"
    locking.wait_for_other_cooks(ctx.tracker, ctx.experiment_id, ctx.model_name, soup.key, what, log)
    existing = find_soup(ctx.tracker, ctx.experiment_id, soup.key)
    version = find_version(ctx.tracker, ctx.model_name, soup.key)
    if existing is not None and version is not None:
        return existing.info.run_id, version.version, True
    if existing is None:  # a cook killed mid-logging left a half-logged run: replace it
        locking.discard_left_behind(ctx.tracker, ctx.experiment_id, soup.key)
    weights = save_weights(soup.result.state_dict, ctx.tmp / Path(soup_artifact(soup.recipe)).name,
                           {RECIPE: soup.recipe})
    config = {"model": ctx.space.base.model.model_dump(mode="json"), "classnames": built.classnames,
              "image_size": int(models.arch_config(ctx.space.base.model.arch)["vision_cfg"]["image_size"])}
    started: dict[str, str] = {}  # what this call created, withdrawn if it is interrupted
    try:
        if existing is None:
            run_id, model_id = _log_soup_run(ctx, soup, weights, plot, started)
            logged = None
        else:  # logged by a cook killed before it registered: its logged model is finished, not doubled
            run_id = existing.info.run_id
            logged, model_id = _left_model(ctx, soup, run_id, started)
        if logged is None:
            logged = log_soup_model(ctx.tracker, run_id, weights, config, encode_image(built.example),
                                    model_id=model_id)
        mv = register_soup(ctx.tracker, logged, ctx.model_name, run_id, _version_tags(ctx, soup, run_id),
                           description=_soup_description(ctx, soup, run_id))
    except BaseException:  # Ctrl-C or SIGTERM (`signals.stop_signals`), or an error
        _withdraw(ctx, soup.key, started)
        raise
    return locking.settle(ctx.tracker, ctx.model_name, soup.key, run_id, mv, existing is None,
                              what, log)


def _left_model(ctx: CookContext, soup: SoupRecord, run_id: str, started: dict[str, str]):
    """(READY logged model, None) or (None, id of a model to finish) for a soup run that a killed
    cook left unregistered: its READY model is registered as it is, else its PENDING one gets its
    files; any other is deleted, so the Models tab lists the soup once. A new one when none."""
    left = ctx.tracker.logged_models_of(ctx.experiment_id, run_id)
    left.sort(key=lambda m: m.status != READY)  # a READY one first, then PENDING ones
    for extra in left[1:]:
        ctx.tracker.delete_logged_model(extra.model_id)
    if left and left[0].status == READY:
        return left[0], None
    if left and left[0].status == PENDING:
        return None, left[0].model_id
    if left:  # FAILED: nothing to finish
        ctx.tracker.delete_logged_model(left[0].model_id)
    started["model"] = _create_soup_model(ctx, soup, run_id)
    return None, started["model"]


def _withdraw(ctx: CookContext, key: str, started: dict[str, str]) -> None:
    """After an interruption between a soup run and its registration: delete the logged model and
    the run this call created, so that nothing stays PENDING and a rerun logs the soup once.
    What a registered version already points at is kept."""
    if not started or find_version(ctx.tracker, ctx.model_name, key) is not None:
        return
    if "model" in started:
        ctx.tracker.delete_logged_model(started["model"])
    if "run" in started:
        ctx.tracker.end_run(started["run"], KILLED)
        ctx.tracker.delete_run(started["run"])


def _version_tags(ctx: CookContext, soup: SoupRecord, run_id: str) -> dict[str, Any]:
    return {RECIPE: soup.recipe, SWEEP_ID: ctx.sweep_id, SOUP_KEY: soup.key,
            SOUP_RUN_ID: run_id, **soup.settings, INGREDIENTS: soup.kept_ids(ctx.run_ids),
            **_partial_tag(ctx), **_data_tags(ctx),
            # full precision (repr): a rounded tag, rounded again for display, showed 53.3% for 53.35%
            **{accuracy_metric(k): repr(v) for k, v in soup.row.items() if isinstance(v, float)}}


def _data_tags(ctx: CookContext) -> dict[str, str]:
    """What the served soup speaks and was chosen on: its class names (cut past `MAX_CLASSES_TAG`
    characters; the logged model's config holds them all, `CLASSES_SHA` identifies the list) and
    the digests of the held-out split that selected it and the splits that measured it."""
    full = json.dumps(ctx.classnames, ensure_ascii=False)
    shown = full if len(full) <= MAX_CLASSES_TAG else full[:MAX_CLASSES_TAG] + "..."
    return {CLASSES: shown, CLASSES_SHA: text_sha256(full), N_CLASSES: str(len(ctx.classnames)),
            DATA_DIGESTS: json.dumps(ctx.digests, sort_keys=True)}


def _partial_tag(ctx: CookContext) -> dict[str, str]:
    return {PARTIAL_SWEEP: "true"} if ctx.partial else {}


def _soup_params(ctx: CookContext, soup: SoupRecord) -> dict[str, Any]:
    return {RECIPE: soup.recipe, N_INGREDIENTS: len(ctx.run_ids), N_KEPT: len(soup.result.kept)}


def _create_soup_model(ctx: CookContext, soup: SoupRecord, run_id: str) -> str:
    """The soup's logged model (PENDING until its files are in), produced by its run."""
    return ctx.tracker.create_model(run_id, soup_run_name(soup.recipe),
                                    {**_soup_params(ctx, soup), **soup.settings},
                                    {ROLE: ROLE_SOUP, SWEEP_ID: ctx.sweep_id, RECIPE: soup.recipe})


def _log_soup_run(ctx: CookContext, soup: SoupRecord, weights: Path, plot: Path,
                  started: dict[str, str]) -> tuple[str, str]:
    """The soup's run (FINISHED) and its logged model (PENDING until its files are in): the
    ingredients' datasets as its inputs, its accuracies as the model's metrics on them. The ids
    go into `started` as soon as they exist, for `_withdraw`."""
    tracker, ids, res = ctx.tracker, ctx.run_ids, soup.result
    rid = started["run"] = tracker.create_run(ctx.experiment_id, soup_run_name(soup.recipe), {
        ROLE: ROLE_SOUP, SWEEP_ID: ctx.sweep_id, RECIPE: soup.recipe, SOUP_KEY: soup.key,
        INGREDIENTS: ",".join(ids), KEPT_INGREDIENTS: soup.kept_ids(ids),
        COOK_OWNER: locking.this_owner(), **_partial_tag(ctx)},
        parent_run_id=ctx.parent_run_id)
    tracker.log_params(rid, _soup_params(ctx, soup))
    datasets = tracker.copy_datasets(ids[0], rid)
    model_id = started["model"] = _create_soup_model(ctx, soup, rid)
    tracker.describe(rid, _soup_description(ctx, soup))
    tracker.log_metrics(rid, {accuracy_metric(k): v for k, v in soup.row.items()
                              if isinstance(v, float) and not math.isnan(v)},
                        model_id=model_id, datasets=datasets)
    for n, step in enumerate(res.steps, start=1):  # the greedy path: accuracy per ingredient tried
        if HELDOUT_ACC in step:  # the greedy recipes name the soup's accuracy as trials' metric
            tracker.log_metrics(rid, {SOUP_HELDOUT_ACC: step[HELDOUT_ACC]}, step=n)
    tracker.log_artifact(rid, weights, SOUP_DIR)  # as soup_artifact(recipe)
    tracker.log_text(rid, json.dumps({INGREDIENTS: ids, "coefficients": res.coefficients}, indent=1),
                     COEFFICIENTS)
    tracker.log_artifact(rid, plot, PLOTS_DIR)
    tracker.end_run(rid, FINISHED)
    return rid, model_id


__all__ = ["ConfigError", "CookError", "CookOutcome", "cook", "cook_online", "soup_key"]
