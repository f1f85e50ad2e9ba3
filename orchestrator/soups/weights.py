"""Weights I/O in safetensors and the weighted average every soup is built from."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

StateDict = Mapping[str, torch.Tensor]


def save_weights(state: StateDict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors (contiguous CPU tensors; no pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata)
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict onto the CPU."""
    return load_file(str(path), device="cpu")


def check_compatible(states: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Refuse to mix state dicts whose keys, shapes or dtypes differ; name the state and tensor."""
    names = list(names or [f"ingredient {i}" for i in range(len(states))])
    ref = states[0]
    for name, sd in zip(names[1:], states[1:]):
        if set(sd) != set(ref):
            diff = sorted(set(sd) ^ set(ref))
            raise ValueError(f"{name}: tensor {diff[0]!r} is not in both {names[0]} and {name}")
        for k, v in sd.items():
            if v.shape != ref[k].shape or v.dtype != ref[k].dtype:
                raise ValueError(f"{name}: tensor {k!r} is {tuple(v.shape)} {v.dtype}, "
                                 f"{names[0]} has {tuple(ref[k].shape)} {ref[k].dtype}")


def weighted_average(states: Sequence[StateDict], coefficients: Sequence[float] | None = None,
                     names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Sum of ``coefficients[i] * states[i]`` per tensor (uniform mean by default), in float32."""
    if not states:
        raise ValueError("no state dicts to average")
    check_compatible(states, names)
    coefficients = list(coefficients) if coefficients is not None else [1 / len(states)] * len(states)
    if len(coefficients) != len(states):
        raise ValueError(f"{len(coefficients)} coefficients for {len(states)} state dicts")
    out = {}
    for k, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for c, sd in zip(coefficients, states):
            acc.add_(sd[k].float(), alpha=float(c))
        out[k] = acc.to(ref.dtype) if ref.is_floating_point() else ref.clone()
    return out
