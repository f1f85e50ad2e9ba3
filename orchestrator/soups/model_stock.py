"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024).

Per tensor, the fine-tuned updates d_i = w_i - w_0 from the base weights w_0 meet at an angle
theta (their mean pairwise cosine); with N ingredients, t = N cos / (1 + (N - 1) cos), clamped to
[0, 1], and the tensor is t * mean(w_i) + (1 - t) * w_0. The angle alone says how far to trust
the ingredients' mean over the base: no held-out passes.

Memory stays flat in N, because the mean pairwise cosine needs no pairs: with u_i = d_i / |d_i|,
sum_{i != j} <u_i, u_j> = |sum_i u_i|^2 - sum_i |u_i|^2. Pass 1 streams every ingredient once
for |d_i|; pass 2 streams each once more for sum_i w_i and |sum_i u_i|^2; a last pass over the
base mixes. Both ingredient passes are chunk-major (every ingredient's chunk, then the next
chunk), so sum_i u_i only ever lives as one chunk in scratch space: the one model-sized tensor
held is sum_i w_i in float32, which becomes the soup in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from orchestrator.soups.io.stream import (
    Chunk,
    Ingredient,
    TensorInfo,
    Worker,
    is_file,
    map_chunks,
    plan,
    read_weights,
)
from orchestrator.soups.io.weights import check_compatible, float_keys
from orchestrator.soups.recipe import RecipeInputs, SoupResult, register
from orchestrator.soups.uniform import uniform_soup


@register("model-stock")
def cook_model_stock(inputs: RecipeInputs) -> SoupResult:
    """Model Stock: per tensor, the mean pulled toward the base by the updates' angle; no held-out passes."""
    if inputs.base is None:
        raise ValueError("model-stock needs the base weights the ingredients were fine-tuned from "
                         "(RecipeInputs.base)")
    if len(inputs.ingredients) == 1:  # no angle to measure: the soup of one is that one
        inputs.log("model-stock soup: one ingredient left, no angle between updates: it is that ingredient")
        one = uniform_soup(inputs.ingredients, names=inputs.names)
        return SoupResult("model-stock", one.state_dict, one.coefficients, one.kept, stats={"heldout_passes": 0})
    return model_stock_soup(inputs.ingredients, inputs.base, names=inputs.names, log=inputs.log)


def model_stock_soup(ingredients: Sequence[Ingredient], base: Ingredient,
                     names: Sequence[str] | None = None,
                     log: Callable[[str], None] = print) -> SoupResult:
    """Model Stock of `ingredients` fine-tuned from `base` (safetensors paths or state dicts).

    Float tensors are mixed per tensor as the module docstring says; non-float ones are copied
    from the first ingredient. An update that is all zero (a tensor that ingredient left as it
    was) has no direction: it counts in the mean but not among the pairs of the cosine; with no
    pair of nonzero updates left, t = 1 (the plain mean). Returns coefficients as tensor name ->
    [t / N] * N (the base's weight, 1 - t, is implied) and stats ``t`` and ``cos`` per tensor
    (``cos`` None where no pair was left) and ``heldout_passes`` 0. Refuses fewer than two
    ingredients and a base or ingredients that differ in a tensor, naming it.
    """
    n = len(ingredients)
    if n < 2:
        raise ValueError("model-stock needs at least 2 ingredients")
    infos = _check(ingredients, base, names)
    keys = float_keys(infos)
    sources = [base, *ingredients]
    norms = _update_norms(sources, infos, keys)
    total, spread = _sums(sources, infos, keys, norms)
    angles = [_angle(norms[r], float(spread[r]), n) for r in range(len(keys))]
    cos = dict(zip(keys, (c for c, _ in angles)))
    t = dict(zip(keys, (tk for _, tk in angles)))
    mixed, fixed = _mix_with_base(total, base, infos, t, n), _fixed(ingredients[0], infos, keys)
    state = {k: mixed[k] if k in mixed else fixed[k] for k in infos}
    _log_summary(log, n, list(t.values()))
    return SoupResult("model-stock", state, {k: [tk / n] * n for k, tk in t.items()}, list(range(n)),
                      stats={"t": t, "cos": cos, "heldout_passes": 0})


def _check(ingredients: Sequence[Ingredient], base: Ingredient, names: Sequence[str] | None
           ) -> dict[str, TensorInfo]:
    """The ingredients' layout, once they and the base are known to agree tensor by tensor."""
    infos = check_compatible(ingredients, names)
    first = names[0] if names else (str(ingredients[0]) if is_file(ingredients[0]) else "ingredient 0")
    check_compatible([ingredients[0], base], [first, "the base"])
    return infos


def _base_chunk(c: Chunk, w: Worker) -> torch.Tensor:
    # A copy: the worker's next read reuses the buffer the base's chunk was read into.
    return w.scratch("base", c.count).copy_(w.read(0, c))


def _ingredient_chunk(c: Chunk, w: Worker, i: int) -> torch.Tensor:
    """Chunk `c` of ingredient i in float32 (source i + 1: source 0 is the base)."""
    return w.as_float(w.read(i + 1, c))


