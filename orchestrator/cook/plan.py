"""`soup cook --plan`: what a cook would do and what it would cost, read from MLflow alone.

Nothing is downloaded or written: the ingredients and their exclusions come from the trial
runs' tags (base model digests, checkpoint digests, logged logits and the labels they were
computed on) and the artifact listing (sizes); the forward passes and bytes per phase follow
from the split sizes and each recipe's known cost, in the same phases the cook then reports.
Figures marked ≤ are bounds (the greedy soup's early rejection lowers them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator import data
from orchestrator.cook.driver import (
    cook_resources,
    find_target,
    recipe_options,
    recipes_named,
)
from orchestrator.cook.meter import MIB
from orchestrator.record import logits as logitstore
from orchestrator.record.schema import (
    BASE_DIGESTS,
    CHECKPOINT_PATH,
    CHECKPOINT_SHA,
    HELDOUT_ACC,
    LOGITS_PATH,
    LOGITS_SHA,
    LOGITS_SPLITS,
)
from orchestrator.soups.doctor import ALPHAS
from orchestrator.soups.learned import (
    DEFAULT_BUDGET_SHARE,
    HELDOUT_LIMIT,
    choose_mode,
    free_memory,
    held_bytes,
    held_in_host,
)
from orchestrator.soups.recipe import RecipeOptions

LEARNED_BATCH = 256  # `learned_soup`'s default mini-batch, as the cook runs it (its steps: cook.learned_steps)


@dataclass
class CookPlan:
    """The plan: ingredients, exclusions, recipes, device and each phase's estimated cost."""

    sweep_id: str
    uri: str
    trials: int
    usable: list[str]
    excluded: dict[str, str]
    rescored: dict[str, str]  # run -> why its logits cannot be used
    recipes: list[str]
    device: str
    phases: list[dict] = field(default_factory=list)  # name, passes, bound, bytes (, held, mode)

    def lines(self) -> list[str]:
        out = [f"plan for cooking sweep {self.sweep_id} ({self.uri}); nothing is changed",
               f"ingredients: {len(self.usable)} of {self.trials} FINISHED trials"]
        out += [f"  excluded {rid}: {why}" for rid, why in self.excluded.items()]
        out += [f"  scored again {rid}: {why}" for rid, why in self.rescored.items()]
        out += [f"recipes: {', '.join(self.recipes)}", f"device: {self.device}",
                f"{'phase':<22}{'forward passes':>18}{'MiB read':>12}{'MiB held':>12}"]
        for p in self.phases:
            passes = "?" if p.get("unknown") else ("≤ " if p["bound"] else "") + f"{p['passes']:,}"
            held = f"{p['held'] / MIB:>12,.1f}" if p.get("held") else ""
            out.append(f"{p['name']:<22}{passes:>18}{p['bytes'] / MIB:>12,.1f}{held}")
        out += [f"  {p['name']}: {p['mode']}" for p in self.phases if p.get("mode")]
        return out


def plan_cook(sweep_id: str, recipes: Sequence[str] | None = None, model_name: str | None = None,
              tracking_uri: str | None = None, learned_mode: str | None = None, partial: bool = False,
              resources: Mapping[str, float | None] | None = None,
              learned_sample: int | None = None, doctor: bool = False) -> CookPlan:
    """What `cook` with these arguments would do, from MLflow's records alone (read only)."""
    table = recipes_named(recipes)
    target = find_target(sweep_id, tracking_uri, model_name, partial)
    res = cook_resources(target.space, **(resources or {}))
    task = data.load_task(target.space.base.data)
    splits = {"heldout": task.heldout, **task.reporting()}
    usable, excluded, rescored, sizes = _ingredients(target, splits)
    options = recipe_options(target.space, False, learned_mode, learned_sample)
    device = (f"cuda, {res.gpu:g} GPU, bf16 where supported, {res.cpu:g} CPUs"
              if res.gpu else f"cpu, fp32, {max(1, int(res.cpu))} torch threads")
    plan = CookPlan(sweep_id, target.tracker.uri, len(target.runs), usable, excluded, rescored,
                    [r.name for r in table], device)
    plan.phases = phases_of(plan, sizes, {k: len(s) for k, s in splits.items()}, options,
                          "cuda" if res.gpu else "cpu")
    if doctor:  # `soup cook --doctor`: each ingredient read once; len(ALPHAS) + 1 passes each but the best's
        k, images = len(plan.usable), min(target.space.doctor.images, len(splits["heldout"]))
        plan.phases.append(_p("doctor", ((len(ALPHAS) + 1) * (k - 1) + 1) * images if k else 0,
                              sum(c for c, _ in sizes.values())))
    return plan


def _ingredients(target, splits) -> tuple[list[str], dict[str, str], dict[str, str], dict[str, tuple[int, int]]]:
    """(usable runs, excluded runs and why, runs whose logits will not do and why, sizes)."""
    wanted = {k: s.labels for k, s in splits.items()}
    parent_tags = target.parent.data.tags
    usable, excluded, rescored, sizes, seen = [], {}, {}, {}, {}
    for run in sorted(target.runs, key=lambda r: -r.data.metrics.get(HELDOUT_ACC, 0.0)):
        rid, tags = run.info.run_id, run.data.tags
        why = _excluded_by_tags(tags, parent_tags, seen)
        if why:
            excluded[rid] = why
            continue
        seen[tags[CHECKPOINT_SHA]] = rid
        usable.append(rid)
        found = logitstore.from_tag(tags.get(LOGITS_SPLITS)) if tags.get(LOGITS_SHA) else None
        if (bad := logitstore.mismatch(found, wanted)) is not None:
            rescored[rid] = bad
        sizes[rid] = (_size(target.tracker, rid, CHECKPOINT_PATH),
                      _size(target.tracker, rid, LOGITS_PATH) if rid not in rescored else 0)
    return usable, excluded, rescored, sizes


