"""Batched evaluation: logits and top-1 accuracy of a classifier on a named split."""

from __future__ import annotations

import torch
from torch import nn

from .data import Split


@torch.no_grad()
def logits(model: nn.Module, split: Split, batch_size: int = 512) -> torch.Tensor:
    """Logits of `model` on every image of `split`, in order, computed in batches."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(split.images[i:i + batch_size])
                     for i in range(0, len(split), batch_size)])
    model.train(was_training)
    return out


def accuracy_of(logit: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of precomputed logits."""
    return (logit.argmax(1) == labels).float().mean().item()


def accuracy(model: nn.Module, split: Split, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on `split`."""
    return accuracy_of(logits(model, split, batch_size), split.labels)


def evaluate_all(model: nn.Module, splits: dict[str, Split]) -> dict[str, tuple[float, torch.Tensor]]:
    """Accuracy and logits on each named split."""
    out = {}
    for name, split in splits.items():
        lg = logits(model, split)
        out[name] = (accuracy_of(lg, split.labels), lg)
    return out
