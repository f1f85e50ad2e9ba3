"""Probe: is a search space in the paper's regime? Measured on the held-out split only.

Choosing a space by the test split would make the test split a second held-out split. This
probe never evaluates on test or on a shift. For each seed it fine-tunes the space's first N
sampled configs (``sweep.sample_configs``: what random search with that seed draws) in this
process, splits the held-out split in two random halves A and B, and measures on B what would
be chosen on A, then the other way round (the two figures averaged):

- the mean ingredient, and the best individual model by A;
- the uniform soup of every ingredient (a soup far below its ingredients means they are not in
  one basin: the paper's first sign of a learning rate that is too high);
- the greedy soup chosen on A (the cook's rule: best first, keep an ingredient when A's
  accuracy does not drop), and how many ingredients it keeps; and the same with the reference
  code's strict rule (keep only when A's accuracy rises: ``soup cook --strict``), and with two
  rules that also read A's cross-entropy, which does not tie the way accuracy on a hundred-odd
  images does: "loss tie-break" (keep when accuracy rises, or ties and the loss falls) and "by
  loss" (keep when the loss does not rise; the order is still by accuracy);
- the logit ensemble of every ingredient.

With several seeds it prints each rule's soup minus the best individual model, and the
ensemble's, per seed and as a mean with its paired 95% interval over the seeds (Student's t): two
seeds that agree can still be luck.

    .venv/bin/python benchmarks/soup_regime.py SPACE.yaml [SPACE.yaml ...] [--seeds 0,1,2] [--n 8]

The fine-tunes are the project's own (``finetune.finetune``), one process, no Ray: the probe
compares spaces, it does not time a sweep.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

from orchestrator.config import SearchSpace, load_yaml
from orchestrator.data import load_task
from orchestrator.soups.io.weights import weighted_average
from orchestrator.sweep.driver import sample_configs
from orchestrator.train import evaluate
from orchestrator.train.finetune import build_model, finetune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soup_quality import paired


def _acc(logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> float:
    return evaluate.accuracy_of(logits[idx], labels[idx])


def _loss(logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[idx].float(), labels[idx]).item()


# greedy acceptance rules: (accuracy, loss) of the soup with the candidate vs. of the soup without
RULES = {
    "greedy": lambda acc, loss, best_acc, best_loss: acc >= best_acc,  # the paper's, the cook's
    "strict greedy": lambda acc, loss, best_acc, best_loss: acc > best_acc,  # the reference code's
    "loss tie-break greedy": lambda acc, loss, best_acc, best_loss: (
        acc > best_acc or (acc == best_acc and loss < best_loss)),
    "by-loss greedy": lambda acc, loss, best_acc, best_loss: loss <= best_loss,
}


def probe(space_path: Path, seed: int, n: int) -> dict:
    space = load_yaml(SearchSpace, space_path)
    cfgs = sample_configs(space, n, seed)
    task = load_task(cfgs[0].data)
    labels = task.heldout.labels
    runs = []
    for i, cfg in enumerate(cfgs):
        t0 = time.perf_counter()
        res = finetune(cfg)
        runs.append(res)
        print(f"  {space_path.name} seed {seed} trial {i}: held-out {res.heldout_acc:.1%} "
              f"lr {cfg.train.lr:.2g} ep {cfg.train.epochs} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    model = build_model(cfgs[0], task)

    @functools.cache  # the rules, and the two halves, often try the same soup (same order)
    def soup_logits(members: tuple[int, ...]) -> torch.Tensor:
        model.load_state_dict(weighted_average([runs[j].state_dict for j in members]))
        return evaluate.logits(model, task.heldout)

    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1000 + seed))
    halves = (perm[: len(perm) // 2], perm[len(perm) // 2:])
    out = {"mean ingredient": 0.0, "best individual": 0.0, "uniform soup": 0.0, "greedy soup": 0.0,
           "ensemble": 0.0, "greedy kept": 0.0}
    uniform = soup_logits(tuple(range(n)))
    ens = sum(r.logits["heldout"] for r in runs)  # the cook's ensemble: summed logits
    out.update({f"{name} {what}": 0.0 for name in RULES for what in ("soup", "kept")})
    for a, b in (halves, halves[::-1]):
        by_a = sorted(range(n), key=lambda i: -_acc(runs[i].logits["heldout"], labels, a))
        for name, accepts in RULES.items():
            current = runs[by_a[0]].logits["heldout"]
            kept, best_a, best_loss = [by_a[0]], _acc(current, labels, a), _loss(current, labels, a)
            for i in by_a[1:]:
                lg = soup_logits((*kept, i))
                got, loss = _acc(lg, labels, a), _loss(lg, labels, a)
                if accepts(got, loss, best_a, best_loss):
                    kept, best_a, best_loss, current = kept + [i], got, loss, lg
            out[f"{name} soup"] += _acc(current, labels, b) / 2
            out[f"{name} kept"] += len(kept) / 2
        out["mean ingredient"] += sum(_acc(r.logits["heldout"], labels, b) for r in runs) / n / 2
        out["best individual"] += _acc(runs[by_a[0]].logits["heldout"], labels, b) / 2
        out["uniform soup"] += _acc(uniform, labels, b) / 2
        out["ensemble"] += _acc(ens, labels, b) / 2
    return out


def report(title: str, got: list[dict]) -> list[str]:
    """The probe's table: each figure's mean and per-seed values, then each soup and the ensemble
    minus the best individual model, per seed and as a mean with its paired 95% interval."""
    lines = [title]
    for k in got[0]:
        vals = [g[k] for g in got]
        fmt = (lambda v: f"{v:.1f}") if k.endswith("kept") else (lambda v: f"{100 * v:.1f}")
        lines.append(f"  {k:28s} mean {fmt(sum(vals) / len(vals)):>5s}   per seed {' '.join(fmt(v) for v in vals)}")
    best = [g["best individual"] for g in got]
    for name in [f"{rule} soup" for rule in RULES] + ["ensemble"]:
        vals = [g[name] for g in got]
        m, lo, hi = paired(vals, best)
        interval = f" [{100 * lo:+.2f}, {100 * hi:+.2f}]" if len(got) > 1 else ""
        per_seed = " ".join(f"{100 * (v - b):+.2f}" for v, b in zip(vals, best))
        lines.append(f"  {name.removesuffix(' soup') + ' - best':28s} mean {100 * m:+.2f} points{interval}   "
                     f"per seed {per_seed}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spaces", nargs="+", type=Path)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n", type=int, default=8, help="fine-tunes per seed (default 8)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    for space in args.spaces:
        got = [probe(space, s, args.n) for s in seeds]
        print("\n".join(report(f"{space.name} (seeds {seeds}, {args.n} fine-tunes each; held-out halves, "
                                "chosen on one, measured on the other)", got)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
