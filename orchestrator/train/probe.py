"""The linear-probe head (LP-FT): a class-stratified sample of the training split, its frozen
features computed in batches on the accelerator, and a softmax regression fitted on them.

ImageNet's training split is stored class by class, so its first images cover a few classes only;
the probe draws every class instead, and holds only features (N x D floats), never images.
The regression is the objective of scikit-learn's ``LogisticRegression(C=PROBE_C)`` (mean
cross-entropy plus ``||W||^2 / (2 C N)``, bias unpenalised), minimised by full-batch L-BFGS in
torch on the accelerator where the features already are (on the CPU it is deterministic). On 2
CPU cores 10k features x 512 x 1,000 classes take ~40 s, as scikit-learn does at the same
tolerance; a GPU should take seconds for 50k (an estimate: each step is ~0.15 TFLOP).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orchestrator.data.splits import Split
from orchestrator.train.accel import Accel
from orchestrator.train.evaluate import eval_mode
from orchestrator.train.models import ImageClassifier

PROBE_C = 10.0  # inverse L2 strength, as scikit-learn's C (the head fitted before LP-FT)
LBFGS_MAX_ITER = 500  # L-BFGS iterations (the problem is convex; it stops earlier when converged)
# Converged when the gradient's largest entry is this fraction of its value at the start. A
# relative test: the mean loss's gradient shrinks with the number of classes, and scikit-learn's
# absolute tol=1e-4 stopped at iteration 0 (a zero head) on synthetic 1,000-class features.
GTOL_REL = 1e-4
CHUNK = 65_536  # feature rows per piece of the loss: bounds the logits' memory at 1,000 classes


@dataclass(frozen=True)
class ProbeStats:
    """What fitting the probe head took: images used, classes seen, feature size, seconds."""

    images: int
    classes: int
    feature_dim: int
    seconds: float


def _class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class; a label outside [0, num_classes) or a class without images is an error."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise ValueError(f"label {bad} is outside the model's {num_classes} classes")
    counts = torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ValueError(f"class {empty[0]}{more} has no training image: "
                         "the linear-probe head needs at least one image of every class")
    return counts


def _allocation(counts: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Images to take from each class: as equal as the class sizes allow, summing to
    min(n, total). Water-filling: every class gets min(count, t) for the largest level t that
    fits, and the few left over go one each to randomly chosen classes that still have images."""
    lo, hi = 0, int(counts.max())
    while lo < hi:  # the largest t with sum(min(counts, t)) <= n
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if int(counts.clamp(max=mid).sum()) <= n else (lo, mid - 1)
    take = counts.clamp(max=lo)
    rest = min(n, int(counts.sum())) - int(take.sum())
    spare = (counts > lo).nonzero().flatten()
    take[spare[torch.randperm(len(spare), generator=g)[:rest]]] += 1
    return take


def stratified_sample(labels: torch.Tensor, n: int, num_classes: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded class-stratified sample of `n` images of `labels`.

    Every class is present: each class gives about ``n // num_classes`` images (all of its images
    when it has fewer, the difference spread over the larger classes), and the sample holds
    ``min(n, len(labels))`` images. When `n` is below `num_classes` it is raised to
    `num_classes` (one image a class) with a warning, since a head without some classes
    cannot be fitted. A class with no image at all is a ValueError naming it.
    """
    labels = labels.long().flatten()
    counts = _class_counts(labels, num_classes)
    if n < num_classes:
        warnings.warn(f"probe sample of {n} images raised to {num_classes}: one image of each "
                      "class", stacklevel=2)
        n = num_classes
    g = torch.Generator().manual_seed(seed)
    take = _allocation(counts, n, g)
    perm = torch.randperm(len(labels), generator=g)  # random order within each class ...
    grouped = perm[torch.argsort(labels[perm], stable=True)]  # ... grouped class by class
    start = torch.cumsum(counts, 0) - counts
    cls = labels[grouped]
    rank = torch.arange(len(labels)) - start[cls]
    return grouped[rank < take[cls]].sort().values


@torch.no_grad()
def probe_features(model: ImageClassifier, split: Split, order: torch.Tensor, accel: Accel,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (float32, on the accelerator) and labels of the images `order`
    picks from `split`, computed batch by batch in evaluation mode: images are never held."""
    feats, labels = [], []
    with eval_mode(model):
        for x, y in split.batches(batch_size, order=order, opts=accel.loader):
            with accel.autocast():
                feats.append(model.features(accel.to_device(x)).float())
            labels.append(y.to(accel.device))
    return torch.cat(feats), torch.cat(labels)


def fit_softmax_regression(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           c: float = PROBE_C, max_iter: int = LBFGS_MAX_ITER
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (num_classes, D), bias (num_classes,)) of a multinomial logistic regression:
    scikit-learn's objective with inverse L2 strength `c`, by full-batch L-BFGS from zero."""
    n, d = feats.shape
    w = torch.zeros(num_classes, d, device=feats.device, requires_grad=True)
    b = torch.zeros(num_classes, device=feats.device, requires_grad=True)

    def closure() -> torch.Tensor:
        w.grad = b.grad = None
        total = (w * w).sum() / (2 * c * n)
        total.backward()
        total = total.detach()
        for i in range(0, n, CHUNK):  # the loss piece by piece: logits of one chunk at a time
            part = F.cross_entropy(feats[i:i + CHUNK] @ w.T + b, labels[i:i + CHUNK],
                                   reduction="sum") / n
            part.backward()
            total = total + part.detach()
        return total

    with torch.enable_grad():
        closure()
        gtol = GTOL_REL * max(w.grad.abs().max().item(), b.grad.abs().max().item())
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                                tolerance_grad=gtol, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")
        opt.step(closure)
    return w.detach(), b.detach()


def fit_probe_head(model: ImageClassifier, split: Split, n_images: int, accel: Accel,
                   seed: int = 0, batch_size: int = 256) -> ProbeStats:
    """Replace `model.head` by a logistic-regression probe on frozen features of a seeded
    class-stratified sample of about `n_images` images of `split` (every class present).

    Features are computed on `accel`'s device; the head keeps one row per model class.
    """
    t0 = time.perf_counter()
    num_classes = model.head.out_features
    order = stratified_sample(split.labels, n_images, num_classes, seed)
    dev = model.head.weight.device
    model.to(accel.device)
    feats, labels = probe_features(model, split, order, accel, batch_size)
    weight, bias = fit_softmax_regression(feats, labels, num_classes)
    model.to(dev)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    return ProbeStats(images=len(labels), classes=int(labels.unique().numel()),
                      feature_dim=feats.shape[1], seconds=time.perf_counter() - t0)
