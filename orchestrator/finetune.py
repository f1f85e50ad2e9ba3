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

from . import data, evaluate, models, splits
from .accel import Accel, accel_for
from .config import FinetuneConfig, TrainConfig

PROBE_LIMIT = 50_000  # images the linear-probe head is fitted on (all of the tiny world)


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
        return evaluate.shift_mean(self.shift_acc, self.shift_acc)

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


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at `step` of `total`: linear warm-up over `warmup` steps, then
    cosine decay to zero, as in the paper's fine-tuning recipe (and the base model's pretraining)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _mixup(x, y, alpha: float, g: torch.Generator):
    if alpha <= 0:
        return x, y, y, 1.0
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x), generator=g)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def build_model(cfg: FinetuneConfig, task: splits.TaskData) -> models.ImageClassifier:
    """The starting classifier: pretrained image tower, zero-shot or linear-probe head."""
    model = models.build_classifier(cfg.model, task.classnames)
    if cfg.model.head_init == "linear_probe":
        images, labels = task.train.tensors(limit=PROBE_LIMIT)
        models.set_linear_probe_head(model, images, labels)
    return model


def _step(model, opt, sched, scaler, x, y, cfg: TrainConfig, accel: Accel, g) -> float:
    """One optimisation step (mixup, label smoothing, autocast); returns the batch loss."""
    x, ya, yb, lam = _mixup(accel.to_device(x), y.to(accel.device), cfg.mixup_alpha, g)
    with accel.autocast():
        out = model(x).float()
        loss = lam * F.cross_entropy(out, ya, label_smoothing=cfg.label_smoothing)
        if lam < 1.0:
            loss = loss + (1 - lam) * F.cross_entropy(out, yb, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss.item()


def _train_epoch(model, opt, sched, scaler, task, cfg: TrainConfig, accel: Accel, aug, g,
                 max_steps: int | None = None) -> float:
    model.train()
    perm = torch.randperm(len(task.train), generator=g)
    total, n = 0.0, 0
    for step, (x, y) in enumerate(task.train.batches(cfg.batch_size, perm, aug, accel.loader)):
        if max_steps is not None and step >= max_steps:
            break
        total, n = total + _step(model, opt, sched, scaler, x, y, cfg, accel, g) * len(y), n + len(y)
    return total / max(n, 1)


def finetune(cfg: FinetuneConfig, on_epoch: Callable[[dict], None] | None = None,
             task: splits.TaskData | None = None, max_steps: int | None = None) -> FinetuneResult:
    """Fine-tune the classifier end to end and evaluate it on held-out, test and every shift.

    `on_epoch` receives ``{"epoch", "train_loss", "heldout_acc", "lr"}`` after each epoch.
    `max_steps` caps the optimisation steps per epoch (smoke tests of large models).
    """
    tc = cfg.train
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)
    task = task or data.load_task(cfg.data)
    accel = accel_for(tc, cfg.data.workers)
    model = accel.prepare(build_model(cfg, task))
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    per_epoch = math.ceil(len(task.train) / tc.batch_size)
    total = tc.epochs * (min(per_epoch, max_steps) if max_steps else per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, tc.warmup_steps, total))
    scaler, aug, curves, t0 = accel.scaler(), _augmenter(tc), [], time.perf_counter()
    for epoch in range(1, tc.epochs + 1):
        loss = _train_epoch(model, opt, sched, scaler, task, tc, accel, aug, g, max_steps)
        row = {"epoch": epoch, "train_loss": loss, "lr": opt.param_groups[0]["lr"],
               "heldout_acc": evaluate.accuracy(model, task.heldout, accel=accel)}
        curves.append(row)
        if on_epoch:
            on_epoch(row)
    seconds = time.perf_counter() - t0
    results = evaluate.evaluate_all(model, {"heldout": task.heldout, **task.reporting()}, accel)
    model = model.cpu().to(memory_format=torch.contiguous_format)
    return FinetuneResult(
        config=cfg, curves=curves, heldout_acc=results["heldout"][0], test_acc=results["test"][0],
        shift_acc={k: results[k][0] for k in task.shifts},
        logits={k: v[1] for k, v in results.items()},
        state_dict={k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
        train_seconds=seconds,
        labels={"heldout": task.heldout.labels, **{k: s.labels for k, s in task.reporting().items()}})
