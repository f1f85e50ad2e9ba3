"""Benchmark: what the soup-patience stopper saves, over K sweeps that differ only in their seed.

For each seed the default world's space (Fashion-MNIST when its files are here, else the digits
world: `demo.choose_world`), with ``--trials`` trials (more than the demo's 8), is swept twice
with an online soup (`orchestrator.sweep.online`): once in full, once with the stopper
(``sweep.stop.soup_patience``, ``sweep.stop.min_delta``). Both sweeps are real and draw the same
trials in the same order (the same ``sweep.seed``); the stopped one trains fewer of them. Each is
then cooked with the greedy recipe (the paper's, best held-out first, over the trials it
trained) and the online one. It prints, per seed and as means with paired 95% intervals
(Student's t, K - 1 degrees of freedom): trials trained (the GPU-hour proxy), and the final
greedy soup's test and mean shift accuracy, stopped minus full.

    .venv/bin/python benchmarks/online_soup.py [--k 5] [--trials 24] [--patience 6]
        [--min-delta 0.001] [--watch-best] [--replay] [--space PATH] [--first-seed 0]
        [--out DIR] [--figure PNG]

``--watch-best`` stops only when the best single trial has not risen either
(``sweep.stop.watch_best``). ``--replay`` sweeps each seed in full only and replays both rules
(the soup alone, and with ``watch_best``) on it: until the stopper speaks, a stopped sweep is
the full one (the same trials, started in the same order), and when it speaks it has started
the trials it judged and the ones running beside them, which with the stopper (no trial starts
while one is judged) are the first ``judged + max_concurrent_trials - 1`` trials. The stopped
sweep's soups are then cooked from those trials' runs of the full sweep, in the order they
finished there (the cook's build, in this process, nothing registered). Both rules cost one
sweep per seed instead of two each; the verdict is the live stopper's function
(`sweep.online.stop_reason`) on the full sweep's online-soup record.

The stopper's settings were chosen by reasoning, before any of these sweeps ran (test and shift
accuracy are reported, never used to choose): a patience of a quarter of the sweep, and a rise
of more than 0.1 points (5 of Fashion's 5,000 held-out images) to count. Trials run two at a
time beside the soup actor (0.75 CPU each and 0.5 for the actor: the 2 cores of this machine);
the cooks get 2 CPUs. Each sweep's result is saved as JSON in ``--out`` as soon as it is
cooked; a rerun with the same ``--out`` skips the sweeps it already has.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soup_quality import _quiet, _stdout_to_stderr, mean_std, paired

RECIPES = ["greedy", "online-greedy"]


def space_text(base: str, seed: int, trials: int, patience: int | None, min_delta: float,
               watch_best: bool = False) -> str:
    """The world's space with `trials` trials of seed `seed`, an online soup (and its stopper)."""
    space = yaml.safe_load(base)
    sweep = space.setdefault("sweep", {})
    sweep.update(seed=seed, num_samples=trials, online_soup=True, max_concurrent_trials=2)
    sweep.setdefault("resources", {})["cpu"] = 0.75
    if patience is not None:
        sweep["stop"] = {"soup_patience": patience, "min_delta": min_delta,
                         **({"watch_best": True} if watch_best else {})}
    space.setdefault("cook", {})["resources"] = {"cpu": 0.5}
    return yaml.safe_dump(space, sort_keys=False)


def run_one(text: str, name: str, work: Path) -> dict:
    """One sweep and its cook: trials trained, why it stopped, the soups' rows, the times."""
    from orchestrator.cook.driver import cook
    from orchestrator.sweep.driver import run_sweep

    path = work / f"{name}.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    out = run_sweep(path, name=name, storage_path=str(work / "ray_results"), log=_quiet)
    t1 = time.perf_counter()
    cooked = cook(out.sweep_id, recipes=RECIPES, log=_quiet, resources={"cpu": 2})
    rows = {r["name"]: {k: r[k] for k in ("heldout", "test", "shift_mean")} for r in cooked.rows}
    return {"name": name, "sweep_id": out.sweep_id, "trials": out.finished, "stopped": out.stopped, "rows": rows,
            "curve": curve(out.parent_run_id), "sweep_seconds": t1 - t0,
            "cook_seconds": time.perf_counter() - t1}


def curve(sweep_run_id: str) -> list[dict]:
    """The online soup's record on the sweep run: per finished trial, in order, its held-out
    accuracy, whether the soup kept it, and the soup's held-out accuracy after it."""
    from orchestrator.record.soups import online_record
    from orchestrator.record.tracking import Tracker

    return [{k: e.get(k) for k in ("name", "run_id", "heldout_acc", "kept", "soup_acc")}
            for e in online_record(Tracker(None), sweep_run_id)]


RULES = {"soup": False, "soup+best": True}  # --replay: each rule's watch_best


