"""Trust in a user's data, checked before anything is logged: classes, readability, leakage.

`check_found` runs the checks in this order and refuses with a `DataError` (one line, which the
CLI prints before it exits 2) on the first thing wrong:

1. classes (`check_classes`): held-out and test declare train's classes, in train's order; every
   class has a training image, and an image in held-out and in test when the data set brings
   them. Costs nothing worth measuring: it reads labels only.
2. readable (`check_readable`): every image opens and decodes in full. This is the expensive
   check: one full decode of every image, spread over a thread pool (Pillow decodes without the
   GIL, so it scales with cores). ``benchmarks/leakage_check.py`` measured ~720 ImageNet-like
   JPEGs (500x375, ~117 KB) a second on 2 shared cores: ImageNet's 1.33 M images in ~30 min of
   2 cores (~1 core-hour). With a cache folder the answer is remembered per split, keyed by every
   image's place and stored size; a later start over the same files costs a stat pass and a
   digest (~146,000 images/s measured: ~9 s for ImageNet) instead of the decode.
3. leakage (`check_leakage`): no image of held-out, test or a shift has the same bytes as a
   training image. Costs one stat pass over every image (~146,000 files/s measured, metadata in
   the page cache), then reads and hashes only the first 64 KiB of the images whose size occurs
   both in train and in another split (equal bytes have equal sizes), and whole only those whose
   first 64 KiB also collide. For ImageNet, under an assumed lognormal size distribution, that is
   ~25 % of train and ~94 % of val, ~22 GB of 140 GB read: ~27 s of 2 cores from the page cache
   (stat 8 s, hashing 18 s); from a cold disk the read dominates (~45 s at 500 MB/s). A clean
   result is remembered with the cache folder too, keyed by the listings: a trial building a
   task the driver already checked pays the stat pass only.

The readers are called from several threads at once (`open`, `size`, `content`), which readers
over files or in-memory arrays allow. Nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL

from orchestrator.data.listing import Found, Listing, Reader

Progress = Callable[[int, int], None]  # (done, total)


def kept(n: int, skipped) -> np.ndarray:
    """Indices 0..n-1 less `skipped` (unreadable images left out), sorted."""
    return np.setdiff1d(np.arange(n), np.asarray(list(skipped), dtype=np.int64))

PREFIX = 64 * 1024  # bytes hashed first in `find_duplicates` (see there)
SHOWN = 5  # duplicate pairs named in a leakage message
NAMED = 10  # classes named in a class message
PROGRESS_EVERY_S = 0.5
_CACHE_VERSION = "trust.readable/1"


class DataError(ValueError):
    """The user's data cannot be trusted; the message is one line naming what is wrong and where.
    The CLI prints it and exits 2."""


def words(split: str) -> str:
    """A split's name as a message says it: held-out, test, train, or a shift's own name."""
    return {"heldout": "held-out"}.get(split, split)


def _listed(names) -> str:
    names = list(names)
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    return f"{names[:NAMED]!r}{more}"


def _workers(workers: int | None) -> int:
    """Threads: as `ThreadPoolExecutor`'s default, but counting the cores this process may use."""
    if workers:
        return workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(32, cpus + 4)


# --- classes -------------------------------------------------------------------------------------


def _no_image(classes: list[str], split: str) -> str:
    hint = ("add images or remove the class" + ("es" if len(classes) > 1 else "") if split == "train"
            else "every class needs images in every split")
    what = (f"class {classes[0]!r} has" if len(classes) == 1 else f"classes {_listed(classes)} have")
    return f"data: {what} no image in the {words(split)} split; {hint}"


def _counts(listing: Listing, n_classes: int) -> np.ndarray:
    labels = np.asarray(listing.labels, dtype=np.int64)
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if bad.size:
        raise DataError(f"data: the {words(listing.name)} split has label {int(bad[0])}, "
                        f"but {n_classes} classes")
    return np.bincount(labels, minlength=n_classes)


