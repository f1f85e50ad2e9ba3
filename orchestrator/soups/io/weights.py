"""Weights I/O in safetensors and the weighted sums every soup is built from.

`weighted_average` is the in-memory definition; `stream_weighted_sum` computes the same sum
from files (or state dicts) chunk by chunk, holding one output model and a few small buffers
however many ingredients there are. Both accumulate with the same elementwise operation,
``acc.add_(x, alpha=c)``, in the same ingredient order, so they agree bit for bit: an
elementwise result does not depend on how the work is cut into chunks, as long as the kernel
rounds the same way in its vector body and its scalar tail (it does on x86 AVX2/AVX-512 builds,
where both are fused multiply-adds; a build that fused only one of them could differ by one ulp
on a chunk's last few elements, which tests/soups/test_streaming.py would catch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import save_file

from orchestrator.soups.io.stream import (
    Chunk,
    FileSink,
    Ingredient,
    MemorySink,
    StateDict,
    TensorInfo,
    Worker,
    is_file,
    layout,
    map_chunks,
    plan,
)

Coefficients = Sequence[float] | Mapping[str, Sequence[float]]

__all__ = ["StateDict", "Ingredient", "save_weights", "check_compatible",
           "weighted_average", "stream_weighted_sum", "stream_add", "stream_mean_with",
           "stream_dots", "float_keys"]


def save_weights(state: StateDict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors (contiguous CPU tensors; no pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata)
    return path


def _label(ingredient: Ingredient, i: int) -> str:
    return str(ingredient) if is_file(ingredient) else f"ingredient {i}"


def check_compatible(ingredients: Sequence[Ingredient], names: Sequence[str] | None = None
                     ) -> dict[str, TensorInfo]:
    """Refuse to mix ingredients whose keys, shapes or dtypes differ; name the ingredient and tensor.

    Files are checked from their headers alone. Returns the first ingredient's layout.
    """
    if not ingredients:
        raise ValueError("no ingredients to mix")
    names = list(names or [_label(s, i) for i, s in enumerate(ingredients)])
    ref = layout(ingredients[0])
    for name, ing in zip(names[1:], ingredients[1:]):
        other = layout(ing)
        if set(other) != set(ref):
            diff = sorted(set(other) ^ set(ref))
            raise ValueError(f"{name}: tensor {diff[0]!r} is not in both {names[0]} and {name}")
        for k, v in other.items():
            if v.shape != ref[k].shape or v.dtype != ref[k].dtype:
                raise ValueError(f"{name}: tensor {k!r} is {v.shape} {v.dtype}, "
                                 f"{names[0]} has {ref[k].shape} {ref[k].dtype}")
    return ref


def float_keys(infos: Mapping[str, TensorInfo]) -> list[str]:
    """The tensors soups mix: floating ones (integer buffers are copied from one ingredient)."""
    return [k for k, v in infos.items() if v.dtype.is_floating_point]


def weighted_average(states: Sequence[StateDict], coefficients: Sequence[float] | None = None,
                     names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Sum of ``coefficients[i] * states[i]`` per tensor (uniform mean by default), in float32.

    The in-memory reference: every state is held at once. Non-float tensors are the first's.
    """
    check_compatible(states, names)
    coefficients = list(coefficients) if coefficients is not None else [1 / len(states)] * len(states)
    if len(coefficients) != len(states):
        raise ValueError(f"{len(coefficients)} coefficients for {len(states)} state dicts")
    out = {}
    for k, ref in states[0].items():
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for c, sd in zip(coefficients, states):
            acc.add_(sd[k].float(), alpha=float(c))
        out[k] = acc.to(ref.dtype)
    return out


def _per_tensor(coefficients: Coefficients | None, keys: list[str], n: int) -> dict[str, list[float]]:
    """Coefficients as tensor name -> one float per ingredient (global ones repeated)."""
    if coefficients is None:
        coefficients = [1 / n] * n
    if not isinstance(coefficients, Mapping):
        coefficients = {k: coefficients for k in keys}
    out = {k: [float(c) for c in coefficients[k]] for k in keys}
    if any(len(c) != n for c in out.values()):
        raise ValueError(f"coefficients for {len(next(iter(out.values())))} ingredients, got {n}")
    return out


