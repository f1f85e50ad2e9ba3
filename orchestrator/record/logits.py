"""Logged logits: what a trial computed on every evaluated split, kept so the cook need not
compute it again.

One safetensors file per trial (no pickle): the logits of each split, each row shifted so that
its largest value is 0 (which changes no argmax, softmax or ensemble argmax) and stored in
float16, which then keeps every argmax exactly and ensemble sums to float16's 11 bits, at 2
bytes per class per image: for ViT-B/32 on
ImageNet (held-out 25,623 + val 50,000 + V2 10,000 + Sketch 50,889 images at 1,000 classes, R
30,000 and A 7,500 at 200, ObjectNet 18,574 at 113) about 278 MiB per trial, 20 GiB for 72.
A split whose logits would overflow float16 is kept in float32. Each split's labels ride along
(int32) with their sha256, and the file names the checkpoint it was computed with: the cook
uses a trial's logits only for that checkpoint, the same split, the same number of examples and
the same labels in the same order (`mismatch`).

The same facts go into the run's tags (`logits_sha256`, `logits_splits`) so that `soup cook
--plan` can tell which trials will be scored again without downloading anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# The file's path in a run and the run's tags about it are `schema`'s (LOGITS_PATH, LOGITS_SHA,
# LOGITS_SPLITS); its metadata names the checkpoint under the run's tag for it (CHECKPOINT_SHA).
from orchestrator.record.schema import CHECKPOINT_SHA

FORMAT = "soup-logits/1"


def labels_sha256(labels: torch.Tensor) -> str:
    """Digest of a split's labels, in order (as int64 little-endian bytes)."""
    return hashlib.sha256(labels.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class SplitLogits:
    """One split's logged logits and the labels they were computed against."""

    logits: torch.Tensor  # (n, classes), each row shifted to a max of 0; float16 (float32 on overflow)
    labels_sha256: str

    @property
    def n(self) -> int:
        return len(self.logits)


def _compact(logits: torch.Tensor) -> torch.Tensor:
    """Each row shifted so that its largest logit is 0, then float16 (float32 if that overflows).

    A per-row shift changes no argmax, no softmax and no ensemble's argmax (a sum of rows each
    shifted by a constant is shifted by a constant), and it keeps the top of every row where
    float16 is finest: raw logits near the logit scale (100) are 0.06 apart in float16, so two
    classes within that tie and the argmax can flip; shifted, the top is exact and its runner-up
    keeps 11 significant bits.
    """
    if logits.numel():
        logits = logits - logits.max(dim=1, keepdim=True).values
    half = logits.to(torch.float16)
    return half if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(logits).all()) \
        else logits.float()


def save_logits(path: str | Path, labeled: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                checkpoint_sha256: str = "") -> Path:
    """Write ``{split: (labels, logits)}`` to `path`, bound to the checkpoint they were computed
    with (its sha256); returns the path."""
    tensors, splits = {}, {}
    for split, (labels, logits) in labeled.items():
        tensors[f"logits/{split}"] = _compact(logits.detach().cpu()).contiguous()
        tensors[f"labels/{split}"] = labels.to(torch.int32).contiguous()
        splits[split] = [len(labels), labels_sha256(labels)]
    save_file(tensors, str(path), metadata={"format": FORMAT, "splits": json.dumps(splits),
                                            CHECKPOINT_SHA: checkpoint_sha256})
    return Path(path)


def splits_tag(labeled: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """The `logits_splits` tag value: each split's size and labels digest."""
    return json.dumps({k: [len(y), labels_sha256(y)] for k, (y, _) in labeled.items()}, sort_keys=True)


def checkpoint_of(path: str | Path) -> str:
    """The sha256 of the checkpoint a logits file was computed with ("" when not recorded)."""
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get(CHECKPOINT_SHA, "")


def load_logits(path: str | Path) -> dict[str, SplitLogits]:
    """Every split of a logits file; the labels digests are recomputed from the stored labels."""
    raw = load_file(str(path))
    return {k[len("logits/"):]: SplitLogits(v, labels_sha256(raw[f"labels/{k[len('logits/'):]}"]))
            for k, v in raw.items() if k.startswith("logits/")}


def mismatch(found: Mapping[str, tuple[int, str]] | None, wanted: Mapping[str, torch.Tensor]) -> str | None:
    """Why logits described by `found` ({split: (n, labels sha256)}) cannot stand for scoring on
    the splits `wanted` ({split: labels}), or None when every split matches."""
    if found is None:
        return "no logged logits"
    for split, labels in wanted.items():
        if split not in found:
            return f"no logged logits for split {split!r}"
        n, digest = found[split]
        if n != len(labels):
            return f"logits for {split!r} cover {n} examples, the split has {len(labels)}"
        if digest != labels_sha256(labels):
            return f"logits for {split!r} were logged for other labels (or another order)"
    return None


def described(split_logits: Mapping[str, SplitLogits]) -> dict[str, tuple[int, str]]:
    """{split: (n, labels sha256)} of loaded logits, for `mismatch`."""
    return {k: (v.n, v.labels_sha256) for k, v in split_logits.items()}


def from_tag(value: str | None) -> dict[str, tuple[int, str]] | None:
    """The `logits_splits` tag parsed, or None when absent or unreadable."""
    try:
        return {k: (int(n), str(d)) for k, (n, d) in json.loads(value).items()} if value else None
    except (ValueError, TypeError):
        return None
