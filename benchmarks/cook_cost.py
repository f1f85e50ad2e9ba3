"""Benchmark: the cook's wall time and forward passes, before and after it read the baselines
(each ingredient alone, the logit ensemble, the greedy ensemble) from the logits every trial
logged instead of scoring every checkpoint on every split again.

In one run, in a temporary directory (its own MLflow store, Ray storage and HOME; nothing is left
in the repository), two sweeps are run with the code of this working tree: the tiny sweep
(tests/spaces/tiny4.yaml, 4 trials) and the ViT-B-32 CPU smoke sweep (2 trials of two steps on
synthetic ImageNet-layout folders, a random ViT-B-32 base: `_vit_space`, which
tests/e2e/test_vit_b32_smoke.py also sweeps and cooks).
Each swept store (database and artifacts) is copied once per cook, so that every cook starts
from the same, uncooked store; each copy is cooked in a fresh interpreter, in-process
(``use_ray=False``: the compute is compared, not Ray's start), with the recipes both versions
have (uniform, greedy, learned) and the same number of torch threads: "before" with the code of
git revision REV (``git archive REV | tar -x``, run with ``PYTHONPATH`` set to it), "after" with
the working tree. Wall time, and CPU time (the process's, every thread: steadier than wall on a
shared machine), are those of the ``cook(...)`` call alone (no interpreter start-up, no
imports); forward passes are counted apart from the cook's own counters, by a global forward
pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``) that adds the batch size
of every call of the classifier (``orchestrator.train.models.ImageClassifier``). The after run's own
per-phase table (``CookOutcome.phases``) is printed too, and checked against the hook's count.

    .venv/bin/python benchmarks/cook_cost.py [--before REV] [--only tiny|vit] [--repeats N] [--threads N]

``--before`` defaults to HEAD; ``--repeats`` cooks each store N times per version, round-robin
(the wall shown is the fastest; forward passes must not vary); ``--threads`` is torch's
intra-op threads for both cooks (default 1, the space's default ``cook.resources.cpu``).
A space logged by the current sweep that the older code cannot read (a setting it does not know)
has that setting dropped from the "before" copy's logged space, and the output says which.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("uniform", "greedy", "learned")  # the recipes both versions have
RESULT = "COOK-COST-RESULT "  # the child's result line on stdout
# Where a store keeps absolute paths to its own artifacts (so that a copy points at its copies).
PATH_COLUMNS = {"experiments": ("artifact_location",), "runs": ("artifact_uri",),
                "logged_models": ("artifact_location",), "model_versions": ("source", "storage_location")}
SWEEPS = {"tiny": "the tiny sweep (tests/spaces/tiny4.yaml, 4 trials)",
          "vit": "the ViT-B-32 CPU smoke sweep (2 trials, random base, synthetic images)"}


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 pointed at stderr for the block (Tune's tables, Ray's processes started
    meanwhile): stdout carries only the figures."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# --- the child: one cook, in its own interpreter ----------------------------------------------------

def _child(args) -> None:
    """Cook one store copy with the code on sys.path; print the figures as one JSON line."""
    import importlib
    import inspect

    import torch

    torch.set_num_threads(args.threads)
    import orchestrator

    where = Path(orchestrator.__file__).resolve().parent.parent
    if where != Path(args.tree).resolve():
        sys.exit(f"orchestrator imported from {where}, not from {args.tree}")
    dropped = _readable_space(args.store)
    for mod in ("orchestrator.cook.driver", "orchestrator.cook.build", "orchestrator.cook.report",
                "orchestrator.train.evaluate", "orchestrator.cook", "orchestrator.cook_build", "orchestrator.plots",
                "orchestrator.evaluate", "orchestrator.serving", "orchestrator.soups.learned", "open_clip", "mlflow"):
        with contextlib.suppress(ImportError):  # every import before the clock starts (either layout)
            importlib.import_module(mod)
    try:  # the packages by stage
        from orchestrator.cook.driver import cook
        from orchestrator.train.models import ImageClassifier
    except ImportError:  # a tree from before them (--before a commit of the flat layout)
        from orchestrator.cook import cook
        from orchestrator.models import ImageClassifier

    passes = [0]

    def count(module, inputs) -> None:
        if isinstance(module, ImageClassifier):
            passes[0] += int(inputs[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    kw = {"resources": {"cpu": args.threads}} if "resources" in inspect.signature(cook).parameters else {}
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result line
        t0, c0 = time.perf_counter(), time.process_time()
        out = cook(args.sweep, recipes=RECIPES, tracking_uri=f"sqlite:///{args.store}/mlflow.db",
                   use_ray=False, log=_err, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    handle.remove()
    phases = [{k: p[k] for k in ("name", "passes", "bytes", "seconds")} for p in getattr(out, "phases", None) or []]
    print(RESULT + json.dumps({"wall": wall, "cpu": cpu, "passes": passes[0], "phases": phases, "dropped": dropped,
                               "rows": [r["name"] for r in out.rows], "versions": out.versions,
                               "threads": torch.get_num_threads(), "where": getattr(out, "where", {})}))


def _readable_space(store: str) -> list[str]:
    """Make the sweep's logged space readable by the code under test: settings its SearchSpace
    does not know are dropped (only when the space as logged does not validate). Returns them."""
    import yaml
    from pydantic import BaseModel, TypeAdapter, ValidationError

    from orchestrator.config import SearchSpace

    def prune(model, value: dict, at: str) -> tuple[dict, list[str]]:
        kept, gone = {}, []
        for k, v in value.items():
            f = model.model_fields.get(k)
            if f is None:
                gone.append(at + k)
                continue
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(v, dict):
                v, more = prune(ann, v, f"{at}{k}.")
                gone += more
            else:
                try:  # a value that code does not know (a newer mode): its own default applies
                    TypeAdapter(ann).validate_python(v)
                except ValidationError:
                    gone.append(f"{at}{k}: {v}")
                    continue
            kept[k] = v
        return kept, gone

    dropped: list[str] = []
    for path in Path(store, "mlartifacts").rglob("space/resolved_config.yaml"):
        text = yaml.safe_load(path.read_text())
        try:
            SearchSpace.model_validate(text)
            continue
        except ValidationError:
            pass
        text, gone = prune(SearchSpace, text, "")
        path.write_text(yaml.safe_dump(text, sort_keys=False))
        dropped += gone
    return dropped


# --- the sweeps -------------------------------------------------------------------------------------

def _hermetic(tmp: Path) -> None:
    """A private HOME and Ray token, Ray on loopback, MLflow pointed at the temporary store."""
    home = tmp / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text(uuid.uuid4().hex)
    os.environ.update({"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                       "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                       "PYTHONWARNINGS": "ignore"})
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("XDG_CACHE_HOME", None)  # the tiny world's cache goes under the private HOME
    from orchestrator.runtime.connect import LOOPBACK_ONLY  # imports no ray

    os.environ.update(LOOPBACK_ONLY)


def _images(folder: Path, n: int, seed: int) -> None:
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        w, h = 160 + 40 * (k % 3), 260 - 30 * (k % 2)  # not square: exercises resize + crop
        px = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"img_{k}.JPEG")


def _vit_space(tmp: Path) -> Path:
    """The smoke test's space: the first three ImageNet classes as random JPEGs (4 train and 1
    val image each, ImageNet-R's where it has the class), a seeded random ViT-B-32 base saved
    as a local safetensors file, two learning rates, one epoch of two steps each."""
    import open_clip
    import torch
    import yaml
    from safetensors.torch import save_file

    from orchestrator.data.imagenet import imagenet_r_wnids, imagenet_wnids

    root = tmp / "data"
    for i, w in enumerate(imagenet_wnids()[:3]):
        _images(root / "imagenet" / "train" / w, 4, seed=i)
        _images(root / "imagenet" / "val" / w, 1, seed=100 + i)
        if w in imagenet_r_wnids():
            _images(root / "imagenet-r" / w, 1, seed=200 + i)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    base = tmp / "vit-b-32-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    space = {
        "base": {"model": {"arch": "ViT-B-32", "pretrained": str(base), "templates": ["a photo of a {}."]},
                 "data": {"dataset": "imagenet", "root": str(root), "image_size": 224,
                          "heldout_fraction": 0.25, "shifts": ["imagenet_r"]},
                 "train": {"epochs": 1, "batch_size": 5, "warmup_steps": 1, "augment": "randaugment",
                           "device": "cpu"}},
        "search": {"train.lr": {"grid": [1.0e-5, 3.0e-5]}},
        "sweep": {"num_samples": 1, "max_concurrent_trials": 1, "resources": {"cpu": 1}},
        "tracking": {"experiment_name": "vitb32-smoke"},
    }
    path = tmp / "vitb32_smoke.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def run_sweep(kind: str, tmp: Path) -> dict:
    """Sweep `kind` with this working tree's code into its own store under tmp/kind/store."""
    from orchestrator.sweep.driver import run_sweep as sweep

    root = tmp / kind
    store = root / "store"
    store.mkdir(parents=True)
    if kind == "vit":
        space = _vit_space(root)
    else:
        space = root / "tiny4.yaml"
        shutil.copyfile(REPO / "tests" / "spaces" / "tiny4.yaml", space)
    t0 = time.perf_counter()
    out = sweep(space, name=f"cost-{kind}", storage_path=str(root / "ray_results"),
                tracking_uri=f"sqlite:///{store / 'mlflow.db'}", log=_err)
    if out.failed or not out.finished:
        sys.exit(f"the {kind} sweep did not finish: {out.finished} finished, {out.failed} failed")
    return {"store": store, "sweep_id": out.sweep_id, "trials": out.finished,
            "seconds": time.perf_counter() - t0}