def check_classes(found: Found) -> None:
    """Refuse (`DataError`) class lists that differ between splits, a class without a training
    image, and a class without an image in held-out or test (where the data set has them)."""
    train = found.train
    if not train.classes:
        raise DataError("data: the train split declares no classes")
    for split in (found.heldout, found.test):
        if split is None or split.classes == train.classes:
            continue
        have, want = set(split.classes), set(train.classes)
        missing = [c for c in train.classes if c not in have]
        extra = [c for c in split.classes if c not in want]
        parts = ([f"missing {_listed(missing)}"] if missing else []) + ([f"extra {_listed(extra)}"] if extra else [])
        if not parts:  # the same names, in another order or repeated: labels would mean other classes
            k = next((k for k, (a, b) in enumerate(zip(split.classes, train.classes)) if a != b), None)
            parts = [f"the same names in another order (label {k} is {split.classes[k]!r} there, "
                     f"{train.classes[k]!r} in train)" if k is not None
                     else f"{len(split.classes)} classes there, {len(train.classes)} in train"]
        raise DataError(f"data: the {words(split.name)} split's classes differ from train's: {', '.join(parts)}")
    for split in (train, found.heldout, found.test):
        if split is None:
            continue
        counts = _counts(split, len(train.classes))
        empty = [train.classes[k] for k in np.flatnonzero(counts == 0)]
        if empty:
            raise DataError(_no_image(empty, split.name))


# --- readable ------------------------------------------------------------------------------------


def _sizes(reader: Reader, pool: Executor, chunk: int = 4096) -> np.ndarray:
    """Every image's stored size, a block of indices per task (a stat each for files)."""
    n = len(reader)
    blocks = pool.map(lambda s: [reader.size(i) for i in range(s, min(n, s + chunk))], range(0, n, chunk))
    return np.fromiter((x for block in blocks for x in block), dtype=np.int64, count=n)