def replayed_stop(full: dict, patience: int, min_delta: float, watch_best: bool,
                  concurrent: int) -> tuple[int, str | None]:
    """How many trials a stopped twin of the full sweep `full` would have trained, and why it
    stopped (None: it ran them all): the first point of the full sweep's online-soup curve at
    which the live rule speaks, plus the trials running beside it (`concurrent` - 1)."""
    from orchestrator.sweep.online import curves, first_stop

    c = curves(full["curve"])
    verdict = first_stop(c["soup"], patience, min_delta, c["best"] if watch_best else None)
    if verdict is None:
        return full["trials"], None
    judged, why = verdict
    return min(full["trials"], judged + concurrent - 1), why


def replay_cook(full: dict, trained: int) -> dict:
    """The stopped twin's soups (the paper's greedy and the online one): the cook's build over the
    full sweep's first `trained` trials (by trial index), in the order they finished there, in
    this process and registering nothing; the rows as `run_one` keeps them."""
    from orchestrator.cook.build import (
        BuildResources,
        build_and_evaluate,
        reference_state,
    )
    from orchestrator.cook.driver import (
        find_target,
        load_ingredients,
        rank_ingredients,
        recipe_options,
        recipes_named,
    )
    from orchestrator.record.soups import online_record

    target = find_target(full["sweep_id"], None, None, False)
    runs = [r for r in target.runs if int(r.info.run_name.split(" ", 1)[0][1:]) < trained]
    with tempfile.TemporaryDirectory(prefix="online-replay-") as tmp:
        checkpoints, _ = load_ingredients(target.tracker, runs, target.parent.data.tags,
                                          reference_state(target.space), Path(tmp), _quiet)
        rank_ingredients(checkpoints, runs, online_record(target.tracker, target.parent.info.run_id))
        built = build_and_evaluate(target.space.base.model_dump(mode="json"), checkpoints,
                                   recipes_named(RECIPES), recipe_options(target.space), None, _quiet,
                                   BuildResources(2, 0))
    rows = {r["name"]: {k: r[k] for k in ("heldout", "test", "shift_mean")} for r in built.rows}
    return {"trials": trained, "rows": rows}


def replay(full: dict, rule: str, patience: int, min_delta: float, concurrent: int, out: Path) -> dict:
    """The stopped twin of `full` under `rule` (saved in `out`, reused when there)."""
    saved = out / f"replay-{rule}-seed{full['seed']}.json"
    key = {"full": full["sweep_id"], "patience": patience, "min_delta": min_delta}
    if saved.exists() and json.loads(saved.read_text()).get("key") == key:
        return json.loads(saved.read_text())
    trained, why = replayed_stop(full, patience, min_delta, RULES[rule], concurrent)
    with _stdout_to_stderr():
        res = {**replay_cook(full, trained), "seed": full["seed"], "stopped": why, "key": key}
    saved.write_text(json.dumps(res, indent=1))
    print(f"seed {full['seed']} replayed ({rule}): {trained} trials, greedy test "
          f"{100 * res['rows']['greedy soup']['test']:.2f}", file=sys.stderr, flush=True)
    return res


