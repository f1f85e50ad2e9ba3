"""One end-to-end fine-tuning run: config in, metrics and weights out; one process or several (DDP).

Knows nothing of Ray or MLflow: `trial` runs it on each Ray Train worker, and tracking records
what it returns. A run of W workers splits every global batch of ``train.batch_size`` images into
W disjoint shards (each worker accumulating over micro-batches of ``train.micro_batch_size``), and
scales each worker's loss so that DDP's gradient average is the gradient of the global batch mean:
the same config trains the same model whatever W is, to float tolerance.

Every random draw is a function of ``(train.seed, epoch, step, image index)``: the epoch's order,
each image's augmentation, each step's mixup coefficient and its partners (each image is mixed
with the previous one of the global batch, a roll by one, as timm pairs by flipping). So no draw
depends on how the batch is sharded, and a run resumed from a checkpoint (`trainstate`) at any
step sees what the uninterrupted run saw: on the CPU the resumed weights are bit-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from orchestrator import data
from orchestrator.config import FinetuneConfig, TrainConfig, batch_split
from orchestrator.data import splits
from orchestrator.train import evaluate, models
from orchestrator.train import state as trainstate
from orchestrator.train.accel import Accel, accel_for
from orchestrator.train.state import Position, TrainState


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
    timings: dict[str, float] = field(default_factory=dict)  # seconds of data, model, evaluation

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


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at `step` of `total`: linear warm-up over `warmup` steps, then
    cosine decay to zero, as in the paper's fine-tuning recipe (and the base model's pretraining)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers (train seed, stream, epoch, step or image index)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


AUGMENT, ORDER, MIXUP = 1, 2, 3  # independent random streams of one run


class Augmenter:
    """The training augmentation of one epoch; ``(image, index)`` in, augmented image out, each
    image's draw seeded by (seed, epoch, index). Picklable, for DataLoader workers. Works on uint8
    images (folder splits, augmented before they become floats) and on float images in [0, 1]."""

    def __init__(self, cfg: TrainConfig, epoch: int):
        self.seed, self.epoch = cfg.seed, epoch
        if cfg.augment == "light":
            self.t = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
        else:
            self.t = v2.RandAugment(num_ops=cfg.randaug_num_ops, magnitude=cfg.randaug_magnitude)
        self.to_uint8 = cfg.augment == "randaugment"

    def __call__(self, img: torch.Tensor, index: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_of(self.seed, AUGMENT, self.epoch, index))
            if self.to_uint8 and img.dtype != torch.uint8:
                return self.t((img * 255).round().to(torch.uint8)).float() / 255
            return self.t(img)


def augmenter(cfg: TrainConfig, epoch: int) -> Augmenter | None:
    return None if cfg.augment == "none" else Augmenter(cfg, epoch)


# --- where this process sits, and what it reports --------------------------------------------

@dataclass(frozen=True)
class Dist:
    """This process's place in its run: rank `rank` of `world` DDP workers (one: no DDP)."""

    rank: int = 0
    world: int = 1

    @property
    def lead(self) -> bool:
        """Rank 0 evaluates, checkpoints and logs."""
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over every worker (in place), the identity for one worker."""
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t


SOLO = Dist()


class Hooks:
    """What the runner around `finetune` does with progress; this base does nothing (a plain
    in-process run). `trial` implements it over Ray Train and MLflow."""

    def resume_folder(self) -> Path | None:
        """The checkpoint folder to resume from, if any (every rank reads it)."""
        return None

    def log_steps(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0: train_loss, lr and images/s at global step `step`."""

    def checkpoint(self, position: Position, metrics: dict, write: Callable[[Path], None] | None) -> None:
        """Every rank, at once: persist a checkpoint; `write(folder)` fills a folder on rank 0
        (None elsewhere). `metrics` are rank 0's (epoch row or step metrics)."""

    def end_epoch(self, row: dict) -> None:
        """Rank 0, after the epoch's checkpoint: the epoch's row."""