def copy_store(src: Path, dst: Path) -> None:
    """A private copy of a store (database and artifacts), its artifact paths pointing at the copy."""
    shutil.copytree(src, dst)
    with sqlite3.connect(dst / "mlflow.db") as db:
        for table, columns in PATH_COLUMNS.items():
            for col in columns:
                db.execute(f"UPDATE {table} SET {col} = replace({col}, ?, ?)", (str(src), str(dst)))
    db.close()


def cook_copy(sweep: dict, dst: Path, tree: Path, threads: int, cwd: Path) -> dict:
    """Cook a fresh copy of the sweep's store in a new interpreter with the code of `tree`."""
    copy_store(sweep["store"], dst)
    env = {**os.environ, "PYTHONPATH": str(tree), "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow.db'}"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--store", str(dst),
           "--sweep", sweep["sweep_id"], "--tree", str(tree), "--threads", str(threads)]
    run = subprocess.run(cmd, check=False, env=env, cwd=cwd, stdout=subprocess.PIPE,  # stderr: progress
                         text=True)
    shutil.rmtree(dst, ignore_errors=True)
    lines = [s for s in run.stdout.splitlines() if s.startswith(RESULT)]
    if run.returncode != 0 or not lines:
        sys.exit(f"the cook with {tree} failed (exit {run.returncode}); its output is above")
    return json.loads(lines[-1][len(RESULT):])