def _delta(c: Chunk, w: Worker, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The update w_i - w_0 over chunk `c`, from the ingredient's chunk `x` and the base's."""
    return torch.sub(x, base, out=w.scratch("d", c.count))


def _sum_sq(x: torch.Tensor) -> float:
    """|x|^2 of one chunk, as a Python float: chunks' partials are then added in float64.

    Not ``.sum(dtype=float64)``: that converts the chunk to a float64 temporary first, and kept
    per-chunk results allocated between those temporaries fragment the heap so that it grew by
    about a temporary per chunk (hundreds of MiB for a ViT-B/32). A float32 dot allocates
    nothing, and a chunk is short enough (at most 256k products) for its float32 sum.
    """
    return torch.dot(x, x).item()


def _reduce(pool: list[Worker], keys: list[str], width: int) -> torch.Tensor:
    """The workers' per-chunk partial sums, added per tensor in chunk order: the same bits
    whichever thread took which chunk (files and state dicts then agree exactly)."""
    row = {k: r for r, k in enumerate(keys)}
    parts = {kc: v for w in pool for kc, v in w.local.get("parts", {}).items()}
    out = [[0.0] * width for _ in keys]
    for key, start in sorted(parts, key=lambda kc: (row[kc[0]], kc[1])):
        out[row[key]] = [a + b for a, b in zip(out[row[key]], parts[key, start])]
    return torch.tensor(out, dtype=torch.float64).reshape(len(keys), width)


def _update_norms(sources: list[Ingredient], infos, keys: list[str]) -> torch.Tensor:
    """Pass 1: |w_i - w_0| per float tensor and ingredient, a (len(keys), N) float64 tensor."""
    n = len(sources) - 1

    def norms(c: Chunk, w: Worker) -> None:
        b = _base_chunk(c, w)
        part = [_sum_sq(_delta(c, w, _ingredient_chunk(c, w, i), b)) for i in range(n)]
        w.local.setdefault("parts", {})[c.key, c.start] = part

    return _reduce(map_chunks(sources, plan(infos, keys), norms), keys, n).sqrt()


def _sums(sources: list[Ingredient], infos, keys: list[str], norms: torch.Tensor
          ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pass 2: sum_i w_i per float tensor (float32) and |sum_i u_i|^2 per tensor (float64),
    u_i = d_i / |d_i|, or 0 where d_i is all zero."""
    row = {k: r for r, k in enumerate(keys)}
    inverse = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms)).tolist()
    total = {k: torch.zeros(infos[k].shape, dtype=torch.float32) for k in keys}

    def sums(c: Chunk, w: Worker) -> None:
        b = _base_chunk(c, w)
        acc, unit = total[c.key].view(-1)[c.start:c.start + c.count], w.scratch("u", c.count).zero_()
        for i, scale in enumerate(inverse[row[c.key]]):
            x = _ingredient_chunk(c, w, i)
            acc.add_(x)
            if scale:  # a zero update has no direction: it adds nothing to sum_i u_i
                unit.add_(_delta(c, w, x, b), alpha=scale)
        w.local.setdefault("parts", {})[c.key, c.start] = [_sum_sq(unit)]

    pool = map_chunks(sources, plan(infos, keys), sums)
    return total, _reduce(pool, keys, 1)[:, 0]


def _angle(norms: torch.Tensor, spread: float, n: int) -> tuple[float | None, float]:
    """One tensor's mean pairwise cosine over its nonzero updates (None without a pair) and t."""
    m = int((norms > 0).sum())
    if m < 2:  # no angle to measure: every update (or all but one) is zero, the mean is all there is
        return None, 1.0
    cos = (spread - m) / (m * (m - 1))  # sum over ordered pairs i != j, each |u_i|^2 being 1
    return cos, model_stock_t(cos, n)


def model_stock_t(cos: float, n: int) -> float:
    """The paper's interpolation ratio t = N cos / (1 + (N - 1) cos), clamped to [0, 1].

    Updates that disagree on average (cos <= 0) give t = 0, the base: the formula is only
    meaningful for cos > 0, and with some updates left out for being zero, cos can fall below
    -1/(N - 1), where its denominator changes sign and it would jump back up to 1.
    """
    if cos <= 0:
        return 0.0
    return min(1.0, n * cos / (1 + (n - 1) * cos))


def _mix_with_base(total: dict[str, torch.Tensor], base: Ingredient, infos, t: dict[str, float],
                   n: int) -> dict[str, torch.Tensor]:
    """Last pass: ``total[k] = (t_k / N) total[k] + (1 - t_k) base[k]`` in place, then each
    tensor in the ingredients' dtype."""
    def mix(c: Chunk, w: Worker) -> None:
        acc = total[c.key].view(-1)[c.start:c.start + c.count]
        acc.mul_(t[c.key] / n).add_(w.as_float(w.read(0, c)), alpha=1 - t[c.key])

    map_chunks([base], plan(infos, list(total)), mix)
    return {k: v.to(infos[k].dtype) for k, v in total.items()}


def _fixed(first: Ingredient, infos, keys: list[str]) -> dict[str, torch.Tensor]:
    """The non-float tensors (integer buffers), copied from `first`: nothing to average."""
    floats = set(keys)
    fixed = [k for k in infos if k not in floats]
    return read_weights(first, fixed) if is_file(first) else {k: first[k].clone() for k in fixed}


def _log_summary(log: Callable[[str], None], n: int, ts: list[float]) -> None:
    lo, hi = (min(ts), max(ts)) if ts else (1.0, 1.0)
    mean = sum(ts) / len(ts) if ts else 1.0
    log(f"model-stock soup: {n} ingredients, t from {lo:.3f} to {hi:.3f} over {len(ts)} tensors "
        f"(mean {mean:.3f})")
