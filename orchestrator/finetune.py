"""One end-to-end fine-tuning run as a plain function: config in, metrics and weights out.

Knows nothing of Ray or MLflow: the sweep wraps it, and tracking records what it returns.
Deterministic on CPU for a given seed: every random draw (shuffle, augmentation, mixup) comes
from generators seeded from ``train.seed``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from . import data, evaluate, models
from .config import FinetuneConfig, TrainConfig


@dataclass
class FinetuneResult:
    """What one run produces: curves, accuracies, logits on every evaluated split, and weights."""

    config: FinetuneConfig
    curves: list[dict[str, float]]
    heldout_acc: float
    test_acc: float
    shift_acc: dict[str, float]
    logits: dict[str, torch.Tensor]
    state_dict: dict[str, torch.Tensor]
    train_seconds: float
    labels: dict[str, torch.Tensor] = field(default_factory=dict)

    def labeled_logits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(labels, logits) per evaluated split."""
        return {k: (self.labels[k], v) for k, v in self.logits.items()}

    @property
    def shift_mean(self) -> float:
        """Mean accuracy over the distribution shifts (nan when there are none)."""
        return sum(self.shift_acc.values()) / len(self.shift_acc) if self.shift_acc else float("nan")

    def metrics(self) -> dict[str, float]:
        """Flat final metrics: heldout_acc, test_acc, shift_<name>_acc and shift_mean_acc."""
        out = {"heldout_acc": self.heldout_acc, "test_acc": self.test_acc}
        out.update({f"shift_{k}_acc": v for k, v in self.shift_acc.items()})
        out["shift_mean_acc"] = self.shift_mean
        return out


def _augmenter(cfg: TrainConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if cfg.augment == "none":
        return None
    if cfg.augment == "light":
        t = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
        return lambda img: t(img)
    t = v2.RandAugment(num_ops=cfg.randaug_num_ops, magnitude=cfg.randaug_magnitude)
    return lambda img: t((img * 255).round().to(torch.uint8)).float() / 255


def _augment(x: torch.Tensor, aug) -> torch.Tensor:
    # v2 transforms draw one set of parameters per call, so apply them image by image
    return x if aug is None else torch.stack([aug(img) for img in x])


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay, as in the paper's fine-tuning recipe."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _mixup(x, y, alpha: float, g: torch.Generator):
    if alpha <= 0:
        return x, y, y, 1.0
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x), generator=g)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def build_model(cfg: FinetuneConfig, task: data.TaskData) -> models.ImageClassifier:
    """The starting classifier: pretrained image tower, zero-shot or linear-probe head."""
    model = models.build_classifier(cfg.model, task.classnames)
    if cfg.model.head_init == "linear_probe":
        models.set_linear_probe_head(model, task.train.images, task.train.labels)
    return model


def _train_epoch(model, opt, sched, task, cfg: TrainConfig, aug, g) -> float:
    model.train()
    perm = torch.randperm(len(task.train), generator=g)
    total, n = 0.0, 0
    for i in range(0, len(perm), cfg.batch_size):
        idx = perm[i:i + cfg.batch_size]
        x = _augment(task.train.images[idx], aug).to(cfg.device)
        x, ya, yb, lam = _mixup(x, task.train.labels[idx].to(cfg.device), cfg.mixup_alpha, g)
        out = model(x)
        loss = lam * F.cross_entropy(out, ya, label_smoothing=cfg.label_smoothing)
        if lam < 1.0:
            loss = loss + (1 - lam) * F.cross_entropy(out, yb, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total, n = total + loss.item() * len(idx), n + len(idx)
    return total / n


def finetune(cfg: FinetuneConfig, on_epoch: Callable[[dict], None] | None = None,
             task: data.TaskData | None = None) -> FinetuneResult:
    """Fine-tune the classifier end to end and evaluate it on held-out, test and every shift.

    `on_epoch` receives ``{"epoch", "train_loss", "heldout_acc", "lr"}`` after each epoch.
    """
    tc = cfg.train
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)
    task = task or data.load_task(cfg.data)
    model = build_model(cfg, task).to(tc.device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    total = tc.epochs * math.ceil(len(task.train) / tc.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, tc.warmup_steps, total))
    aug, curves, t0 = _augmenter(tc), [], time.perf_counter()
    for epoch in range(1, tc.epochs + 1):
        loss = _train_epoch(model, opt, sched, task, tc, aug, g)
        row = {"epoch": epoch, "train_loss": loss, "lr": opt.param_groups[0]["lr"],
               "heldout_acc": evaluate.accuracy(model, task.heldout)}
        curves.append(row)
        if on_epoch:
            on_epoch(row)
    seconds = time.perf_counter() - t0
    model = model.cpu()
    results = evaluate.evaluate_all(model, {"heldout": task.heldout, **task.reporting()})
    return FinetuneResult(
        config=cfg, curves=curves, heldout_acc=results["heldout"][0], test_acc=results["test"][0],
        shift_acc={k: results[k][0] for k in task.shifts},
        logits={k: v[1] for k, v in results.items()},
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        train_seconds=seconds,
        labels={"heldout": task.heldout.labels, **{k: s.labels for k, s in task.reporting().items()}})
