"""Benchmark: soup quality over K sweeps that differ only in their seed, with error bars.

One sweep of the tiny world is noisy (its held-out split decides the greedy soup with a few
hundred images), so this runs K sweeps of one space that differ only in ``sweep.seed`` (the
searched values and each trial's seed; with ``--split-seeds`` also ``data.split_seed``), cooks
each with the cook's recipes, and prints the paper's table (zero-shot, best individual, every
soup, the ensemble and the greedy ensemble; held-out, test, mean shift accuracy) as mean ±
standard deviation over the K sweeps, then each row's paired difference with the best
individual model (per sweep, then averaged) with its 95% interval (Student's t, K - 1 degrees
of freedom). It writes the figure of that table, the paper's Figure 1 with error bars, as a PNG.

Everything runs with the project's own code paths: ``run_sweep`` on a local Ray started for
the run, ``cook`` as a Ray task, a private MLflow store, Ray storage and caches in a temporary
directory (nothing is left in the repository). Each sweep's result is saved as JSON in
``--out`` as soon as it is cooked, and a rerun with the same ``--out`` and the same space skips
the sweeps it already has: a long run that is stopped loses at most the sweep in progress.

    .venv/bin/python benchmarks/soup_quality.py [--space search_spaces/tiny_digits.yaml] [--k 5]
        [--first-seed 0] [--split-seeds] [--recipes uniform,greedy,...] [--out DIR]

The test split and the shifts are reported, never used to choose anything: the greedy soup and
the best individual model are chosen on held-out accuracy by the cook, as always.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "tiny_digits.yaml"
METRICS = (("heldout", "held-out"), ("test", "test"), ("shift_mean", "mean shift"))
FIRST = ("zero-shot", "best individual", "uniform soup", "greedy soup", "learned soup")
LAST = ("ensemble", "greedy ensemble")


def _space_for(text: str, seed: int, split_seed: bool) -> str:
    """The space's YAML with `sweep.seed` (and, with `split_seed`, `data.split_seed`) set to `seed`."""
    space = yaml.safe_load(text)
    space.setdefault("sweep", {})["seed"] = seed
    if split_seed:
        space.setdefault("base", {}).setdefault("data", {})["split_seed"] = seed
    return yaml.safe_dump(space, sort_keys=False)


def _order(names: list[str]) -> list[str]:
    """The paper's order: zero-shot, best individual, uniform, greedy, learned, the other
    recipes in the cook's order, then the ensembles."""
    first = [n for n in FIRST if n in names]
    last = [n for n in LAST if n in names]
    return first + [n for n in names if n not in first and n not in last] + last


