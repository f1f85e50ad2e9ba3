"""How a classifier is scored: logits and top-1 accuracy on a split, held-out correct counts in
chunks (for the greedy soup's early rejection), the mean over shifts, and evaluation mode."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.data.splits import Split
from orchestrator.train.accel import CPU, Accel, for_device

StateDict = Mapping[str, torch.Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in evaluation mode (no dropout), put back in the mode it was in afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def logits(model: nn.Module, split: Split, batch_size: int = 512, accel: Accel = CPU) -> torch.Tensor:
    """Logits of `model` on every image of `split`, in order, in the split's own classes.

    Splits over a subset of the model's classes (ImageNet-R, -A, ObjectNet) carry a `project`
    that maps the model's logits onto theirs.
    """
    out = []
    with eval_mode(model):
        for x, _ in split.batches(batch_size, opts=accel.loader):
            with accel.autocast():
                out.append(model(accel.to_device(x)).float().cpu())
    lg = torch.cat(out)
    return split.project(lg) if split.project is not None else lg


def accuracy_of(logit: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of precomputed logits."""
    return (logit.argmax(1) == labels).float().mean().item()


def accuracy(model: nn.Module, split: Split, batch_size: int = 512, accel: Accel = CPU) -> float:
    """Top-1 accuracy of `model` on `split`."""
    return accuracy_of(logits(model, split, batch_size, accel), split.labels)


def evaluate_all(model: nn.Module, splits: dict, accel: Accel = CPU
                 ) -> dict[str, tuple[float, torch.Tensor]]:
    """Accuracy and logits on each named split."""
    out = {}
    for name, split in splits.items():
        lg = logits(model, split, accel=accel)
        out[name] = (accuracy_of(lg, split.labels), lg)
    return out


def shift_mean(accuracies: Mapping[str, float], shifts: Iterable[str]) -> float:
    """Mean accuracy over the distribution shifts `shifts` (nan when there are none)."""
    values = [accuracies[s] for s in shifts]
    return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class HeldoutCounter:
    """Held-out scoring in chunks: ``correct(state)`` yields ``(right, seen)`` per chunk.

    The chunks of one call must cover all `size` examples; accuracy is ``right / size``.
    """

    size: int
    correct: Callable[[StateDict], Iterable[tuple[int, int]]]


def heldout_counter(model: nn.Module, split: Split, chunk_size: int = 64) -> HeldoutCounter:
    """A `HeldoutCounter` that loads each state into `model` and scores `split` in chunks.

    Batches go to the model's device as float in [0, 1] (folder splits yield uint8), and run
    under that device's automatic precision (bf16 autocast on a GPU, as in fine-tuning).
    """
    accel = for_device(next(model.parameters()).device)

    @torch.no_grad()
    def correct(state: StateDict):
        model.load_state_dict(state)
        with eval_mode(model):
            for x, y in split.batches(chunk_size):
                with accel.autocast():
                    out = model(accel.to_device(x))
                yield int((out.argmax(1).cpu() == y).sum()), len(y)

    return HeldoutCounter(len(split), correct)
