"""Benchmark: the trust checks' leakage check (`trust.find_duplicates`) and readable check
(`trust.check_readable`) over a synthetic tree, and what they would cost at ImageNet's size.

    .venv/bin/python benchmarks/leakage_check.py [--files 100000] [--decode 10000] [--big 400] [--workers N]

1. Writes `--files` small image files into a temp dir: train/heldout/test (90/5/5 %), 10 class
   folders each. Writing 100,000 real JPEGs of varied content takes minutes on 2 cores, so each
   file is one of 64 tiny noise JPEGs (8x8 to 15x15, valid and decodable) followed by random
   bytes after its end-of-image marker (decoders ignore them) up to a size drawn from a lognormal
   shaped like ImageNet's (sigma 0.6) scaled down to a median of 4 KiB, so the tree stays ~0.5 GB.
   Every file's bytes are unique, except 8 planted duplicates: copies of training files, 5 in
   held-out and 3 in test. At this scale the sizes are much denser than ImageNet's, so most files
   collide in size (the worst case for the size-first rule); the ImageNet estimate below computes
   ImageNet's own collisions instead.
2. Times `find_duplicates` over it: the stat pass (up to the hashing's first progress call), what
   it examined and hashed, files/s overall, and the planted duplicates found.
3. Measures the prefix stage on `--big` training and as many held-out files of ImageNet's size
   (lognormal, median ~88 KB; each held-out file has a training file's size, so every file is
   read): hashing the first 64 KiB first against hashing whole files (median of 7 rounds each).
4. Times `check_readable` over `--decode` of the small files (then again, answered from its
   cache) and over 400 ImageNet-like JPEGs (500x375, smooth content with grain, quality 95,
   ~117 KB), and extrapolates to ImageNet.
5. Estimates the leakage check at ImageNet's size (1,281,167 train + 50,000 val files, ~140 GB)
   from the measured rates and the size collisions that a draw of that many sizes from the
   ASSUMED size distribution (lognormal, sigma 0.6, mean 105 KB = 140 GB / 1.33 M files, the same
   for train and val) gives. Files are read from the page cache here; a cold disk adds its read
   time, shown at an assumed 500 MB/s.

The whole run takes ~30 s on 2 cores (~0.5 GB written); the temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.data import trust
from orchestrator.data.listing import FileReader, Listing

CLASSES = 10
SPLITS = {"train": 0.90, "heldout": 0.05, "test": 0.05}
PLANTED = {"heldout": 5, "test": 3}
SIGMA = 0.6  # ASSUMED spread of ImageNet's JPEG sizes (log scale)
IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_BYTES = 1_281_167, 50_000, 140e9
DISK_BPS = 500e6  # ASSUMED cold-disk read rate


class Files(FileReader):
    """The folder adapter's reader (`listing.FileReader`) with `where` the path under `root`."""

    def __init__(self, root: Path, rels: list[str]):
        super().__init__(tuple(str(root / r) for r in rels))
        self.root, self.rels = root, rels

    def where(self, i: int) -> str:
        return self.rels[i]


def tiny_jpegs(rng: np.random.Generator, n: int = 64) -> list[bytes]:
    out = []
    for k in range(n):
        side = 8 + k % 8
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def write_tree(root: Path, n: int, rng: np.random.Generator) -> dict[str, Listing]:
    """The small tree (see the module docstring); returns a listing per split."""
    heads = tiny_jpegs(rng)
    counts = {s: round(n * f) for s, f in SPLITS.items()}
    counts["train"] = n - counts["heldout"] - counts["test"]
    listings = {}
    for split, count in counts.items():
        fresh = count - PLANTED.get(split, 0)
        sizes = np.exp(rng.normal(np.log(4096), SIGMA, fresh)).astype(np.int64)
        rels, labels = [], []
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True)
        for k in range(fresh):
            c = k % CLASSES
            rel = f"{split}/class{c}/img{k:06d}.jpg"
            head = heads[k % len(heads)]
            with open(root / rel, "wb") as f:
                f.write(head + rng.bytes(max(16, int(sizes[k]) - len(head))))
            rels.append(rel)
            labels.append(c)
        for j in range(PLANTED.get(split, 0)):  # copies of training files, under other names
            src = listings["train"].reader.where((1000 * j + 7) % len(listings["train"].reader))
            c = int(src.split("/")[1][len("class"):])
            rel = f"{split}/class{c}/copy{j}.jpg"
            shutil.copyfile(root / src, root / rel)
            rels.append(rel)
            labels.append(c)
        listings[split] = Listing(split, Files(root, rels), tuple(labels), tuple(f"class{c}" for c in range(CLASSES)))
    return listings