def run_one(space_text: str, seed: int, split_seed: bool, recipes: list[str] | None, work: Path) -> dict:
    """Sweep and cook one seed's variant of the space; the cook's rows, ingredients and timings."""
    from orchestrator.cook.driver import cook
    from orchestrator.sweep.driver import run_sweep

    path = work / f"space-seed{seed}.yaml"
    path.write_text(_space_for(space_text, seed, split_seed))
    t0 = time.perf_counter()
    out = run_sweep(path, name=f"quality-seed{seed}", storage_path=str(work / "ray_results"), log=_quiet)
    t1 = time.perf_counter()
    cooked = cook(out.sweep_id, recipes=recipes, log=_quiet)
    t2 = time.perf_counter()
    return {"seed": seed, "split_seed": split_seed, "rows": cooked.rows, "ingredients": cooked.singles,
            "excluded": cooked.excluded, "sweep_seconds": t1 - t0, "cook_seconds": t2 - t1}


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 pointed at stderr for the block (Tune's tables, Ray's processes started
    meanwhile): stdout carries only the tables."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _quiet(line: str) -> None:
    """Progress of the sweeps and cooks goes to stderr; stdout holds the tables."""
    print(f"  {line}", file=sys.stderr, flush=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return m, sd


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences a - b and its 95% interval (Student's t, K - 1 df)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    m, sd = mean_std(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    return m, m - half, m + half


def summarise(results: list[dict]) -> dict:
    """Per row name and metric: the K values (sweeps in seed order), and the paired differences
    with the best individual model."""
    names = _order([r["name"] for r in results[0]["rows"]])
    per = {n: {m: [next(r[m] for r in res["rows"] if r["name"] == n) for res in results]
               for m, _ in METRICS} for n in names
           if all(any(r["name"] == n for r in res["rows"]) for res in results)}
    best = per["best individual"]
    diffs = {n: {m: paired(v[m], best[m]) for m, _ in METRICS} for n, v in per.items()
             if n not in ("best individual", "zero-shot")}
    return {"per": per, "diffs": diffs}


def _pts(x: float) -> str:
    return f"{x * 100:+.2f}" if math.isfinite(x) else "n/a"


def tables(results: list[dict], summary: dict) -> str:
    from orchestrator.cook.report import text_table

    k = len(results)
    per, diffs = summary["per"], summary["diffs"]
    mean_rows = [{"model": n, **{label: "{:.2f} ± {:.2f}".format(*(100 * x for x in mean_std(v[m])))
                                 for m, label in METRICS}} for n, v in per.items()]
    diff_rows = [{"minus best individual": n, **{label: "{} [{}, {}]".format(*map(_pts, d[m]))
                                                 for m, label in METRICS}} for n, d in diffs.items()]
    seeds = [r["seed"] for r in results]
    shown = [n for n in per if n != "zero-shot"]
    sweep_rows = [{"sweep seed": s, **{n: f"{100 * per[n]['test'][i]:.1f} / {100 * per[n]['shift_mean'][i]:.1f}"
                                       for n in shown}} for i, s in enumerate(seeds)]
    return "\n\n".join([
        f"Accuracy (%), mean ± standard deviation over K = {k} sweeps (seeds {seeds}):",
        text_table(mean_rows),
        f"Paired difference with the best individual model, points: mean [95% interval], K = {k}:",
        text_table(diff_rows),
        "Per sweep, test / mean shift (%):",
        text_table(sweep_rows),
    ])


def findings(summary: dict) -> list[str]:
    """The two lines the paper's claim stands on: greedy soup vs best individual, on average,
    strictly above on test and under shift (a greedy soup of the best model alone ties it)."""
    lines = []
    d = summary["diffs"].get("greedy soup")
    if d is None:
        return ["no greedy soup among the recipes: nothing to compare"]
    for m, label in (("test", "test"), ("shift_mean", "mean shift")):
        mean, lo, hi = d[m]
        ok = mean > 0
        lines.append(f"greedy soup > best individual on {label} on average: {'yes' if ok else 'NO'} "
                     f"({_pts(mean)} points, 95% interval [{_pts(lo)}, {_pts(hi)}])")
    return lines


def figure(results: list[dict], summary: dict, path: Path) -> Path:
    """Left: test against mean shift, every ingredient of every sweep (grey) and each row's mean
    with ± one standard deviation both ways. Right: each row's paired difference with the best
    individual model and its 95% interval, on test and under shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per, diffs = summary["per"], summary["diffs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6))
    ings = [i for res in results for i in res["ingredients"]]
    ax1.scatter([100 * i["test"] for i in ings], [100 * i["shift_mean"] for i in ings], s=14,
                color="lightgrey", label=f"fine-tuned runs ({len(ings)})", zorder=1)
    for n, v in per.items():
        if n == "zero-shot":
            continue
        (mx, sx), (my, sy) = mean_std(v["test"]), mean_std(v["shift_mean"])
        soup = n.endswith("soup")
        ax1.errorbar(100 * mx, 100 * my, xerr=100 * sx, yerr=100 * sy, fmt="*" if soup else "D",
                     markersize=14 if soup else 8, capsize=3, label=n, zorder=3)
    ax1.set(xlabel="test accuracy, % (in distribution)", ylabel="mean accuracy over shifts, %",
            title=f"Soups vs fine-tuned runs: mean ± sd over {len(results)} sweeps")
    ax1.legend(fontsize=8)
    names = list(diffs)
    ys = range(len(names))
    for off, (m, label, color) in zip((-0.15, 0.15), (("test", "test", "tab:blue"),
                                                      ("shift_mean", "mean shift", "tab:orange"))):
        mean = [100 * diffs[n][m][0] for n in names]
        err = [[100 * (diffs[n][m][0] - diffs[n][m][1]) for n in names],
               [100 * (diffs[n][m][2] - diffs[n][m][0]) for n in names]]
        ax2.errorbar(mean, [y + off for y in ys], xerr=err, fmt="o", capsize=3, color=color, label=label)
    ax2.axvline(0, color="black", linewidth=0.8)
    ax2.set_yticks(list(ys), names)
    ax2.invert_yaxis()
    ax2.set(xlabel="minus best individual, points (mean and 95% interval)",
            title="Paired difference with the best individual model")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _run_all(todo: list[tuple[int, Path]], space_text: str, split_seed: bool, recipes: list[str] | None,
             digest: str) -> list[dict]:
    """Sweep and cook each (seed, result file) of `todo` in one private workspace and one local
    Ray, saving each result as soon as it is cooked."""
    done = []
    with tempfile.TemporaryDirectory(prefix="soup-quality-work-") as tmp, _stdout_to_stderr():
        work = Path(tmp)
        from orchestrator.demo import hermetic_env

        os.environ.update(hermetic_env(work))
        os.environ.pop("RAY_ADDRESS", None)
        os.environ["HOME"] = str(work)  # Tune's and Ray's defaults under ~ stay in the temp dir
        from orchestrator.runtime import connect

        try:
            for n, (s, f) in enumerate(todo, 1):
                print(f"[{n}/{len(todo)}] sweep seed {s}: sweeping and cooking", file=sys.stderr, flush=True)
                res = {**run_one(space_text, s, split_seed, recipes, work), "recipes": recipes,
                       "space_sha256": digest}
                f.write_text(json.dumps(res, indent=1))
                print(f"[{n}/{len(todo)}] sweep seed {s}: sweep {res['sweep_seconds']:.0f} s, "
                      f"cook {res['cook_seconds']:.0f} s -> {f}", file=sys.stderr, flush=True)
                done.append(res)
        finally:
            connect.shutdown()
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default=str(SPACE))
    p.add_argument("--k", type=int, default=5, help="number of sweeps (default 5)")
    p.add_argument("--first-seed", type=int, default=0, help="sweep seeds are first-seed .. first-seed + k - 1")
    p.add_argument("--split-seeds", action="store_true", help="also set data.split_seed to each sweep's seed")
    p.add_argument("--recipes", help="comma-separated recipes (default: the cook's defaults)")
    p.add_argument("--out", help="results folder (JSON per sweep, the PNG); default: a new temp dir")
    args = p.parse_args(argv)
    if args.k < 2:
        p.error("--k must be at least 2 (a standard deviation needs two sweeps)")
    space_text = Path(args.space).read_text()
    digest = hashlib.sha256(space_text.encode()).hexdigest()[:12]
    out = Path(args.out or tempfile.mkdtemp(prefix="soup-quality-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipes = args.recipes.split(",") if args.recipes else None
    seeds = list(range(args.first_seed, args.first_seed + args.k))
    results, todo = [], []
    for s in seeds:
        f = out / f"sweep-{digest}-seed{s}{'-split' if args.split_seeds else ''}.json"
        if f.exists() and json.loads(f.read_text()).get("recipes") == recipes:
            results.append(json.loads(f.read_text()))
        else:
            todo.append((s, f))
    print(f"space {args.space} (sha256 {digest}), K = {args.k}, seeds {seeds}; "
          f"{len(results)} already in {out}, {len(todo)} to run", file=sys.stderr, flush=True)
    if todo:
        results += _run_all(todo, space_text, args.split_seeds, recipes, digest)
    results.sort(key=lambda r: r["seed"])
    summary = summarise(results)
    print(tables(results, summary))
    print()
    print("\n".join(findings(summary)))
    png = figure(results, summary, out / f"soup_quality_{Path(args.space).stem}.png")
    print(f"\nfigure: {png}\nper-sweep results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
