"""Benchmark: folder-split loader throughput, uint8 through the workers vs float32 (the old path).

Writes a synthetic ImageNet tree of JPEGs (~500x375, ~50 KB, like ImageNet's) into a temp dir and, with
the same number of loader worker processes, measures images/s of:

  bare decode  open + convert + resize + centre-crop in the workers, nothing big sent back: the
               ceiling any loader over these files can reach;
  before       what the loader did before: float32 in [0, 1] made in the workers, so 4x the bytes
               cross the worker pipe (and the pinned buffer on a GPU), then `Accel.to_device`;
  after        the real `FolderSplit.batches` (uint8) followed by `Accel.to_device`, which converts
               to float on the device (the CPU here unless CUDA is visible).

Each pass starts its workers afresh, as every epoch does; the paths run interleaved for several
rounds and the median is reported.

    .venv/bin/python benchmarks/loader_throughput.py [--workers 2] [--images 384] [--rounds 5]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from orchestrator.config import DataConfig, TrainConfig
from orchestrator.data.imagenet import ImageFiles, imagenet_wnids, load_imagenet_task
from orchestrator.train.accel import accel_for

CLASSES = 8


class DecodeOnly(ImageFiles):
    """The decode work of `ImageFiles` with nothing big returned: the loader's ceiling."""

    def __getitem__(self, i: int) -> tuple[int, int]:
        with Image.open(self.paths[i]) as f:
            img = f.convert("RGB")
        img = TF.resize(img, self.size, interpolation=TF.InterpolationMode.BICUBIC)
        TF.center_crop(img, [self.size, self.size])
        return 0, self.labels[i]  # a placeholder in the image's place: batches stay (x, y)


class Float32Files(ImageFiles):
    """The old `ImageFiles`: float32 in [0, 1] made in the workers."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return TF.to_dtype(x, torch.float32, scale=True), y


def write_tree(root: Path, n: int) -> None:
    """`n` JPEGs of smooth random content plus grain (they compress like photos, ~50 KB each)."""
    rng = np.random.default_rng(0)
    for k in range(n):  # every 9th image to val: 9 and CLASSES are coprime, so val has every class
        folder = root / "imagenet" / ("val" if k % 9 == 0 else "train") / imagenet_wnids()[k % CLASSES]
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (500, 375) if k % 3 else (375, 500)
        low = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8))
        px = np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.int16)
        px = np.clip(px + rng.integers(-10, 11, px.shape, dtype=np.int16), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(folder / f"img_{k:05d}.JPEG", quality=90)


def timed(batches, accel) -> tuple[float, int]:
    """Seconds to drain `batches` (image batches moved by `accel.to_device`) and images seen."""
    n, t0 = 0, time.perf_counter()
    for x, _ in batches:
        if x.dim() == 4:
            x = accel.to_device(x)
        n += len(x)
    if accel.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def loader(ds, batch: int, accel):
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=accel.loader.workers,
                                       pin_memory=accel.loader.pin_memory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    accel = accel_for(TrainConfig(), args.workers)
    with tempfile.TemporaryDirectory(prefix="soup-loader-") as tmp:
        t0 = time.perf_counter()
        write_tree(Path(tmp), args.images)
        kb = sum(p.stat().st_size for p in Path(tmp).rglob("*.JPEG")) / args.images / 1024
        print(f"wrote {args.images} JPEGs (mean {kb:.0f} KB) in {time.perf_counter() - t0:.1f}s")
        split = load_imagenet_task(DataConfig(dataset="imagenet", root=tmp, image_size=args.size,
                                              heldout_fraction=0.02, shifts=())).train
        ds = split.dataset
        paths = {
            "bare decode": lambda: loader(DecodeOnly(ds.paths, ds.labels, ds.size), args.batch, accel),
            "before (float32 in workers)": lambda: loader(
                Float32Files(ds.paths, ds.labels, ds.size), args.batch, accel),
            "after (uint8, float on device)": lambda: split.batches(args.batch, opts=accel.loader),
        }
        rates = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, make in paths.items():
                seconds, n = timed(make(), accel)
                rates[name].append(n / seconds)
        report(rates, accel, len(split), args)


def report(rates: dict, accel, n: int, args) -> None:
    med = {k: statistics.median(v) for k, v in rates.items()}
    bare, before, after = med.values()
    per_image = 3 * args.size ** 2
    print(f"cores={os.cpu_count()} workers={args.workers} device={accel.device} "
          f"pin_memory={accel.loader.pin_memory} images/pass={n} batch={args.batch} "
          f"size={args.size} rounds={args.rounds}")
    print(f"bytes per image through the workers: float32 {per_image * 4 / 1024:.0f} KiB, "
          f"uint8 {per_image / 1024:.0f} KiB")
    for name, r in med.items():
        spread = ", ".join(f"{x:.0f}" for x in rates[name])
        print(f"  {name:32s} {r:7.1f} images/s  (rounds: {spread})  {r / bare:.2f} of bare decode")
    print(f"after / before: {after / before:.2f}x")


if __name__ == "__main__":
    main()