@dataclass
class Plan:
    """The step layout of a run: global batch, per-worker shard, micro-batches, steps."""

    n: int  # training images
    batch: int  # global batch
    steps: int  # steps per epoch (a last batch smaller than the number of workers is dropped)
    per_worker: int
    micro: int

    @classmethod
    def of(cls, n: int, tc: TrainConfig, world: int, max_steps: int | None) -> Plan:
        per_worker, _ = batch_split(tc.batch_size, world, tc.micro_batch_size)
        full, rest = divmod(n, tc.batch_size)
        steps = full + (1 if rest >= world else 0)
        if max_steps is not None:
            steps = min(steps, max_steps)
        if steps == 0:
            raise ValueError(f"{n} training images make no step of batch {tc.batch_size} on {world} workers")
        return cls(n, tc.batch_size, steps, per_worker, tc.micro_batch_size or per_worker)

    def micro_slices(self, step: int, rank: int, world: int) -> list[tuple[int, int, int]]:
        """(start, end, batch size) of this worker's micro-batches at `step`, as positions in the
        epoch order; `start` and `end` are offsets into the global batch."""
        b = min(self.batch, self.n - step * self.batch)
        bounds = [round(b * w / world) for w in range(world + 1)] if b < self.batch else \
            [w * self.per_worker for w in range(world + 1)]
        s, e = bounds[rank], bounds[rank + 1]
        return [(ms, min(ms + self.micro, e), b) for ms in range(s, e, self.micro)]


# --- the run ---------------------------------------------------------------------------------

def build_model(cfg: FinetuneConfig, task: splits.TaskData, accel: Accel | None = None,
                lead: bool = True) -> models.ImageClassifier:
    """The starting classifier: pretrained image tower, zero-shot or linear-probe head. The probe
    is fitted on the lead process only: DDP copies rank 0's weights to every worker."""
    model = models.build_classifier(cfg.model, task.classnames)
    if cfg.model.head_init == "linear_probe" and lead:
        from orchestrator.train import probe

        probe.fit_probe_head(model, task.train, cfg.model.probe_images,
                             accel or accel_for(cfg.train, cfg.data.workers), seed=cfg.train.seed)
    return model


def _grad_checkpointing(model: models.ImageClassifier) -> None:
    setter = getattr(model.visual, "set_grad_checkpointing", None)
    if setter is None:
        raise ValueError(f"train.grad_checkpointing: the image tower {type(model.visual).__name__} "
                         "has no activation checkpointing")
    setter(True)


class _Window:
    """Loss and images since the last log line, summed over workers when logged."""

    def __init__(self, device):
        self.device, self.t0 = device, time.perf_counter()
        self.sums = torch.zeros(2, dtype=torch.float64)  # loss * images, images

    def add(self, loss_sum: float, images: int) -> None:
        self.sums += torch.tensor([loss_sum, images], dtype=torch.float64)

    def take(self, dist: Dist) -> tuple[float, float, float]:
        """(mean loss, images, seconds) of the window over every worker; resets it."""
        sums = dist.sum(self.sums.to(self.device)).cpu()
        now = time.perf_counter()
        out = (float(sums[0] / max(sums[1], 1)), float(sums[1]), now - self.t0)
        self.sums.zero_()
        self.t0 = now
        return out


