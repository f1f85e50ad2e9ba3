"""A fine-tuning run's resumable state on disk: safetensors for tensors, one small JSON for the rest.

A checkpoint folder holds ``model.safetensors`` (the classifier's weights), ``optimizer.safetensors``
(AdamW's per-parameter moments and step counts), ``rng.safetensors`` (torch's CPU and CUDA
generator states) and ``state.json`` (the data position, the scheduler and grad-scaler states,
the optimizer's hyperparameters, Python's and numpy's RNG states, the epoch curves so far). No
pickle anywhere: a checkpoint from shared storage is data, never code.

The data order and every augmentation, mixup and shuffle draw are derived from
``(train.seed, epoch, step, image index)`` (see `finetune`), so the data position is all a resumed
run needs to see the same images in the same order with the same augmentations.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
MODEL, OPTIMIZER, RNG, STATE = "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"


@dataclass
class Position:
    """Where training stands: `epoch` (1-based) is the epoch in progress, of which `step` global
    steps are done; `global_step` counts every optimisation step since the start."""

    epoch: int = 1
    step: int = 0
    global_step: int = 0


@dataclass
class TrainState:
    """Everything but the tensors of model and optimizer."""

    position: Position = field(default_factory=Position)
    curves: list[dict] = field(default_factory=list)  # one row per finished epoch
    train_seconds: float = 0.0  # training time of the earlier attempts
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0.0])  # the epoch so far, all workers: loss sum, images


def save(folder: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched, scaler,
         state: TrainState) -> None:
    """Write the resumable state of a run into `folder` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / MODEL))
    osd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in osd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors or {"_empty": torch.zeros(0)}, str(folder / OPTIMIZER))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(folder / RNG))
    sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    py_state = random.getstate()
    doc = {
        "format": FORMAT,
        "position": asdict(state.position),
        "curves": state.curves,
        "train_seconds": state.train_seconds,
        "epoch_loss": state.epoch_loss,
        "optimizer": {"param_groups": osd["param_groups"], "scalars": scalars},
        "scheduler": sched_state,
        "scaler": scaler.state_dict(),
        "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy": _numpy_state()},
    }
    tmp = folder / (STATE + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(folder / STATE)


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def load(folder: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched, scaler
         ) -> TrainState:
    """Restore model, optimizer, scheduler, scaler and RNG states from `folder` (as `save` wrote
    it) onto the objects given, which must be built as the saved run built them."""
    folder = Path(folder)
    doc = json.loads((folder / STATE).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{folder}: checkpoint format {doc.get('format')!r}, expected {FORMAT}")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(folder / MODEL), device=str(device)))
    tensors = load_file(str(folder / OPTIMIZER), device=str(device))
    tensors.pop("_empty", None)
    state: dict[int, dict] = {}
    for key, value in {**tensors, **doc["optimizer"]["scalars"]}.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for st in state.values():  # AdamW keeps `step` on the CPU unless it runs capturable/fused
        if "step" in st and torch.is_tensor(st["step"]):
            st["step"] = st["step"].cpu()
    opt.load_state_dict({"state": state, "param_groups": doc["optimizer"]["param_groups"]})
    sched.load_state_dict({**sched.state_dict(), **doc["scheduler"]})
    scaler.load_state_dict(doc["scaler"]) if doc["scaler"] else None
    rng = load_file(str(folder / RNG))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = doc["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = doc["rng"]["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return TrainState(Position(**doc["position"]), doc["curves"], doc["train_seconds"], doc["epoch_loss"])


def peek(folder: str | Path) -> TrainState:
    """The position, curves and seconds of a checkpoint folder (reads only its JSON)."""
    doc = json.loads((Path(folder) / STATE).read_text())
    return TrainState(Position(**doc["position"]), doc["curves"], doc["train_seconds"], doc["epoch_loss"])