def stream_weighted_sum(ingredients: Sequence[Ingredient], coefficients: Coefficients | None = None,
                        names: Sequence[str] | None = None, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", out: str | Path | None = None,
                        metadata: dict[str, str] | None = None,
                        into: dict[str, torch.Tensor] | None = None, workers: int | None = None):
    """Weighted sum of ingredients (paths or state dicts), read chunk by chunk.

    `coefficients` is one float per ingredient, or a tensor name -> floats mapping (per-layer
    mixing); uniform by default. Float tensors are summed in float32 and returned in the
    ingredients' dtype (or `dtype`) on `device`, or written to the safetensors file `out`
    (then its path is returned and no model is held in memory at all). `into` reuses
    preallocated tensors, and only its tensors are computed. Non-float tensors are copied from
    the first ingredient. The result equals `weighted_average` bit for bit.
    """
    infos = check_compatible(ingredients, names)
    if into is not None:
        infos = {k: v for k, v in infos.items() if k in into}
    n, keys = len(ingredients), float_keys(infos)
    coef = _per_tensor(coefficients, keys, n)
    sink = FileSink(out, infos, metadata) if out is not None else MemorySink(infos, dtype, device, into)
    dev = "cpu" if out is not None else device

    def mix(c: Chunk, w: Worker) -> None:
        if c.key not in coef:
            sink.put(c, w.read(0, c))
            return
        # Chunk-major: this chunk's accumulator stays in cache while every ingredient's chunk
        # is added to it, then it is written once; the output is touched once, not N times.
        acc = sink.target(c)
        acc = (w.scratch("acc", c.count, dev) if acc is None else acc).zero_()
        for i, ci in enumerate(coef[c.key]):
            acc.add_(w.as_float(w.read(i, c), dev), alpha=ci)
        sink.put(c, acc)

    map_chunks(ingredients, plan(infos), mix, workers)
    return sink.close()


def stream_add(total: dict[str, torch.Tensor], ingredient: Ingredient) -> None:
    """``total[k] += ingredient[k].float()`` for every float32 tensor of `total`, chunk by chunk."""
    infos = layout(ingredient)
    dev = next(iter(total.values())).device

    def add(c: Chunk, w: Worker) -> None:
        total[c.key].view(-1)[c.start:c.start + c.count].add_(w.as_float(w.read(0, c), dev))

    map_chunks([ingredient], plan(infos, [k for k in infos if k in total]), add)


def stream_mean_with(total: dict[str, torch.Tensor], ingredient: Ingredient | None, k: int,
                     infos: Mapping[str, TensorInfo], fixed: StateDict) -> dict[str, torch.Tensor]:
    """``(total + ingredient) / k`` (just ``total / k`` without one) in the ingredients' dtypes.

    `total` (a float32 running sum) is left untouched; `fixed` supplies the non-float tensors.
    One new model-sized state dict: the only memory a greedy candidate costs.
    """
    dev = next(iter(total.values())).device
    sink = MemorySink({key: infos[key] for key in total}, device=dev)
    sources = [] if ingredient is None else [ingredient]

    def mean(c: Chunk, w: Worker) -> None:
        part = total[c.key].view(-1)[c.start:c.start + c.count]
        s = sink.target(c)
        s = w.scratch("sum", c.count, dev) if s is None else s
        if ingredient is None:
            torch.div(part, k, out=s)
        else:  # the same two roundings as the in-memory ``(total + x.float()).div_(k)``
            torch.add(part, w.as_float(w.read(0, c), dev), out=s).div_(k)
        sink.put(c, s)

    map_chunks(sources, plan(infos, list(total)), mean)
    return {**{key: v.clone() for key, v in fixed.items()}, **sink.close()}


def stream_dots(ingredients: Sequence[Ingredient], grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``<grads[k], ingredient_i[k]>`` for every tensor k of `grads` and ingredient i, read chunk by
    chunk: a (len(grads), len(ingredients)) float64 tensor on the gradients' device."""
    keys = list(grads)
    row = {k: r for r, k in enumerate(keys)}
    infos = layout(ingredients[0])
    dev = next(iter(grads.values())).device
    shape = (len(keys), len(ingredients))

    def dots(c: Chunk, w: Worker) -> None:
        out = w.local.setdefault("dots", torch.zeros(shape, dtype=torch.float64, device=dev))
        g = grads[c.key].reshape(-1)[c.start:c.start + c.count]
        prod = w.scratch("prod", c.count, dev)
        for i in range(len(ingredients)):
            # float64 accumulation: a coefficient's gradient sums millions of products
            out[row[c.key], i] += torch.mul(g, w.as_float(w.read(i, c), dev), out=prod).sum(dtype=torch.float64)

    pool = map_chunks(ingredients, plan(infos, [k for k in infos if k in grads]), dots)
    return sum((w.local["dots"] for w in pool if "dots" in w.local),
               torch.zeros(shape, dtype=torch.float64, device=dev))