def finetune(cfg: FinetuneConfig, on_epoch: Callable[[dict], None] | None = None,
             task: splits.TaskData | None = None, max_steps: int | None = None, *,
             dist: Dist = SOLO, hooks: Hooks | None = None, device: torch.device | None = None
             ) -> FinetuneResult | None:
    """Fine-tune the classifier end to end and evaluate it on held-out, test and every shift.

    `on_epoch` receives ``{"epoch", "train_loss", "heldout_acc", "lr", "step"}`` after each
    epoch (on rank 0). `max_steps` caps the optimisation steps per epoch (smoke tests of large
    models). With `dist` of several workers the process group must be initialised (Ray Train does)
    and `device` is this worker's device. Returns the result on rank 0 and None elsewhere.
    """
    tc, hooks = cfg.train, hooks or Hooks()
    torch.manual_seed(tc.seed)
    t_start = time.perf_counter()
    task = task or data.load_task(cfg.data)
    t_data = time.perf_counter()
    accel = accel_for(tc, cfg.data.workers)
    if device is not None:
        accel = dataclasses.replace(accel, device=device)
    plan = Plan.of(len(task.train), tc, dist.world, max_steps)
    resume = hooks.resume_folder()
    model = accel.prepare(build_model(cfg, task, accel, lead=dist.lead and resume is None))
    if tc.grad_checkpointing:
        _grad_checkpointing(model)
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[accel.device] if accel.device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    total = tc.epochs * plan.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, tc.warmup_steps, total))
    scaler = accel.scaler()
    state = TrainState()
    if resume is not None:
        state = trainstate.load(resume, model, opt, sched, scaler)
    t0 = time.perf_counter()
    eval_seconds = 0.0
    held = None  # the latest held-out logits (the model after the last epoch trained here)

    def seconds() -> float:
        return state.train_seconds + time.perf_counter() - t0

    def write(folder: Path) -> None:
        trainstate.save(folder, model, opt, sched, scaler,
                        dataclasses.replace(state, train_seconds=seconds()))

    window = _Window(accel.device)
    pos = state.position
    while pos.epoch <= tc.epochs:
        net.train()
        # the epoch so far when resumed mid-epoch (summed over workers; held by rank 0)
        epoch_sums = torch.tensor(state.epoch_loss if dist.lead else [0.0, 0.0], dtype=torch.float64)
        batches = _epoch_batches(task.train, plan, tc, pos.epoch, pos.step, dist, accel)
        for step in range(pos.step, plan.steps):
            loss_sum, images = _step(net, opt, sched, scaler, next(batches), tc, accel, dist, pos.epoch, step)
            epoch_sums += torch.tensor([loss_sum, images], dtype=torch.float64)
            window.add(loss_sum, images)
            pos = Position(pos.epoch, step + 1, pos.global_step + 1)
            state.position = pos
            if pos.global_step % tc.log_every_steps == 0 or step + 1 == plan.steps:  # and at epoch end
                loss, n, secs = window.take(dist)
                if dist.lead:
                    hooks.log_steps(pos.global_step, {"train_loss": loss, "lr": opt.param_groups[0]["lr"],
                                                      "images_per_s": n / max(secs, 1e-9)})
            if tc.checkpoint_every_steps and pos.global_step % tc.checkpoint_every_steps == 0 \
                    and step + 1 < plan.steps:
                so_far = dist.sum(epoch_sums.to(accel.device)).cpu()
                epoch_sums = so_far if dist.lead else torch.zeros_like(so_far)
                state.epoch_loss = so_far.tolist()
                hooks.checkpoint(pos, {"epoch": pos.epoch - 1, "step": pos.global_step},
                                 write if dist.lead else None)
        sums = dist.sum(epoch_sums.to(accel.device)).cpu()
        row = {"epoch": pos.epoch, "step": pos.global_step, "train_loss": float(sums[0] / max(sums[1], 1)),
               "lr": opt.param_groups[0]["lr"]}
        if dist.lead:
            t_eval = time.perf_counter()
            held = evaluate.logits(model, task.heldout, accel=accel)  # the final model's, after the last epoch
            row["heldout_acc"] = evaluate.accuracy_of(held, task.heldout.labels)
            eval_seconds += time.perf_counter() - t_eval
            state.curves.append(row)
        pos = Position(pos.epoch + 1, 0, pos.global_step)
        state.position, state.epoch_loss = pos, [0.0, 0.0]
        hooks.checkpoint(pos, row, write if dist.lead else None)
        if dist.lead:
            hooks.end_epoch(row)
            if on_epoch:
                on_epoch(row)
    if not dist.lead:
        return None
    train_seconds = seconds()
    t_eval = time.perf_counter()
    if held is None:  # resumed after the last epoch: this model has no held-out pass yet
        held = evaluate.logits(model, task.heldout, accel=accel)
    # the last epoch's held-out logits are the final model's: not computed twice
    results = {"heldout": (evaluate.accuracy_of(held, task.heldout.labels), held),
               **evaluate.evaluate_all(model, task.reporting(), accel)}
    timings = {"data": t_data - t_start, "model": t0 - t_data, "heldout_per_epoch": eval_seconds,
               "final_evaluation": time.perf_counter() - t_eval}
    model = model.cpu().to(memory_format=torch.contiguous_format)
    return FinetuneResult(
        config=cfg, curves=state.curves, heldout_acc=results["heldout"][0], test_acc=results["test"][0],
        shift_acc={k: results[k][0] for k in task.shifts},
        logits={k: v[1] for k, v in results.items()},
        state_dict={k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
        train_seconds=train_seconds, timings=timings,
        labels={"heldout": task.heldout.labels, **{k: s.labels for k, s in task.reporting().items()}})


def _epoch_batches(split: splits.Split, plan: Plan, tc: TrainConfig, epoch: int, first_step: int,
                   dist: Dist, accel: Accel):
    """This worker's micro-batches of the epoch from `first_step` on, one list per step: each
    ``(images, labels, partner images, partner labels, global batch size)``; partners are None
    without mixup. One loader pass over the whole sequence, so loader workers start once."""
    order = torch.randperm(plan.n, generator=torch.Generator().manual_seed(seed_of(tc.seed, ORDER, epoch)))
    mix = tc.mixup_alpha > 0
    seq, sizes, layout = [], [], []
    for step in range(first_step, plan.steps):
        base = step * plan.batch
        micros = plan.micro_slices(step, dist.rank, dist.world)
        for s, e, b in micros:
            pos = list(range(s, e))
            if mix:  # the partner of each image is the previous one of the global batch
                pos = [(s - 1) % b] + pos
            seq += [int(order[base + p]) for p in pos]
            sizes.append(len(pos))
        layout.append([(e - s, b) for s, e, b in micros])
    if not seq:
        return iter(())
    loader = split.batches(max(sizes), order=torch.tensor(seq), augment=augmenter(tc, epoch),
                           opts=accel.loader, sizes=sizes)
    return _grouped(loader, layout, mix)


def _grouped(loader, layout, mix: bool):
    for micros in layout:
        group = []
        for n, b in micros:
            x, y = next(loader)
            if mix:
                group.append((x[1:], y[1:], x[:-1], y[:-1], b))
            else:
                group.append((x, y, None, None, b))
        yield group


def _step(net, opt, sched, scaler, micros, tc: TrainConfig, accel: Accel, dist: Dist,
          epoch: int, step: int) -> tuple[float, int]:
    """One optimisation step over this worker's micro-batches; returns (summed loss, images).

    Each micro-batch's loss is its per-image sum scaled by world / global batch, so that DDP's
    average over workers of the accumulated gradients is the gradient of the global batch mean.
    """
    lam = 1.0
    if tc.mixup_alpha > 0:
        lam = float(np.random.default_rng(seed_of(tc.seed, MIXUP, epoch, step)).beta(tc.mixup_alpha, tc.mixup_alpha))
    total, images = 0.0, 0
    for i, (x, y, xp, yp, b) in enumerate(micros):
        sync = i == len(micros) - 1
        ctx = net.no_sync() if (dist.world > 1 and not sync) else contextlib.nullcontext()
        with ctx:
            x, y = accel.to_device(x), y.to(accel.device)
            if xp is not None:
                x = lam * x + (1 - lam) * accel.to_device(xp)
            with accel.autocast():
                out = net(x).float()
                loss = lam * F.cross_entropy(out, y, label_smoothing=tc.label_smoothing, reduction="sum")
                if xp is not None and lam < 1.0:
                    loss = loss + (1 - lam) * F.cross_entropy(out, yp.to(accel.device), reduction="sum",
                                                              label_smoothing=tc.label_smoothing)
            scaler.scale(loss * (dist.world / b)).backward()
        total, images = total + loss.item(), images + len(y)
    scaler.step(opt)
    scaler.update()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total, images