def _reason(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 200 else text[:197] + "..."


def _unreadable_message(listing: Listing, i: int, reason: str) -> str:
    return (f"data: cannot read {words(listing.name)} image {listing.reader.where(i)}: {reason}; "
            f"set data.skip_unreadable: true to skip such images")


def readable_digest(listing: Listing, sizes) -> str:
    """What `check_readable`'s cache is keyed by: sha256 of the listing's name and every image's
    ``(where(i), size(i))`` (and Pillow's version, which decides what decodes)."""
    h = hashlib.sha256(json.dumps([_CACHE_VERSION, listing.name, PIL.__version__, len(sizes)]).encode())
    for i, size in enumerate(sizes):
        w = listing.reader.where(i).encode("utf-8", "surrogateescape")
        h.update(b"%d:%s%d\n" % (len(w), w, size))
    return h.hexdigest()


def _load_cache(path: Path, digest: str) -> dict[int, str] | None:
    try:
        got = json.loads(path.read_text())
        if got.get("digest") == digest:
            return {int(i): str(r) for i, r in got["unreadable"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing or damaged: decode again
    return None


def _store_cache(path: Path, payload: dict) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except OSError:  # a cache that cannot be written only costs the next start a decode
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _decode_block(reader: Reader, start: int, stop: int, first_only: bool,
                  halt: threading.Event) -> tuple[int, list[tuple[int, str]]]:
    bad = []
    for i in range(start, stop):
        if halt.is_set():
            return i - start, bad
        try:  # not closed: a reader may hand out an image it keeps (a file's is closed by load)
            reader.open(i).load()
        except Exception as e:  # noqa: BLE001 - whatever a decoder raises makes the image unreadable
            bad.append((i, _reason(e)))
            if first_only:
                halt.set()
                return i + 1 - start, bad
    return stop - start, bad


def _decode(reader: Reader, skip: bool, pool: Executor, progress: Progress | None) -> dict[int, str]:
    """Unreadable index -> reason; without `skip`, stops at the first one found."""
    n = len(reader)
    chunk = max(8, min(256, n // 64 or 1))
    halt = threading.Event()
    futures = [pool.submit(_decode_block, reader, s, min(n, s + chunk), not skip, halt) for s in range(0, n, chunk)]
    bad: dict[int, str] = {}
    done, shown = 0, time.monotonic()
    if progress:
        progress(0, n)
    try:
        for f in as_completed(futures):
            k, found = f.result()
            done += k
            bad.update(found)
            if bad and not skip:
                break
            if progress and time.monotonic() - shown >= PROGRESS_EVERY_S:
                progress(done, n)
                shown = time.monotonic()
    finally:  # stopped early (a refusal, an interrupt): what is queued is not started, what runs stops
        halt.set()
        for f in futures:
            f.cancel()
    if progress and not (bad and not skip):
        progress(n, n)
    return bad


def _readable(listing: Listing, skip: bool, cache_dir: Path | None, progress: Progress | None,
              pool: Executor, sizes: np.ndarray | None) -> tuple[int, ...]:
    cached = path = digest = None
    if cache_dir is not None:
        sizes = _sizes(listing.reader, pool) if sizes is None else sizes
        digest = readable_digest(listing, sizes)
        path = Path(cache_dir) / f"readable-{digest}.json"
        cached = _load_cache(path, digest)
    bad = cached if cached is not None else _decode(listing.reader, skip, pool, progress)
    if bad and not skip:
        i = min(bad)
        raise DataError(_unreadable_message(listing, i, bad[i]))
    if cached is None and path is not None:
        _store_cache(path, {"digest": digest, "split": listing.name, "images": len(listing.reader),
                            "unreadable": {str(i): r for i, r in sorted(bad.items())}})
    elif cached is not None and progress:
        progress(len(listing.reader), len(listing.reader))
    return tuple(sorted(bad))


def check_readable(listing: Listing, skip: bool, cache_dir: Path | None = None,
                   progress: Progress | None = None, *, workers: int | None = None) -> tuple[int, ...]:
    """Open and fully decode every image of `listing` (``reader.open(i).load()``) on a thread pool.

    Without `skip`, the first unreadable image found raises `DataError` naming it
    (``reader.where(i)``) and the reason; with `skip`, returns the indices that could not be
    read (the caller drops them and reports the count). `progress(done, total)` is called now and
    then (every ~0.5 s, and once at the end).

    Cost: a full decode of every image, the price of one epoch's loading without the resize:
    ~30 min of 2 cores for ImageNet's 1.33 M JPEGs, threads scaling with cores (see the module
    docstring). With `cache_dir`, the result is stored in a small JSON file keyed by a sha256 of
    the listing's name and every image's ``(where(i), size(i))``; a later call whose digest
    matches decodes nothing and costs a stat pass plus hashing the names (~9 s for ImageNet).
    A file replaced in place by one of exactly the same size is not decoded again; a refusal
    found without `skip` is not stored (the decode stopped early), one found with it is, and
    a later call without `skip` refuses from the cache."""
    with ThreadPoolExecutor(_workers(workers)) as pool:
        return _readable(listing, skip, cache_dir, progress, pool, None)


# --- leakage -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Duplicates:
    """What `find_duplicates` found and what it cost."""

    pairs: tuple[tuple[str, str, str], ...]  # (split, where, train_where): the same bytes in both
    examined: int  # images looked at: every image's size was taken
    hashed: int  # images whose bytes were read (their sizes collide across splits)
    bytes_read: int
    remembered: bool = False  # found clean before, for the same listings (`check_found`'s cache): nothing read now


def _hash_block(reader: Reader, idx: list[int], prefix: int) -> list[tuple[tuple, int]]:
    """Stage one of `find_duplicates`: per index, a key (the whole content's digest, or the
    digest of its first `prefix` bytes and its length) and the bytes read."""
    out = []
    for i in idx:
        size = reader.size(i)
        if prefix and size > prefix:  # only the first bytes read (a ranged read where the store has one)
            b = reader.head(i, prefix)
            out.append((("head", size, hashlib.sha256(b).digest()), len(b)))
        else:
            b = reader.content(i)
            out.append((("full", hashlib.sha256(b).digest()), len(b)))
    return out


def _full_block(reader: Reader, idx: list[int]) -> list[tuple[tuple, int]]:
    out = []
    for i in idx:
        b = reader.content(i)
        out.append((("full", hashlib.sha256(b).digest()), len(b)))
    return out


def _keyed(pool: Executor, listings: Mapping[str, Listing], items: list[tuple[str, int]], fn,
           progress: Progress | None = None, chunk: int = 64) -> tuple[dict[tuple, list[tuple[str, int]]], int]:
    """Run `fn(reader, indices)` over `items` ((split, index)) in blocks; key -> items, bytes read."""
    blocks = [items[s:s + chunk] for s in range(0, len(items), chunk)]
    futures = {pool.submit(fn, listings[b[0][0]].reader, [i for _, i in b]): b
               for block in blocks for b in _by_split(block)}
    groups: dict[tuple, list[tuple[str, int]]] = {}
    nbytes = done = 0
    shown = time.monotonic()
    if progress:
        progress(0, len(items))
    for f in as_completed(futures):
        for item, (key, k) in zip(futures[f], f.result()):
            groups.setdefault(key, []).append(item)
            nbytes += k
        done += len(futures[f])
        if progress and time.monotonic() - shown >= PROGRESS_EVERY_S:
            progress(done, len(items))
            shown = time.monotonic()
    if progress:
        progress(len(items), len(items))
    return groups, nbytes


def _by_split(block: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for item in block:
        out.setdefault(item[0], []).append(item)
    return list(out.values())


def _duplicates(listings: Mapping[str, Listing], against: str, exclude: Mapping[str, Collection[int]],
                prefix: int, pool: Executor, sizes: Mapping[str, np.ndarray],
                progress: Progress | None) -> Duplicates:
    if against not in listings:
        raise ValueError(f"find_duplicates: no split {against!r} among {list(listings)}")
    left = {k: kept(len(s.reader), exclude.get(k, ())) for k, s in listings.items()}
    size = {k: sizes[k][left[k]] for k in listings}
    examined = sum(len(v) for v in left.values())
    others = [k for k in listings if k != against]
    if not others:
        return Duplicates((), examined, 0, 0)
    # Size first: only an image whose size occurs in `against` and in another split can have a twin.
    cand = {against: left[against][np.isin(size[against], np.concatenate([size[k] for k in others]))]}
    cand.update({k: left[k][np.isin(size[k], size[against])] for k in others})
    items = [(k, int(i)) for k in listings for i in cand[k]]
    groups, nbytes = _keyed(pool, listings, items, lambda r, idx: _hash_block(r, idx, prefix), progress)

    def across(members: list[tuple[str, int]]) -> bool:
        return any(k == against for k, _ in members) and any(k != against for k, _ in members)

    final = {key: m for key, m in groups.items() if key[0] == "full" and across(m)}
    again = sorted(item for key, m in groups.items() if key[0] == "head" and across(m) for item in m)
    if again:  # prefixes that collide across splits: hash those images whole
        more, extra = _keyed(pool, listings, again, _full_block)
        final.update({("again",) + key: m for key, m in more.items() if across(m)})
        nbytes += extra
    order = {k: n for n, k in enumerate(listings)}
    pairs = []
    for members in final.values():
        twin = min(i for k, i in members if k == against)
        pairs += [(order[k], i, k, listings[k].reader.where(i), listings[against].reader.where(twin))
                  for k, i in members if k != against]
    pairs.sort()
    return Duplicates(tuple(p[2:] for p in pairs), examined, len(items), nbytes)


def find_duplicates(listings: dict[str, Listing], against: str = "train", *,
                    exclude: Mapping[str, Collection[int]] | None = None, prefix: int = PREFIX,
                    workers: int | None = None, progress: Progress | None = None) -> Duplicates:
    """The images of every other split (held-out, test, shifts) whose bytes (`reader.content`,
    sha256) equal those of an image of `against` (train); `exclude` names indices to leave out
    per split (unreadable images the caller drops). `progress(done, total)` follows the hashing.

    Built for ImageNet's scale (1.28 M training files, ~140 GB): a stat pass takes every image's
    size (`reader.size`, on a thread pool), and only images whose size occurs both in `against`
    and in another split are read at all (equal bytes, equal sizes); pairs within one split are
    no leakage and are never compared. Those are read on a thread pool and, when longer than
    `prefix` bytes, only their first `prefix` bytes are hashed; images whose prefixes also
    collide across splits are then read again and hashed whole (their lengths are equal too).

    The prefix stage reads only an image's first `prefix` bytes where the store can (`Reader.head`:
    a file's first 64 KiB, not the whole file), so of the images whose sizes collide only the
    rare ones whose first 64 KiB also collide are read whole: from a disk, most of the bytes of
    large images are never read. From the page cache it also saves hashing: measured by
    ``benchmarks/leakage_check.py`` on ImageNet-sized files (lognormal sizes, median ~100 KB) on
    2 shared cores, 1.1-1.5x faster than hashing whole files. Images no larger than `prefix` are
    hashed whole, once. `prefix=0` hashes every
    image whole."""
    with ThreadPoolExecutor(_workers(workers)) as pool:
        sizes = {k: _sizes(s.reader, pool) for k, s in listings.items()}
        return _duplicates(listings, against, exclude or {}, prefix, pool, sizes, progress)


def leakage_message(dup: Duplicates, against: str = "train") -> str:
    """The one-line refusal for `dup`'s pairs (the splits named in words, up to `SHOWN` pairs)."""
    counts: dict[str, int] = {}
    for split, _, _ in dup.pairs:
        counts[split] = counts.get(split, 0) + 1
    parts = [f"{n} {words(k)} image{'s' if n != 1 else ''}" for k, n in counts.items()]
    verb = "is" if len(dup.pairs) == 1 else "are"
    shown = "; ".join(f"{w} = {t}" for _, w, t in dup.pairs[:SHOWN])
    more = f"; and {len(dup.pairs) - SHOWN} more" if len(dup.pairs) > SHOWN else ""
    return (f"data: {' and '.join(parts)} {verb} also in {words(against)} (same content): {shown}{more}; "
            f"remove them from one split")


def check_leakage(listings: dict[str, Listing], against: str = "train", *,
                  exclude: Mapping[str, Collection[int]] | None = None, prefix: int = PREFIX,
                  workers: int | None = None, progress: Progress | None = None) -> Duplicates:
    """`find_duplicates`, refusing (`DataError`) when any image of another split is also in
    `against`; returns what it examined when none is."""
    dup = find_duplicates(listings, against, exclude=exclude, prefix=prefix, workers=workers, progress=progress)
    if dup.pairs:
        raise DataError(leakage_message(dup, against))
    return dup


# --- all of it -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What `check_found` checked: images per split, the unreadable images skipped per split
    (indices, with ``data.skip_unreadable``), and what the leakage check examined and read."""

    images: dict[str, int]
    unreadable: dict[str, tuple[int, ...]]
    duplicates: Duplicates

    def skipped(self) -> int:
        return sum(len(v) for v in self.unreadable.values())

    def summary(self) -> str:
        """One line, e.g. ``data: train 1,000, held-out 200 images; 2 unreadable skipped (train 2);
        leakage: 1,200 examined, 40 hashed (3.1 MB read)``."""
        images = ", ".join(f"{words(k)} {n:,}" for k, n in self.images.items())
        skipped = ", ".join(f"{words(k)} {len(v)}" for k, v in self.unreadable.items() if v)
        d = self.duplicates
        return (f"data: {images} images; {self.skipped()} unreadable skipped" + (f" ({skipped})" if skipped else "")
                + (f"; leakage: {d.examined:,} examined, none in two splits (found so before: nothing read)"
                   if d.remembered else
                   f"; leakage: {d.examined:,} examined, {d.hashed:,} hashed ({d.bytes_read / 1e6:.1f} MB read)"))


def _leakage_key(splits: Mapping[str, Listing], sizes: Mapping[str, np.ndarray],
                 unreadable: Mapping[str, tuple[int, ...]]) -> str:
    """What the leakage result is remembered by: every split's name, images' names and sizes
    (`readable_digest`), and the images left out as unreadable."""
    h = hashlib.sha256(b"leakage")
    for k, s in splits.items():
        h.update(f"{k}:{readable_digest(s, sizes[k])}:{list(unreadable.get(k, ()))}\n".encode())
    return h.hexdigest()


def _load_leakage(path: Path, key: str) -> Duplicates | None:
    try:
        got = json.loads(path.read_text())
        if got.get("digest") == key:
            return Duplicates((), int(got["examined"]), int(got["hashed"]), int(got["bytes_read"]), remembered=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing or damaged: check again
    return None


def check_found(found: Found, skip_unreadable: bool, cache_dir: Path | None = None,
                progress: Progress | None = None, *, shifts: Mapping[str, Listing] | None = None,
                workers: int | None = None) -> Report:
    """All the checks on `found` (and the shift data sets in `shifts`, by name): classes, then
    readable, then leakage against train (unreadable images skipped with `skip_unreadable` are
    left out of it). `progress(done, total)` follows the decode, over all splits together.
    Raises `DataError` on the first check that fails. (Shifts' classes are the caller's to check:
    a shift may hold a subset of the task's classes.)
    With `cache_dir`, both the decode (`check_readable`) and a clean leakage result are
    remembered by the listings' names and sizes: the driver checks a sweep's data, and each
    trial building the same task again pays a stat pass, not a decode or a hash pass."""
    check_classes(found)
    splits = {**found.splits(), **(shifts or {})}
    total = sum(len(s.reader) for s in splits.values())
    with ThreadPoolExecutor(_workers(workers)) as pool:
        sizes = {k: _sizes(s.reader, pool) for k, s in splits.items()}
        unreadable, done = {}, 0
        for k, s in splits.items():
            step = None if progress is None else (lambda d, _t, base=done: progress(base + d, total))
            unreadable[k] = _readable(s, skip_unreadable, cache_dir, step, pool, sizes[k])
            done += len(s.reader)
        path = key = None
        if cache_dir is not None:  # the same listings found clean before: nothing to read again
            key = _leakage_key(splits, sizes, unreadable)
            path = Path(cache_dir) / f"leakage-{key}.json"
            dup = _load_leakage(path, key)
        if path is None or dup is None:
            dup = _duplicates(splits, "train", unreadable, PREFIX, pool, sizes, None)
            if path is not None and not dup.pairs:
                _store_cache(path, {"digest": key, "examined": dup.examined, "hashed": dup.hashed,
                                    "bytes_read": dup.bytes_read})
    if dup.pairs:
        raise DataError(leakage_message(dup))
    return Report({k: len(s.reader) for k, s in splits.items()}, unreadable, dup)