def imagenet_sizes(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` file sizes from the ASSUMED ImageNet distribution: lognormal, sigma `SIGMA`, mean 105 KB."""
    mean = IMAGENET_BYTES / (IMAGENET_TRAIN + IMAGENET_VAL)
    median = mean / np.exp(SIGMA ** 2 / 2)
    return np.maximum(1000, np.exp(rng.normal(np.log(median), SIGMA, n))).astype(np.int64)


def write_big(root: Path, n: int, rng: np.random.Generator) -> dict[str, Listing]:
    """`n` training and `n` held-out files of ImageNet's sizes, pairwise equal sizes, unique bytes."""
    head = tiny_jpegs(rng, 1)[0]
    sizes = imagenet_sizes(rng, n)
    listings = {}
    for split in ("train", "heldout"):
        (root / split).mkdir(parents=True)
        rels = []
        for k, size in enumerate(sizes):
            rels.append(f"{split}/big{k:04d}.jpg")
            (root / rels[-1]).write_bytes(head + rng.bytes(int(size) - len(head)))
        listings[split] = Listing(split, Files(root, rels), (0,) * n, ("c",))
    return listings


def write_photos(root: Path, n: int, rng: np.random.Generator) -> Listing:
    """`n` ImageNet-like JPEGs: 500x375 or 375x500, smooth random content plus grain, quality 95."""
    root.mkdir(parents=True)
    rels = []
    for k in range(n):
        w, h = (500, 375) if k % 3 else (375, 500)
        low = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8))
        px = np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.int16)
        px = np.clip(px + rng.integers(-20, 21, px.shape, dtype=np.int16), 0, 255).astype(np.uint8)
        rels.append(f"photo{k:04d}.jpg")
        Image.fromarray(px).save(root / rels[-1], quality=95)
    return Listing("train", Files(root, rels), (0,) * n, ("c",))


def timed_duplicates(listings, **kw) -> tuple[trust.Duplicates, float, float]:
    """`find_duplicates` -> (result, seconds to its hashing's first progress call, seconds in all)."""
    first = []
    t0 = time.perf_counter()
    dup = trust.find_duplicates(listings, progress=lambda d, t: first.append(time.perf_counter()) if not first else None, **kw)
    end = time.perf_counter()
    return dup, (first[0] if first else end) - t0, end - t0


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def span(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--decode", type=int, default=10_000, help="small files decoded by check_readable")
    ap.add_argument("--big", type=int, default=400, help="ImageNet-sized files per split for the prefix stage")
    ap.add_argument("--workers", type=int, default=None, help="threads (default: trust's, cores + 4)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="soup-leakage-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        small = write_tree(root / "small", args.files, rng)
        total = sum(os.stat(root / "small" / p).st_size for s in small.values() for p in s.reader.rels)
        counts = ", ".join(f"{trust.words(k)} {len(s.reader):,}" for k, s in small.items())
        print(f"tree: {args.files:,} files ({counts}; {sum(PLANTED.values())} planted duplicates), "
              f"{gb(total)}, written in {time.perf_counter() - t0:.1f} s")

        dup, stat_s, all_s = timed_duplicates(small, workers=args.workers)
        stat_rate = dup.examined / stat_s
        print(f"stat pass: {dup.examined:,} files in {stat_s:.2f} s = {stat_rate:,.0f} files listed/s")
        print(f"leakage: {dup.examined:,} examined, {dup.hashed:,} hashed ({dup.hashed / dup.examined:.0%}; "
              f"{gb(dup.bytes_read)} read) in {all_s:.2f} s = {dup.examined / all_s:,.0f} files/s overall, "
              f"{dup.hashed / max(1e-9, all_s - stat_s):,.0f} hashed/s")
        planted = {(s, r) for s, listing in small.items() for r in listing.reader.rels if "/copy" in r}
        found = {(s, w) for s, w, _ in dup.pairs}
        print(f"planted duplicates found: {len(found & planted)} of {len(planted)} "
              f"({len(found - planted)} others); check_leakage says: ", end="")
        try:
            trust.check_leakage(small, workers=args.workers)
            print("nothing")
        except trust.DataError as e:
            print(str(e)[:150] + " ...")

        big = write_big(root / "big", args.big, rng)
        rounds: dict[int, list[float]] = {trust.PREFIX: [], 0: []}
        read = {}
        for _ in range(7):
            for prefix, times in rounds.items():
                d, _, s = timed_duplicates(big, prefix=prefix, workers=args.workers)
                times.append(s)
                read[prefix] = d.bytes_read
        med = {p: statistics.median(v) for p, v in rounds.items()}
        prefix_bps = read[trust.PREFIX] / med[trust.PREFIX]
        median_kb = float(np.median([os.stat(root / "big" / r).st_size for r in big["train"].reader.rels])) / 1e3
        print(f"prefix stage on {2 * args.big} ImageNet-sized files (median {median_kb:.0f} KB, every size colliding): "
              f"64 KiB prefix {med[trust.PREFIX]:.3f} s, {gb(read[trust.PREFIX])} read; whole files "
              f"{med[0]:.3f} s, {gb(read[0])} read: {med[0] / med[trust.PREFIX]:.2f}x faster, "
              f"{read[0] / max(1, read[trust.PREFIX]):.2f}x fewer bytes with the prefix stage")

        subset = small["train"]
        subset = Listing("train", Files(subset.reader.root, subset.reader.rels[:args.decode]),
                         subset.labels[:args.decode], subset.classes)
        t = time.perf_counter()
        assert trust.check_readable(subset, skip=False, cache_dir=root / "cache", workers=args.workers) == ()
        small_rate = len(subset.reader) / (time.perf_counter() - t)
        t = time.perf_counter()
        assert trust.check_readable(subset, skip=False, cache_dir=root / "cache", workers=args.workers) == ()
        cached_rate = len(subset.reader) / (time.perf_counter() - t)
        photos = write_photos(root / "photos", 400, rng)
        kb = np.mean([os.stat(root / "photos" / r).st_size for r in photos.reader.rels]) / 1e3
        t = time.perf_counter()
        assert trust.check_readable(photos, skip=False, workers=args.workers) == ()
        photo_rate = len(photos.reader) / (time.perf_counter() - t)
        n_imagenet = IMAGENET_TRAIN + IMAGENET_VAL
        print(f"readable: {len(subset.reader):,} small files at {small_rate:,.0f} images/s; {len(photos.reader)} ImageNet-like "
              f"JPEGs (500x375, {kb:.0f} KB) at {photo_rate:,.0f} images/s -> ImageNet's {n_imagenet:,} images: "
              f"~{span(n_imagenet / photo_rate)} on these {os.cpu_count()} cores; "
              f"a second start answered from the cache ({cached_rate:,.0f} images/s here: a stat pass and a "
              f"digest): ~{span(n_imagenet / cached_rate)}")

    draw = np.random.default_rng(1)
    train, val = imagenet_sizes(draw, IMAGENET_TRAIN), imagenet_sizes(draw, IMAGENET_VAL)
    hit_train, hit_val = np.isin(train, val), np.isin(val, train)
    # the prefix stage reads each size-colliding file's first 64 KiB (files whose first 64 KiB also
    # collide, true duplicates in practice, are read whole again: few, left out here)
    read = int(np.minimum(train[hit_train], trust.PREFIX).sum() + np.minimum(val[hit_val], trust.PREFIX).sum())
    hashed = int(hit_train.sum() + hit_val.sum())
    stat_s = n_imagenet / stat_rate
    hash_s = read / prefix_bps
    print(f"ImageNet estimate (ASSUMED sizes: lognormal, sigma {SIGMA}, mean "
          f"{IMAGENET_BYTES / n_imagenet / 1e3:.0f} KB, train and val alike): size collisions put "
          f"{hit_train.sum():,} of {IMAGENET_TRAIN:,} train and {hit_val.sum():,} of {IMAGENET_VAL:,} val files "
          f"in the hash stage ({hashed:,} hashed, {gb(read)} read of {gb(IMAGENET_BYTES)}); at the measured rates: "
          f"stat pass {span(stat_s)} + hashing {span(hash_s)} = ~{span(stat_s + hash_s)} from the page cache; "
          f"from a cold disk at an assumed {DISK_BPS / 1e6:.0f} MB/s the read alone takes ~{span(read / DISK_BPS)}")


if __name__ == "__main__":
    main()
