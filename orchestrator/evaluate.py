"""Batched evaluation: logits and top-1 accuracy of a classifier on a named split."""

from __future__ import annotations

import torch
from torch import nn

from .accel import CPU, Accel
from .data import FolderSplit, Split


@torch.no_grad()
def logits(model: nn.Module, split: Split | FolderSplit, batch_size: int = 512,
           accel: Accel = CPU) -> torch.Tensor:
    """Logits of `model` on every image of `split`, in order, in the split's own classes.

    Splits over a subset of the model's classes (ImageNet-R, -A, ObjectNet) carry a `project`
    that maps the model's logits onto theirs.
    """
    was_training = model.training
    model.eval()
    out = []
    for x, _ in split.batches(batch_size, opts=accel.loader):
        with accel.autocast():
            out.append(model(accel.to_device(x)).float().cpu())
    model.train(was_training)
    lg = torch.cat(out)
    return split.project(lg) if split.project is not None else lg


def accuracy_of(logit: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of precomputed logits."""
    return (logit.argmax(1) == labels).float().mean().item()


def accuracy(model: nn.Module, split: Split | FolderSplit, batch_size: int = 512,
             accel: Accel = CPU) -> float:
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
