"""The paper's cook, planned: 72 ViT-B/32 ingredients on ImageNet, every built-in recipe.

`soup cook --plan` reads a sweep's sizes from MLflow (checkpoints and logits from the artifact
listing, split sizes from the data) and prints each phase's forward passes, bytes read and, for
the learned soups, the mode ``auto`` picks and the bytes it holds on the device. This script
feeds the same planning functions (`orchestrator.cook.plan.phases_of`, `learned_plan`) the sizes
such a store would give, without the store or ImageNet on this machine:

- 72 ingredients of 337 MiB (the ViT-B/32 image tower and a 1000-class head in float32, as
  benchmarks/soup_scaling.py writes them);
- their logged logits: every evaluated image x 1000 classes in float16;
- ImageNet's splits as search_spaces/clip_vit_b32_imagenet.yaml sets them: 2% of train held out
  (25,623), val as test (50,000), ImageNetV2 (10,000), ImageNet-R (30,000), ImageNet-Sketch
  (50,889), ObjectNet (18,574), ImageNet-A (7,500);
- the cook's device: one GPU with `--gpu-gib` free (default 80: an H100 or an A100 80GB), and
  `--host-gib` of free host memory beside it (default 128).

Then a wall-time estimate from throughputs given on the command line. THESE ARE ASSUMPTIONS, not
measurements: no GPU was used to write this file. Defaults: 1,500 images/s decoded and
preprocessed by the cook's 8 CPUs (the evaluation is decode-bound), 8,000 images/s of ViT-B/32
forward in bf16 on the GPU, a backward pass costing two forwards, 1 GiB/s read from storage.

    .venv/bin/python benchmarks/paper_cook_plan.py [--gpu-gib 80] [--decode 1500] [--forward 8000] [--read-gib 1]
"""

from __future__ import annotations

import argparse

from orchestrator.config import parse_budget
from orchestrator.cook.meter import MIB
from orchestrator.cook.plan import LEARNED_BATCH, CookPlan, learned_plan, phases_of
from orchestrator.soups.recipe import BUILTIN, RecipeOptions

N, CKPT = 72, 337 * MIB
SPLITS = {"heldout": 25_623, "test": 50_000, "imagenetv2": 10_000, "imagenet_r": 30_000,
          "imagenet_sketch": 50_889, "objectnet": 18_574, "imagenet_a": 7_500}
GIB = 2**30
MEHL_SOUP_PLUS = (808, 19)  # s and GB for 72 ViT-B/32 on one GPU, MEHL-Soup's README


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="free memory of the cook's GPU (GiB)")
    ap.add_argument("--decode", type=float, default=1500.0, help="images/s decoded (assumed)")
    ap.add_argument("--forward", type=float, default=8000.0, help="images/s of forward on the GPU (assumed)")
    ap.add_argument("--read-gib", type=float, default=1.0, help="GiB/s read from storage (assumed)")
    ap.add_argument("--budget", default=None, help="cook.memory_budget (default: 50%% of the free memory)")
    ap.add_argument("--host-gib", type=float, default=128.0,
                    help="free host memory beside the GPU (GiB; default 128): sampled ingredients are held there")
    args = ap.parse_args()
    every = sum(SPLITS.values())
    logits = every * 1000 * 2
    ids = [f"trial-{i:02d}" for i in range(N)]
    plan = CookPlan("paper (synthetic sizes)", "-", N, ids, {}, {}, list(BUILTIN), "cuda, 1 GPU, bf16, 8 CPUs")
    options = RecipeOptions(learned_mode="auto", memory_budget=parse_budget(args.budget) if args.budget else None)
    phases = phases_of(plan, {r: (CKPT, logits) for r in ids}, SPLITS, options, "cuda")
    free = int(args.gpu_gib * GIB)
    for p in phases:  # the learned soups against this GPU's free memory, not this machine's
        if p["name"].startswith("learned"):
            p.update(learned_plan(options, N, N * CKPT, "cuda", free=free, host_free=int(args.host_gib * GIB)))
    print(f"{N} ingredients of {CKPT / MIB:.0f} MiB ({N * CKPT / GIB:.1f} GiB), logits {logits / MIB:.0f} MiB "
          f"each; {every:,} images per model evaluated; a GPU with {args.gpu_gib:g} GiB free")
    print(f"assumed (not measured): {args.decode:,.0f} images/s decoded, {args.forward:,.0f} images/s "
          f"forward, backward = 2 forwards, {args.read_gib:g} GiB/s read\n")
    print(f"{'phase':<20}{'forward passes':>16}{'GiB read':>10}{'GiB held':>10}{'est. s':>9}")
    total = 0.0
    for p in phases:
        learned = p["name"].startswith("learned")
        if learned:  # held-out images decoded once (HELDOUT_LIMIT), steps forward and backward
            fit = p["passes"] - options.learned_steps * LEARNED_BATCH
            gpu = (3 * options.learned_steps * LEARNED_BATCH + fit) / args.forward
            decode = fit / args.decode
        else:
            gpu, decode = p["passes"] / args.forward, p["passes"] / args.decode
        seconds = max(gpu, decode) + p["bytes"] / GIB / args.read_gib
        total += seconds
        held = f"{p['held'] / GIB:10.1f}" if p.get("held") else f"{'':10s}"
        print(f"{p['name']:<20}{('≤ ' if p['bound'] else '') + format(p['passes'], ','):>16}"
              f"{p['bytes'] / GIB:10.1f}{held}{seconds:9.0f}")
    print(f"{'whole cook':<20}{'':16s}{'':10s}{'':10s}{total:9.0f}")
    for p in phases:
        if p.get("mode"):
            print(f"  {p['name']}: {p['mode']}")
    learned = next(p for p in phases if p["name"] == "learned")
    streaming = learned_plan(RecipeOptions(learned_mode="streaming"), N, N * CKPT, "cuda", free=free,
                             host_free=int(args.host_gib * GIB))
    print(f"\nlearned soup: {learned['bytes'] / GIB:.0f} GiB read ({streaming['bytes'] / GIB:,.0f} GiB in "
          f"streaming mode); MEHL-Soup+ reports {MEHL_SOUP_PLUS[0]} s and {MEHL_SOUP_PLUS[1]} GB for the "
          "same 72 ingredients (its own steps and held-out set, measured on a GPU)")


if __name__ == "__main__":
    main()