# --- the report -------------------------------------------------------------------------------------

def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def report(kind: str, sweep: dict, before: list[dict], after: list[dict], rev: str) -> str:
    wb, wa = min(r["wall"] for r in before), min(r["wall"] for r in after)
    pb, pa = before[0]["passes"], after[0]["passes"]
    print(f"\n== {SWEEPS[kind]}: {sweep['trials']} trials, swept in {sweep['seconds']:.0f}s; cooked "
          f"in-process, recipes {', '.join(RECIPES)}, {after[0]['threads']} torch thread(s) ==")
    print(f"{'':24s}{'before ' + rev:>18s}{'after (working tree)':>22s}{'after / before':>16s}")
    print(f"{'cook wall s':24s}{wb:18.1f}{wa:22.1f}{_ratio(wa, wb):>16s}")
    cb, ca = min(r["cpu"] for r in before), min(r["cpu"] for r in after)
    print(f"{'cook CPU s (process)':24s}{cb:18.1f}{ca:22.1f}{_ratio(ca, cb):>16s}")
    print(f"{'forward passes':24s}{pb:18,}{pa:22,}{_ratio(pa, pb):>16s}")
    if len(before) > 1:
        for label, rs in (("before", before), ("after", after)):
            print(f"  {label}, every run: wall " + ", ".join(f"{r['wall']:.1f}" for r in rs)
                  + " s; CPU " + ", ".join(f"{r['cpu']:.1f}" for r in rs) + " s; passes " + ", ".join(f"{r['passes']:,}" for r in rs))
    for label, rs in (("before", before), ("after", after)):
        if len({r["passes"] for r in rs}) > 1:
            print(f"  WARNING: the {label} cook's forward passes varied between runs")
        if rs[0]["dropped"]:
            print(f"  ({label}: dropped from the logged space, unknown to that code: {', '.join(rs[0]['dropped'])})")
    learned = [{p["name"]: p for p in min(rs, key=lambda r: r["wall"])["phases"]}.get("learned")
               for rs in (before, after)]
    if all(learned):
        (lb, la), gib = learned, 2**30
        print(f"{'learned soup GiB read':24s}{lb['bytes'] / gib:18.2f}{la['bytes'] / gib:22.3f}"
              f"{_ratio(la['bytes'], lb['bytes']):>16s}")
        print(f"{'learned soup wall s':24s}{lb['seconds']:18.1f}{la['seconds']:22.1f}"
              f"{_ratio(la['seconds'], lb['seconds']):>16s}")
    phases = min(after, key=lambda r: r["wall"])["phases"]  # the fastest run's
    if phases:
        print("after, the cook's own count per phase (CookOutcome.phases, its fastest run):")
        print(f"  {'phase':<22}{'forward passes':>16}{'MiB read':>12}{'seconds':>10}")
        for p in phases:
            print(f"  {p['name']:<22}{p['passes']:>16,}{p['bytes'] / 2**20:>12,.1f}{p['seconds']:>10.1f}")
        total = sum(p["passes"] for p in phases)
        verdict = "match" if total == pa else "DIFFER"
        print(f"  {'total':<22}{total:>16,}   the hook counted {pa:,}: {verdict}")
    extra = sorted(set(after[0]["rows"]) - set(before[0]["rows"]))
    if extra:
        print(f"  (rows only after: {', '.join(extra)})")
    name = {"tiny": "tiny", "vit": "ViT-B-32"}[kind]
    return (f"{name}: cook wall {wb:.1f}s -> {wa:.1f}s ({_ratio(wa, wb)}x; CPU {cb:.1f}s -> {ca:.1f}s, "
            f"{_ratio(ca, cb)}x), forward passes {pb:,} -> {pa:,} ({_ratio(pa, pb)}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="HEAD", help="the git revision cooked as 'before' (default HEAD)")
    ap.add_argument("--only", choices=sorted(SWEEPS), help="one sweep only (default: both)")
    ap.add_argument("--repeats", type=int, default=1, help="cooks per store and version; the fastest is shown")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every cook (default 1)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--sweep", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    kinds = [args.only] if args.only else ["tiny", "vit"]
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before], check=True,
                         capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="soup-cook-cost-"))
    try:
        _hermetic(tmp)
        old = tmp / "before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        print(f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}; "
              f"before: {rev}, after: the working tree")
        sweeps = {}
        with _stdout_to_stderr():
            for kind in kinds:
                _err(f"sweeping {SWEEPS[kind]} ...")
                sweeps[kind] = run_sweep(kind, tmp)
            import ray

            ray.shutdown()
        summary = []
        for kind in kinds:
            before, after = [], []
            for r in range(args.repeats):  # round-robin: both versions see the same machine state
                for label, tree, runs in (("before", old, before), ("after", REPO, after)):
                    _err(f"cooking the {kind} sweep, {label} ({r + 1}/{args.repeats}) ...")
                    runs.append(cook_copy(sweeps[kind], tmp / kind / f"{label}-{r}", tree, args.threads, tmp))
            summary.append(report(kind, sweeps[kind], before, after, rev))
        print(f"\nload average at end {os.getloadavg()[0]:.2f}")
        for line in summary:
            print(line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
