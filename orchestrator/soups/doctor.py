"""The doctor's measurements: why a greedy soup kept what it kept.

The paper gives the tools (Wortsman et al., ICML 2022, Figures 2-4): held-out accuracy along the
line between two fine-tuned solutions, (1 - a) * theta_b + a * theta_i, whose dip below the
straight line between its endpoints (the *barrier*) says whether the two sit in one basin (no
dip: averaging them cannot hurt much) or not (a dip: averaging hurts); and the angle between
their updates from the pretrained weights, theta_i - theta_0 and theta_b - theta_0 (the wider,
the more a 2-model soup gains, as long as both stay in the basin).

`diagnose` measures both for every ingredient against the best one; `findings` turns the table
into sentences, each backed by the numbers it prints, and says nothing when nothing is wrong.
Plain functions over state dicts or safetensors files and an accuracy function: the caller
chooses the held-out images (a seeded, stratified subsample) and counts the forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator.soups.io.stream import Ingredient, is_file, read_weights
from orchestrator.soups.io.weights import StateDict, check_compatible, float_keys

ALPHAS = (0.25, 0.5, 0.75)  # the interior points of each path
BASIN_POINTS = 2.0  # a barrier of this many held-out points or more: outside the best model's basin
PARALLEL_DEGREES = 15.0  # updates closer than this: little to average
FEW_INGREDIENTS = 5  # the paper's greedy soup drew on 72 fine-tunes; below this, few to choose from


@dataclass
class PathRow:
    """One ingredient against the best model (accuracies are fractions, barrier in points)."""

    name: str
    accuracy: dict[float, float]  # a -> held-out accuracy of (1 - a) * best + a * this; a = 0 and 1 too
    barrier: float  # points: how far the path dips below the line between its ends (<= 0: no dip)
    angle: float  # degrees between this update and the best's, from the pretrained weights
    distance: float  # |theta_i - theta_0|
    best_distance: float  # |theta_b - theta_0|
    in_basin: bool
    kept: bool | None = None  # the greedy soup's decision, when known
    params: dict = field(default_factory=dict)  # its searched hyperparameters


def barrier(accuracy: Mapping[float, float]) -> float:
    """In points: the largest dip of the path below the straight line between its ends,
    max over interior a of (1 - a) * acc(0) + a * acc(1) - acc(a)."""
    a0, a1 = accuracy[0.0], accuracy[1.0]
    inner = [a for a in accuracy if 0.0 < a < 1.0]
    return 100 * max((1 - a) * a0 + a * a1 - accuracy[a] for a in inner)


def _state(ingredient: Ingredient) -> StateDict:
    return read_weights(ingredient) if is_file(ingredient) else ingredient


def update_geometry(theta_i: StateDict, theta_b: StateDict, theta_0: StateDict, keys: Sequence[str]
                    ) -> tuple[float, float, float]:
    """(angle in degrees, |theta_i - theta_0|, |theta_b - theta_0|) over the float tensors `keys`,
    accumulated tensor by tensor in float64."""
    dot = ni = nb = 0.0
    for k in keys:
        u = (theta_i[k].double() - theta_0[k].double()).view(-1)
        v = (theta_b[k].double() - theta_0[k].double()).view(-1)
        dot += float(u @ v)
        ni += float(u @ u)
        nb += float(v @ v)
    if ni == 0.0 or nb == 0.0:
        return float("nan"), math.sqrt(ni), math.sqrt(nb)
    cos = max(-1.0, min(1.0, dot / math.sqrt(ni * nb)))
    return math.degrees(math.acos(cos)), math.sqrt(ni), math.sqrt(nb)


def interpolate(a: StateDict, b: StateDict, alpha: float, keys: Sequence[str]) -> StateDict:
    """(1 - alpha) * a + alpha * b on the float tensors `keys`; the others as in `a`."""
    out = dict(a)
    for k in keys:
        out[k] = (1 - alpha) * a[k].float() + alpha * b[k].float()
    return out


def diagnose(ingredients: Sequence[Ingredient], names: Sequence[str], best: int, base: Ingredient,
             accuracy: Callable[[StateDict], float], alphas: Sequence[float] = ALPHAS,
             basin_points: float = BASIN_POINTS, kept: Sequence[int] | None = None,
             params: Sequence[Mapping] | None = None, log: Callable[[str], None] = print) -> list[PathRow]:
    """Every ingredient but `best` against `best`: held-out accuracy (by `accuracy`) along the
    path at `alphas`, its barrier, and the angle between the two updates from `base` (the
    pretrained weights every ingredient was fine-tuned from). One accuracy per ingredient per
    alpha, plus one for each end: (len(alphas) + 1) * (N - 1) + 1 evaluations. Memory: three
    models (the best, the base and one ingredient) plus the one being scored."""
    infos = check_compatible([*ingredients, base], [*names, "base"])
    keys = float_keys(infos)
    theta_b, theta_0 = _state(ingredients[best]), _state(base)
    acc_b = accuracy(theta_b)
    rows = []
    for i, ing in enumerate(ingredients):
        if i == best:
            continue
        theta_i = _state(ing)
        accs = {0.0: acc_b, **{a: accuracy(interpolate(theta_b, theta_i, a, keys)) for a in alphas},
                1.0: accuracy(theta_i)}
        angle, dist, dist_b = update_geometry(theta_i, theta_b, theta_0, keys)
        drop = barrier(accs)
        row = PathRow(names[i], dict(sorted(accs.items())), drop, angle, dist, dist_b, drop < basin_points,
                      None if kept is None else i in kept, dict(params[i]) if params else {})
        log(f"doctor: {row.name}: barrier {drop:+.2f} points, midpoint "
            f"{100 * accs.get(0.5, float('nan')):.2f}%, angle {angle:.1f} degrees")
        rows.append(row)
    return rows


def _shared_range(outside: list[PathRow], inside: list[PathRow]) -> list[str]:
    """Numeric hyperparameters that separate the ingredients outside the basin from those inside."""
    out = []
    for key in sorted({k for r in outside for k in r.params}):
        vo = [r.params.get(key) for r in outside]
        vi = [r.params.get(key) for r in inside]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vo + vi) or not vi:
            continue
        if min(vo) > max(vi):
            out.append(f"all have `{key}` >= {min(vo):.3g} (those inside: <= {max(vi):.3g}): "
                       f"narrow `{key}` below {min(vo):.3g}")
        elif max(vo) < min(vi):
            out.append(f"all have `{key}` <= {max(vo):.3g} (those inside: >= {min(vi):.3g}): "
                       f"narrow `{key}` above {max(vo):.3g}")
    return out


def findings(rows: Sequence[PathRow], heldout_images: int, basin_points: float = BASIN_POINTS,
             parallel_degrees: float = PARALLEL_DEGREES) -> list[str]:
    """What the table says, in sentences that carry their numbers; [] when all is well."""
    said = []
    outside = [r for r in rows if not r.in_basin]
    inside = [r for r in rows if r.in_basin]
    if outside:
        names = ", ".join(r.name for r in outside)
        worst = max(r.barrier for r in outside)
        line = (f"{len(outside)} of {len(rows)} ingredients lose >= {basin_points:g} points on the path "
                f"to the best model (up to {worst:.1f}): outside its basin, averaging them hurts ({names})")
        ranges = _shared_range(outside, inside)
        said.append(line + ("; " + "; ".join(ranges) if ranges else ""))
    parallel = [r for r in inside if r.angle == r.angle and r.angle < parallel_degrees]
    if parallel:
        said.append(f"{len(parallel)} of {len(inside)} ingredients inside the basin are nearly parallel to the "
                    f"best model's update (angle < {parallel_degrees:g} degrees, smallest "
                    f"{min(r.angle for r in parallel):.1f}): little to average; vary them more (augmentation, "
                    "mixup, seeds)")
    if heldout_images and heldout_images < 1000:
        said.append(f"the held-out split has {heldout_images} images: each is {100 / heldout_images:.2f} points, "
                    "so the greedy soup's decisions tie or turn on a few images; hold out more")
    if len(rows) + 1 < FEW_INGREDIENTS:
        said.append(f"{len(rows) + 1} ingredients: few to choose from (the paper's greedy soup drew on 72)")
    return said


__all__ = ["ALPHAS", "BASIN_POINTS", "PathRow", "barrier", "diagnose", "findings", "interpolate",
           "update_geometry"]
