"""Benchmark: soups that scale to many large ingredients (issue 7).

Builds N synthetic ViT-B/32-sized ingredient checkpoints (the open_clip ViT-B-32 image tower,
random weights, plus a 1000-class head: about 337 MiB each in float32) in a temporary directory,
then prints, in one run:

1. Uniform soup of N files: wall time and peak RSS of ours (written to a file, and returned in
   memory) against the raw read time of the files (read() calls into a reused buffer, on one
   and two threads, and every file memory-mapped and summed: the fastest of these is the floor
   on a warm page cache) and against the reference approach (every state dict loaded with
   safetensors.torch.load_file, then averaged).
2. Learned soup, streaming mode: peak RSS at N = 4, 8 and 16 (two steps on two 224 px images),
   with one coefficient per ingredient (`learned`) and per ingredient per tensor
   (`learned-layerwise`); then Model Stock (`model-stock`, from the ingredients' shared base) at
   the same N. Each prints peak(16) / peak(4): memory must stay flat in N.
   Then the learned soup as the cook runs it by default (``auto``) at the same N under one
   budget (``--budget``, default 2.5GiB): stacked while the N fit, sampled beyond; its own peak
   against the budget, and the bytes it read.
3. Greedy soup on the tiny world (real one-epoch fine-tunes): held-out examples evaluated with
   and without early rejection.

Every measurement runs in a fresh subprocess, so its peak RSS (VmHWM) is that method's own;
wall times exclude interpreter start-up and imports. Sizes in MiB. Files are deleted afterwards.

    .venv/bin/python benchmarks/soup_scaling.py [--n 16] [--repeats 3] [--cache both] [--quick]
        [--only uniform|learned|learned-layerwise|model-stock|scaling|auto|greedy ...] [--budget 2.5GiB]

(`--only scaling` runs the three N-scaling sections of part 2 and nothing else.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1 << 20


# --- workers: each runs in its own interpreter ---------------------------------------------------

def _peak_mb() -> float:
    """This process's peak RSS in MiB. VmHWM, the high-water mark of this process image's own
    memory: ru_maxrss would also count the parent's RSS, inherited through fork and exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (MB if sys.platform == "darwin" else 1024)


def _w_baseline(args) -> dict:
    import torch  # noqa: F401

    if args.imports == "soups":
        import orchestrator.soups.uniform  # noqa: F401
    return {}


def _w_raw(args) -> dict:
    """Every byte read once into a reused 1 MiB buffer: one thread, sequentially."""
    buf = bytearray(MB)
    view = memoryview(buf)
    t = time.perf_counter()
    for path in args.files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return {"wall": time.perf_counter() - t}


def _w_raw_threads(args) -> dict:
    """Every byte read once by two threads taking 1 MiB blocks in turn (ours reads this way)."""
    import queue
    import threading

    blocks: queue.SimpleQueue = queue.SimpleQueue()
    fds = [os.open(p, os.O_RDONLY) for p in args.files]
    for fd, p in zip(fds, args.files):
        for off in range(0, os.path.getsize(p), MB):
            blocks.put((fd, off))

    def read() -> None:
        view = memoryview(bytearray(MB))
        while True:
            try:
                fd, off = blocks.get_nowait()
            except queue.Empty:
                return
            os.preadv(fd, [view], off)

    t = time.perf_counter()
    threads = [threading.Thread(target=read) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"wall": time.perf_counter() - t}


def _w_raw_mmap(args) -> dict:
    """Every file memory-mapped and every byte summed once (numpy, one thread): the bytes brought
    through the CPU without a copy into a buffer, as a reader of mapped safetensors gets them."""
    import mmap

    import numpy as np

    t = time.perf_counter()
    for path in args.files:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            n = len(mm) // 8
            np.frombuffer(mm, dtype=np.uint64, count=n).sum()
            del mm  # the numpy view is gone; the map can close
    return {"wall": time.perf_counter() - t}


def _w_ours(args) -> dict:
    from orchestrator.soups.uniform import uniform_soup

    t = time.perf_counter()
    res = uniform_soup(args.files, out=args.out)
    wall = time.perf_counter() - t
    return {"wall": wall, "tensors": len(res.state_dict) or None}


def _w_reference(args) -> dict:
    from safetensors.torch import load_file

    from orchestrator.soups.io.weights import weighted_average

    t = time.perf_counter()
    states = [load_file(p) for p in args.files]
    weighted_average(states)
    return {"wall": time.perf_counter() - t}