def figure(pairs: list[tuple[dict, dict]], path: Path) -> Path:
    """One panel per seed: the full sweep's online soup and best trial so far (held-out) against
    trials finished, the stopped sweep's soup over it, and where the stopper ended that sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False, sharey=True)
    for ax, (full, stop) in zip(axes[0], pairs):
        n = range(1, len(full["curve"]) + 1)
        best = [max(e["heldout_acc"] for e in full["curve"][:i]) for i in n]
        ax.plot(n, [100 * b for b in best], color="grey", label="best trial so far (full)")
        ax.plot(n, [100 * e["soup_acc"] for e in full["curve"]], color="tab:blue", label="online soup (full)")
        if stop.get("curve"):  # (a result saved without its curve draws the line only)
            m = range(1, len(stop["curve"]) + 1)
            ax.plot(m, [100 * e["soup_acc"] for e in stop["curve"]], "--", color="tab:orange",
                    label="online soup (stopped sweep)")
        ax.axvline(stop["trials"], color="tab:orange", alpha=0.4)
        ax.set(title=f"seed {full['seed']}: stopped after {stop['trials']} of {full['trials']}",
               xlabel="trials finished")
    axes[0][0].set_ylabel("held-out accuracy, %")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(pairs: list[tuple[dict, dict]], how: str = "each sweep once in full, once with the stopper") -> str:
    from orchestrator.cook.report import text_table

    k = len(pairs)
    rows = []
    for full, stop in pairs:
        g, h = full["rows"]["greedy soup"], stop["rows"]["greedy soup"]
        rows.append({"seed": full["seed"], "trials full": full["trials"], "trials stopped": stop["trials"],
                     "greedy held-out full / stopped": f"{100 * g['heldout']:.2f} / {100 * h['heldout']:.2f}",
                     "greedy test full / stopped": f"{100 * g['test']:.2f} / {100 * h['test']:.2f}",
                     "greedy shift full / stopped": f"{100 * g['shift_mean']:.2f} / {100 * h['shift_mean']:.2f}",
                     "online soup held-out full / stopped":
                         f"{100 * full['rows']['online-greedy soup']['heldout']:.2f} / "
                         f"{100 * stop['rows']['online-greedy soup']['heldout']:.2f}"})
    nf = [f["trials"] for f, _ in pairs]
    ns = [s["trials"] for _, s in pairs]
    saved = [1 - s / f for f, s in zip(nf, ns)]
    lines = [f"Per seed ({k} seeds; {how}):", text_table(rows), ""]
    m, lo, hi = paired([-x for x in saved], [0.0] * k)
    lines.append(f"trials trained: full {mean_std(nf)[0]:.1f}, stopped {mean_std(ns)[0]:.1f}; saved "
                 f"{-100 * m:.1f}% on average (95% interval [{-100 * hi:.1f}, {-100 * lo:.1f}]%)")
    for recipe in ("greedy soup", "online-greedy soup"):
        for metric, label in (("heldout", "held-out"), ("test", "test"), ("shift_mean", "mean shift")):
            d = paired([s["rows"][recipe][metric] for _, s in pairs], [f["rows"][recipe][metric] for f, _ in pairs])
            lines.append(f"{recipe} {label}, stopped minus full: {100 * d[0]:+.2f} points "
                         f"(95% interval [{100 * d[1]:+.2f}, {100 * d[2]:+.2f}])")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--min-delta", type=float, default=0.001)
    p.add_argument("--watch-best", action="store_true", help="sweep.stop.watch_best in the stopped sweeps")
    p.add_argument("--replay", action="store_true",
                   help="sweep each seed in full only and replay both rules on it (see above)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--space", type=Path, default=None, help="default: the demo's world")
    p.add_argument("--out", type=Path, default=None, help="keeps each sweep's result (resumable)")
    p.add_argument("--figure", type=Path, default=None, help="where to draw the curves (PNG)")
    args = p.parse_args(argv)
    from orchestrator.demo import choose_world

    space = args.space or choose_world(None, log=_quiet)
    base = space.read_text()
    out = args.out or Path(tempfile.mkdtemp(prefix="online-soup-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"space {space}, {args.trials} trials, stopper patience {args.patience}, "
          f"min_delta {args.min_delta}{', watching the best trial' if args.watch_best else ''}"
          f"{', replayed' if args.replay else ''}; results in {out}", file=sys.stderr, flush=True)
    kinds = [("full", None)] + ([] if args.replay else [("stopped", args.patience)])
    pairs, fulls = [], []
    # a replay reads the full sweeps' runs again: their store is kept in --out with the results
    with (contextlib.nullcontext(str(out / "store")) if args.replay
          else tempfile.TemporaryDirectory(prefix="online-soup-")) as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        import os

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        for seed in range(args.first_seed, args.first_seed + args.k):
            got = []
            for kind, patience in kinds:
                saved = out / f"{kind}-seed{seed}.json"
                text = space_text(base, seed, args.trials, patience, args.min_delta, args.watch_best)
                # (a replay reads the sweep's runs: only a result whose store is this one will do)
                store = str(work) if args.replay else None
                kept = json.loads(saved.read_text()) if saved.exists() else {}
                if kept.get("space") == text and (store is None or kept.get("store") == store):
                    got.append(kept)
                    continue
                with _stdout_to_stderr():
                    res = {**run_one(text, f"{kind}-seed{seed}", work), "seed": seed, "space": text,
                           "store": store}
                saved.write_text(json.dumps(res, indent=1))
                print(f"seed {seed} {kind}: {res['trials']} trials, greedy test "
                      f"{100 * res['rows']['greedy soup']['test']:.2f}, {res['sweep_seconds']:.0f} s sweep"
                      + (f"; {res['stopped']}" if res["stopped"] else ""), file=sys.stderr, flush=True)
                got.append(res)
            fulls.append(got[0])
            if not args.replay:
                pairs.append((got[0], got[1]))
        replays = {rule: [replay(f, rule, args.patience, args.min_delta, 2, out) for f in fulls]
                   for rule in RULES} if args.replay else {}
    import ray

    ray.shutdown()
    if args.replay:
        for rule, twins in replays.items():
            print(f"== rule: {'the online soup and the best trial' if RULES[rule] else 'the online soup'}, "
                  f"patience {args.patience}, min_delta {args.min_delta} ==")
            print(summary(list(zip(fulls, twins)), "each swept once in full; the stopped sweep replayed on it"))
            print()
        pairs = list(zip(fulls, replays["soup+best" if args.watch_best else "soup"]))
    else:
        print(summary(pairs))
    if args.figure:
        print(f"figure: {figure(pairs, args.figure)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