def _excluded_by_tags(tags: dict, parent_tags: dict, seen: dict) -> str | None:
    for tag in BASE_DIGESTS:
        if tags.get(tag) != parent_tags.get(tag):
            return f"{tag} {tags.get(tag, 'missing')[:12]} differs from the sweep's base"
    if not tags.get(CHECKPOINT_SHA):
        return f"no {CHECKPOINT_SHA} tag: no checkpoint was logged"
    if tags[CHECKPOINT_SHA] in seen:
        return f"checkpoint byte-identical to run {seen[tags[CHECKPOINT_SHA]]}: cooked once, as that run"
    return None


def _size(tracker, run_id: str, path: str) -> int:
    """An artifact's size from the run's listing (0 when it is not there)."""
    folder, name = path.rsplit("/", 1)
    listing = tracker.client.list_artifacts(run_id, folder)
    return next((int(a.file_size or 0) for a in listing if a.path.endswith(name)), 0)


def phases_of(plan: CookPlan, sizes: dict[str, tuple[int, int]], n: dict[str, int],
              options: RecipeOptions, device: str = "cpu") -> list[dict]:
    """Each phase's forward passes (images through the model) and bytes read, as the cook counts."""
    k, every = len(plan.usable), sum(n.values())
    ckpt = sum(c for c, _ in sizes.values())
    per = ckpt // max(k, 1)
    phases = [_p("fetch and check", 0, ckpt + sum(lg for _, lg in sizes.values())),
              _p("zero-shot", every, 0),
              _p("baselines", len(plan.rescored) * every,
                 sum(lg for _, lg in sizes.values()) + len(plan.rescored) * per)]
    for name in plan.recipes:
        phases.append(_recipe_phase(name, k, n["heldout"], ckpt, options, device))
    phases.append(_p("evaluation", len(plan.recipes) * every, 0))
    return phases


def learned_plan(options: RecipeOptions, n: int, ckpt: int, device: str = "cpu",
                 free: int | None = None, host_free: int | None = None) -> dict:
    """How a learned soup of `n` ingredients (`ckpt` bytes of float32 checkpoints in all) would
    run: its mode (``auto`` resolved as the cook resolves it), bytes read, bytes held on the
    device. `free`: the device's free memory (default: measured here, for a CPU or a visible GPU;
    a cook's GPU that this machine does not have is planned with the budget in bytes only)."""
    import torch

    per = ckpt // max(n, 1)  # one ingredient's bytes: its float32 values / 4
    params = per // 4
    mode, k, why = options.learned_mode, min(options.learned_sample, n), ""
    if mode == "auto":
        kind, value = options.memory_budget or ("share", DEFAULT_BUDGET_SHARE)
        if kind == "share" and free is None:
            here = torch.device(device)
            if device == "cuda" and not torch.cuda.is_available():
                return {"mode": "auto: the cook's GPU decides (set cook.memory_budget to a size to plan it here)",
                        "bytes": 2 * ckpt, "held": held_bytes("stacked", params, n), "bound": True}
            free = free_memory(here)
        budget = int(value if kind == "bytes" else value * free)
        mode, k, why = choose_mode(params, n, budget, options.learned_sample)
        why = f" ({why}; budget {budget / MIB:,.0f} MiB)"
    # beside a GPU the sampled mode reads the N into host memory once, when they fit half of it
    # (`host_free`, default this machine's as the plan sees it; the cook's node decides)
    host_held = device == "cuda" and held_in_host(ckpt, host_free)
    steps = options.learned_steps
    reads = {"stacked": 2 * ckpt, "streaming": (2 * steps + 1) * ckpt, "memory": 2 * ckpt,
             "sampled": 2 * ckpt if host_held else 2 * ckpt + steps * k * per}[mode]
    label = f"sampled, {k} of {n} per step" if mode == "sampled" else mode
    return {"mode": label + why, "bytes": reads, "held": held_bytes(mode, params, n, k), "bound": False}


def _recipe_phase(name: str, k: int, heldout: int, ckpt: int, options: RecipeOptions,
                  device: str = "cpu") -> dict:
    fit = min(heldout, HELDOUT_LIMIT)
    if name == "uniform":
        return _p(name, 0, ckpt)
    if name == "model-stock":
        return _p(name, 0, 2 * ckpt)
    if name in ("greedy", "online-greedy"):
        return _p(name, k * heldout, ckpt, bound=True)
    if name in ("learned", "learned-layerwise"):
        steps = options.learned_steps * min(LEARNED_BATCH, fit)
        how = learned_plan(options, k, ckpt, device)
        return {**_p(name, steps + fit, how["bytes"]), "held": how["held"], "mode": how["mode"]}
    return {"name": name, "passes": 0, "bound": True, "bytes": 0, "unknown": True}


def _p(name: str, passes: int, nbytes: int, bound: bool = False) -> dict:
    return {"name": name, "passes": passes, "bound": bound, "bytes": nbytes}