def _learned(args, per_layer: bool) -> dict:
    import torch

    from orchestrator.soups.learned import learned_soup

    model = _vit_classifier()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(2, 3, 224, 224, generator=g), torch.tensor([3, 7])
    before = _peak_mb()
    t = time.perf_counter()
    learned_soup(args.files, model, images, labels, per_layer=per_layer, steps=2, batch_size=2,
                 lr=0.05, mode="streaming", log=lambda s: None)
    return {"wall": time.perf_counter() - t, "before": before}


def _w_learned(args) -> dict:
    return _learned(args, per_layer=False)


def _w_learned_auto(args) -> dict:
    """The learned soup as the cook runs it by default (``auto``) under `--budget`: the mode it
    chose, its own peak (above the process's before the soup) and the bytes it read."""
    import torch

    from orchestrator.config import parse_budget
    from orchestrator.soups.io.stream import bytes_read
    from orchestrator.soups.learned import learned_soup

    model = _vit_classifier()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(2, 3, 224, 224, generator=g), torch.tensor([3, 7])
    lines: list[str] = []
    before, read0 = _peak_mb(), bytes_read()
    t = time.perf_counter()
    learned_soup(args.files, model, images, labels, steps=args.steps, batch_size=2, lr=0.05, mode="auto",
                 memory_budget=parse_budget(args.budget), sample=8, log=lines.append)
    return {"wall": time.perf_counter() - t, "before": before, "chose": lines[0],
            "read_mb": (bytes_read() - read0) / MB}


def _w_learned_layerwise(args) -> dict:
    return _learned(args, per_layer=True)


def _w_model_stock(args) -> dict:
    """Model Stock from the files and their base: its two streamed passes and the mix."""
    from orchestrator.soups.model_stock import model_stock_soup

    before = _peak_mb()
    t = time.perf_counter()
    res = model_stock_soup(args.files, args.base, log=lambda s: None)
    ts = list(res.stats["t"].values())
    return {"wall": time.perf_counter() - t, "before": before, "t_min": min(ts), "t_max": max(ts)}


WORKERS = {"baseline": _w_baseline, "raw": _w_raw, "raw2": _w_raw_threads, "rawmm": _w_raw_mmap, "ours": _w_ours,
           "reference": _w_reference, "learned": _w_learned, "learned-layerwise": _w_learned_layerwise,
           "learned-auto": _w_learned_auto,
           "model-stock": _w_model_stock}


def _vit_classifier():
    """ViT-B/32 image tower (random weights, offline) and a 1000-class head."""
    import open_clip
    import torch

    from orchestrator.train.models import ImageClassifier

    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
    pp = visual.preprocess_cfg
    return ImageClassifier(visual, torch.nn.Linear(visual.output_dim, 1000), pp["mean"], pp["std"])


def _worker_main(args) -> None:
    out = WORKERS[args.worker](args)
    print(json.dumps({**out, "peak_mb": _peak_mb()}))


def _spawn(worker: str, files=(), **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--files", *map(str, files)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode != 0:
        raise RuntimeError(f"{worker} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- the driver ----------------------------------------------------------------------------------

def make_ingredients(n: int, tmp: Path) -> list[Path]:
    """N ViT-B/32 classifier checkpoints: one random base plus a scaled shared perturbation each
    (realistic layout and sizes; the values only need to differ). The base is written too, as
    `base_file(tmp)`: Model Stock's pretrained weights."""
    import torch

    from orchestrator.soups.io.weights import save_weights

    base = {k: v.detach().contiguous() for k, v in _vit_classifier().state_dict().items()}
    save_weights(base, base_file(tmp))
    g = torch.Generator().manual_seed(1)
    noise = {k: torch.randn(v.shape, generator=g) * 1e-3 if v.is_floating_point() else None
             for k, v in base.items()}
    paths = []
    for i in range(n):
        state = {k: v + (i + 1) * noise[k] if noise[k] is not None else v for k, v in base.items()}
        paths.append(save_weights(state, tmp / f"ingredient-{i:02d}.safetensors"))
        del state
    return paths


def base_file(tmp: Path) -> Path:
    """Where `make_ingredients` writes the base every ingredient perturbs."""
    return tmp / "base.safetensors"


def _evict(paths) -> None:
    """Drop the files from the page cache (posix_fadvise DONTNEED): the next read comes from disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_uniform(paths: list[Path], tmp: Path, repeats: int, reference: bool, cold: bool) -> None:
    ckpt = paths[0].stat().st_size / MB
    total = sum(p.stat().st_size for p in paths) / MB
    base_torch = _spawn("baseline", imports="torch")["peak_mb"]
    base_soups = _spawn("baseline", imports="soups")["peak_mb"]
    cache = ("cold page cache: every file evicted (posix_fadvise DONTNEED) before every run"
             if cold else "warm page cache: every file read once before, and still cached")
    print(f"\n== Uniform soup of {len(paths)} ViT-B/32-sized ingredients "
          f"({ckpt:.0f} MiB each, {total / 1024:.2f} GiB in all), {cache} ==")
    print(f"baseline peak RSS of an interpreter that only imported torch: {base_torch:.0f} MiB "
          f"(with orchestrator.soups: {base_soups:.0f} MiB)")
    os.sync()  # the files just written: no writeback competing with the timed reads
    _spawn("raw", paths)  # warm-up: every warm run below starts from the same, warm page cache
    methods = {"raw read (1 thread)": ("raw", {}), "raw read (2 threads)": ("raw2", {}),
               "raw read (mmap, summed)": ("rawmm", {}),
               "ours (to file)": ("ours", {"out": tmp / "soup.safetensors"}), "ours (in memory)": ("ours", {})}
    runs: dict[str, list[dict]] = {k: [] for k in methods}
    for _ in range(repeats):  # round-robin: every method sees the same machine and cache state
        for name, (worker, extra) in methods.items():
            if cold:
                _evict(paths)
            runs[name].append(_spawn(worker, paths, **extra))
            (tmp / "soup.safetensors").unlink(missing_ok=True)
    if reference:
        if cold:
            _evict(paths)
        runs["reference (load_file all, average)"] = [_spawn("reference", paths)]
    _uniform_table(runs, ckpt, base_torch, repeats)


def _uniform_table(runs: dict[str, list[dict]], ckpt: float, base_torch: float, repeats: int) -> None:
    wall = {k: min(r["wall"] for r in rs) for k, rs in runs.items()}
    peak = {k: max(r["peak_mb"] for r in rs) for k, rs in runs.items()}
    raw = min(wall[k] for k in wall if k.startswith("raw read"))  # the fastest way to read the files
    print(f"{'method':38s} {'wall s':>7s} {'/ raw':>6s} {'peak RSS MiB':>12s} {'/ ckpt':>7s} "
          f"{'(peak - torch) / ckpt':>22s}")
    for name in runs:
        print(f"{name:38s} {wall[name]:7.2f} {wall[name] / raw:6.2f} {peak[name]:12.0f} "
              f"{peak[name] / ckpt:7.2f} {(peak[name] - base_torch) / ckpt:22.2f}")
    print(f"wall: min of {repeats} runs, each in a fresh process; '/ raw' divides by the fastest raw "
          f"read ({raw:.2f}s). Every run, in seconds:")
    for name, rs in runs.items():
        print(f"  {name}: " + ", ".join(f"{r['wall']:.2f}" for r in rs))
    ours = "ours (to file)"
    reads = min(wall["raw read (1 thread)"], wall["raw read (2 threads)"])
    print(f"acceptance, peak RSS (absolute) of ours to file <= 2x checkpoint: {peak[ours] / ckpt:.2f}x "
          f"-> {'PASS' if peak[ours] <= 2 * ckpt else 'FAIL'}")
    print(f"acceptance, wall of ours to file <= 1.2x raw read with read() calls ({reads:.2f}s): "
          f"{wall[ours] / reads:.2f}x -> {'PASS' if wall[ours] <= 1.2 * reads else 'FAIL'}")
    print(f"acceptance, wall of ours to file <= 1.2x the fastest raw read ({raw:.2f}s): "
          f"{wall[ours] / raw:.2f}x -> {'PASS' if wall[ours] <= 1.2 * raw else 'FAIL'}")
    print(f"(ours in memory returns the soup as tensors: one checkpoint more, "
          f"{peak['ours (in memory)'] / ckpt:.2f}x absolute, {wall['ours (in memory)'] / raw:.2f}x raw)")


SCALING = {  # part 2's sections: worker -> title
    "learned": "Learned soup, streaming mode (2 steps, 2 images of 224 px, ViT-B/32)",
    "learned-layerwise": "Learned-layerwise soup (one coefficient per ingredient per tensor), streaming "
                         "mode (2 steps, 2 images of 224 px, ViT-B/32)",
    "model-stock": "Model Stock soup (two streamed passes over the ingredients, no held-out passes; the "
                   "synthetic updates are parallel, so t = 1: the cost does not depend on the values)",
}


def bench_learned(paths: list[Path], sizes: list[int], worker: str = "learned") -> None:
    """Peak RSS of one recipe at each N in `sizes` (each in a fresh process), and the ratio of
    the largest N's to the smallest's."""
    ckpt = paths[0].stat().st_size / MB
    extra = {"base": base_file(paths[0].parent)} if worker == "model-stock" else {}
    print(f"\n== {SCALING[worker]} ==")
    print(f"{'N':>3s} {'wall s':>7s} {'peak RSS MiB':>12s} {'/ ckpt':>7s} {'peak before the soup MiB':>25s}")
    peaks = {}
    for n in sizes:
        r = _spawn(worker, paths[:n], **extra)
        peaks[n] = r["peak_mb"]
        print(f"{n:3d} {r['wall']:7.2f} {r['peak_mb']:12.0f} {r['peak_mb'] / ckpt:7.2f} {r['before']:25.0f}"
              + (f"   t from {r['t_min']:.3f} to {r['t_max']:.3f}" if "t_min" in r else ""))
    lo, hi = min(sizes), max(sizes)
    ratio = peaks[hi] / peaks[lo]
    print(f"acceptance (peak at N={hi} <= 1.2x peak at N={lo}): {ratio:.3f}x "
          f"-> {'PASS' if ratio <= 1.2 else 'FAIL'}")


def bench_auto(paths: list[Path], sizes: list[int], budget: str, steps: int) -> None:
    """The cook's default learned mode at each N under one budget: stacked while N fits it, then
    sampled (the largest sample up to 8 that fits); peak RSS above the process's before the soup
    (the model, the images and torch itself) against the budget, and the bytes read."""
    from orchestrator.config import parse_budget

    budget_mb = parse_budget(budget)[1] / MB
    ckpt = paths[0].stat().st_size / MB
    print(f"\n== Learned soup, auto mode, budget {budget} ({budget_mb:,.0f} MiB), {steps} steps, "
          f"2 images of 224 px, ViT-B/32 ==")
    print(f"{'N':>3s} {'mode':>9s} {'k':>3s} {'wall s':>7s} {'peak RSS MiB':>12s} {'soup own MiB':>13s} "
          f"{'/ budget':>9s} {'MiB read':>9s} {'/ N ckpt':>9s}")
    for n in sizes:
        r = _spawn("learned-auto", paths[:n], budget=budget, steps=steps)
        mode = r["chose"].split(": ", 1)[1].split(" ", 1)[0]
        k = r["chose"].split(" sampled per step")[0].rsplit(" ", 1)[-1] if mode == "sampled" else str(n)
        own = r["peak_mb"] - r["before"]
        print(f"{n:3d} {mode:>9s} {k:>3s} {r['wall']:7.1f} {r['peak_mb']:12,.0f} {own:13,.0f} "
              f"{own / budget_mb:9.2f} {r['read_mb']:9,.0f} {r['read_mb'] / (n * ckpt):9.2f}")
        print(f"    {r['chose']}")


def bench_greedy(tmp: Path, n: int) -> None:
    """Real one-epoch fine-tunes of the tiny world, then the greedy soup with and without early
    rejection: same soup, fewer held-out examples."""
    import torch

    from orchestrator import data
    from orchestrator.config import FinetuneConfig, validate
    from orchestrator.soups.greedy import greedy_soup
    from orchestrator.soups.io.weights import save_weights
    from orchestrator.train import finetune, models
    from orchestrator.train.evaluate import heldout_counter

    print(f"\n== Greedy soup on the tiny world: {n} one-epoch fine-tunes ==")
    # A sweep's spread of learning rates, as tiny4/tiny_digits sample them, up to one too high
    settings = [(3e-4, 0), (1e-3, 1), (1e-4, 2), (3e-3, 3), (1e-2, 4), (5e-4, 5), (2e-4, 6), (2e-3, 7)][:n]
    t0 = time.perf_counter()
    paths, scores = [], []
    for i, (lr, seed) in enumerate(settings):
        cfg = validate(FinetuneConfig, {"train": {"epochs": 1, "batch_size": 128, "warmup_steps": 2,
                                                  "lr": lr, "seed": seed, "device": "cpu"}})
        res = finetune.finetune(cfg)
        paths.append(save_weights(res.state_dict, tmp / f"tiny-{i}.safetensors"))
        scores.append(res.heldout_acc)
    task = data.load_task(cfg.data)
    model = models.build_classifier(cfg.model, task.classnames)
    print(f"fine-tuned in {time.perf_counter() - t0:.0f}s; held-out accuracies: "
          + ", ".join(f"{s:.1%}" for s in scores) + f" (held-out set: {len(task.heldout)} examples)")
    counter = heldout_counter(model, task.heldout, chunk_size=32)
    plain, fast = (greedy_soup(paths, counter, scores, log=lambda s: None, early_reject=early)
                   for early in (False, True))
    same = plain.kept == fast.kept and all(torch.equal(plain.state_dict[k], fast.state_dict[k])
                                           for k in plain.state_dict)
    print(f"{'':18s} {'held-out examples evaluated':>28s}  per ingredient, best first")
    for name, res in (("plain", plain), ("early rejection", fast)):
        per = ", ".join(f"{s['evaluated']}{'*' if s['rejected_early'] else ''}" for s in res.steps)
        print(f"{name:18s} {res.stats['heldout_evaluated']:28d}  {per}")
    print(f"(* rejected early) kept {fast.kept}, soup held-out {fast.heldout_acc:.1%}; "
          f"identical soup and kept list: {same}; examples saved: "
          f"{1 - fast.stats['heldout_evaluated'] / plain.stats['heldout_evaluated']:.0%}")


def _ingredients(n: int, tmp: Path) -> list[Path]:
    need = (n + 2) * 340 * MB  # the ingredients, their base and a soup
    free = shutil.disk_usage(tmp).free
    if free < need * 1.1:
        sys.exit(f"need about {need / 2**30:.1f} GiB free in {tmp.parent}, have {free / 2**30:.1f}")
    t = time.perf_counter()
    paths = make_ingredients(n, tmp)
    print(f"wrote {n} ingredient files in {time.perf_counter() - t:.0f}s")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="ingredients for the uniform soup (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="runs per uniform method; the min is shown")
    p.add_argument("--quick", action="store_true", help="one repeat, no reference, 4 tiny fine-tunes")
    p.add_argument("--greedy-n", type=int, default=6, help="tiny-world fine-tunes for the greedy soup")
    p.add_argument("--only", choices=["uniform", *SCALING, "scaling", "auto", "greedy"], action="append",
                   help="run only these parts (repeatable; default: all; scaling: the three "
                        "N-scaling sections: learned, learned-layerwise, model-stock)")
    p.add_argument("--cache", choices=["warm", "cold", "both"], default="both",
                   help="uniform soup with the files in the page cache, evicted before every run, or both")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--files", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--imports", default="torch", help=argparse.SUPPRESS)
    p.add_argument("--base", default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", default="2.5GiB", help="the auto section's cook.memory_budget (default 2.5GiB)")
    p.add_argument("--steps", type=int, default=5, help="the auto section's learned steps (default 5)")
    args = p.parse_args()
    if args.worker:
        return _worker_main(args)
    repeats = 1 if args.quick else args.repeats
    n_learned = [s for s in (4, 8, 16) if s <= args.n] or [args.n]
    parts = set(args.only or ["uniform", "scaling", "auto", "greedy"])
    if "scaling" in parts:
        parts |= set(SCALING)
    tmp = Path(tempfile.mkdtemp(prefix="soup-scaling-"))
    try:
        print(f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}")
        if parts & {"uniform", "auto", *SCALING}:
            paths = _ingredients(args.n, tmp)
        if "uniform" in parts:
            for cold in {"warm": [False], "cold": [True], "both": [False, True]}[args.cache]:
                bench_uniform(paths, tmp, repeats, reference=not args.quick, cold=cold)
        for worker in (w for w in SCALING if w in parts):
            bench_learned(paths, n_learned, worker)
        if "auto" in parts:
            bench_auto(paths, n_learned, args.budget, args.steps)
        if "greedy" in parts:
            bench_greedy(tmp, 4 if args.quick else args.greedy_n)
        print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
