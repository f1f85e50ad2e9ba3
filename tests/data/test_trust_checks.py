"""The trust checks on a user's data (`orchestrator.data.trust`): each refusal and its message, a
clean set passing, the size-first rule of the leakage check, and the readable cache. Tiny trees
of PNGs in `tmp_path`, read through an in-test reader over files; no Ray, no MLflow."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.data import trust
from orchestrator.data.listing import FileReader, Found, Listing


class CountingReader(FileReader):
    """The folder adapter's reader, `where` relative to `root`, counting `open` and `content` calls."""

    def __init__(self, root: Path, rels: list[str]):
        super().__init__(tuple(str(root / r) for r in rels))
        self.root, self.rels = root, rels
        self.opens: Counter = Counter()
        self.contents: Counter = Counter()
        self._lock = threading.Lock()

    def open(self, i: int) -> Image.Image:
        with self._lock:
            self.opens[i] += 1
        return super().open(i)

    def where(self, i: int) -> str:
        return self.rels[i]

    def content(self, i: int) -> bytes:
        with self._lock:
            self.contents[i] += 1
        return super().content(i)

    def head(self, i: int, n: int) -> bytes:
        with self._lock:
            self.contents[i] += 1  # a read too, of the first n bytes only
        return super().head(i, n)


_SEED = iter(range(10**6))


def png(path: Path, w: int = 8, h: int = 8) -> Path:
    """A PNG of random pixels, stored uncompressed: its size depends on (w, h) only, its bytes are
    unique."""
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(next(_SEED)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(px).save(path, compress_level=0)
    return path


def tree(root: Path, split: str, counts: dict[str, int]) -> None:
    """``root/split/<class>/img<k>.png``, `counts[class]` images each (a class folder may be empty)."""
    for c, n in counts.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            png(root / split / c / f"img{k}.png")


def listing(root: Path, split: str) -> Listing:
    """A split as a folder adapter lists it: class folders sorted, their files sorted."""
    classes = tuple(sorted(p.name for p in (root / split).iterdir() if p.is_dir()))
    rels, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted((root / split / c).iterdir()):
            rels.append(f"{split}/{c}/{f.name}")
            labels.append(label)
    return Listing(split, CountingReader(root, rels), tuple(labels), classes)


def found(root: Path, heldout: bool = True, test: bool = True) -> Found:
    train = listing(root, "train")
    return Found(train, listing(root, "heldout") if heldout else None, listing(root, "test") if test else None,
                 train.classes, str(root))


CLASSES = {"cat": 3, "dog": 3}


def clean(root: Path) -> None:
    tree(root, "train", CLASSES)
    tree(root, "heldout", {"cat": 2, "dog": 2})
    tree(root, "test", {"cat": 2, "dog": 2})


def refusal(fn, *args, **kw) -> str:
    with pytest.raises(trust.DataError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_clean_set_passes(tmp_path):
    clean(tmp_path)
    seen = []
    report = trust.check_found(found(tmp_path), skip_unreadable=False, progress=lambda d, t: seen.append((d, t)))
    assert report.images == {"train": 6, "heldout": 4, "test": 4}
    assert report.unreadable == {"train": (), "heldout": (), "test": ()}
    assert report.duplicates.pairs == () and report.duplicates.examined == 14
    assert seen[-1] == (14, 14)  # progress over all splits' decode together
    assert report.summary().startswith("data: train 6, held-out 4, test 4 images; 0 unreadable skipped; leakage: 14 examined")


@pytest.mark.parametrize("split, words", [("test", "test"), ("heldout", "held-out")])
def test_class_lists_that_differ_are_refused(tmp_path, split, words):
    clean(tmp_path)
    shutil.rmtree(tmp_path / split)
    tree(tmp_path, split, {"dgo": 1, "dog": 1})
    assert refusal(trust.check_classes, found(tmp_path)) == (
        f"data: the {words} split's classes differ from train's: missing ['cat'], extra ['dgo']")


def test_classes_in_another_order_are_refused(tmp_path):
    clean(tmp_path)
    f = found(tmp_path)
    test = Listing("test", f.test.reader, f.test.labels, ("dog", "cat"))
    assert refusal(trust.check_classes, Found(f.train, f.heldout, test, f.display, f.source)) == (
        "data: the test split's classes differ from train's: the same names in another order "
        "(label 0 is 'dog' there, 'cat' in train)")


def test_an_empty_class_is_refused(tmp_path):
    clean(tmp_path)
    tree(tmp_path, "train", {"bird": 0})
    tree(tmp_path, "heldout", {"bird": 1})
    tree(tmp_path, "test", {"bird": 1})
    assert refusal(trust.check_classes, found(tmp_path)) == (
        "data: class 'bird' has no image in the train split; add images or remove the class")


@pytest.mark.parametrize("split, words", [("heldout", "held-out"), ("test", "test")])
def test_a_class_missing_from_heldout_or_test_is_refused(tmp_path, split, words):
    clean(tmp_path)
    shutil.rmtree(tmp_path / split / "dog")
    (tmp_path / split / "dog").mkdir()  # the class is declared, with no image
    assert refusal(trust.check_classes, found(tmp_path)) == (
        f"data: class 'dog' has no image in the {words} split; every class needs images in every split")


def test_classes_are_checked_only_in_the_splits_present(tmp_path):
    tree(tmp_path, "train", CLASSES)
    trust.check_classes(found(tmp_path, heldout=False, test=False))


def broken(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a picture" * 20)
    return path


def reason(path: Path) -> str:
    with pytest.raises(Exception) as e, Image.open(path) as img:
        img.load()
    return f"{type(e.value).__name__}: {e.value}"


def test_an_unreadable_image_is_refused_by_name(tmp_path):
    clean(tmp_path)
    bad = broken(tmp_path / "train" / "dog" / "img1b.png")
    msg = refusal(trust.check_readable, listing(tmp_path, "train"), skip=False)
    assert msg == (f"data: cannot read train image train/dog/img1b.png: {reason(bad)}; "
                   "set data.skip_unreadable: true to skip such images")
    assert refusal(trust.check_found, found(tmp_path), skip_unreadable=False) == msg


def test_unreadable_images_are_skipped_and_counted_with_skip(tmp_path):
    clean(tmp_path)
    broken(tmp_path / "train" / "cat" / "img0b.png")
    broken(tmp_path / "test" / "dog" / "img9.png")
    train = listing(tmp_path, "train")
    assert trust.check_readable(train, skip=True) == (1,)  # train/cat/img0b.png
    report = trust.check_found(found(tmp_path), skip_unreadable=True)
    assert report.unreadable == {"train": (1,), "heldout": (), "test": (4,)}
    assert report.skipped() == 2
    assert "; 2 unreadable skipped (train 1, test 1);" in report.summary()


def copy(root: Path, src: str, dst: str) -> None:
    (root / dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / src, root / dst)


def test_leakage_of_three_shared_images_is_refused(tmp_path):
    clean(tmp_path)
    copy(tmp_path, "train/cat/img0.png", "heldout/cat/x0.png")
    copy(tmp_path, "train/cat/img2.png", "heldout/cat/x1.png")
    copy(tmp_path, "train/dog/img1.png", "heldout/dog/x0.png")
    msg = refusal(trust.check_found, found(tmp_path), skip_unreadable=False)
    assert msg == ("data: 3 held-out images are also in train (same content): "
                   "heldout/cat/x0.png = train/cat/img0.png; heldout/cat/x1.png = train/cat/img2.png; "
                   "heldout/dog/x0.png = train/dog/img1.png; remove them from one split")


def test_leakage_names_each_split_in_words_and_shows_five_pairs(tmp_path):
    clean(tmp_path)
    tree(tmp_path, "sketch", {"cat": 1})
    for k in range(3):
        copy(tmp_path, f"train/cat/img{k}.png", f"heldout/cat/x{k}.png")
        copy(tmp_path, f"train/dog/img{k}.png", f"test/dog/x{k}.png")
    copy(tmp_path, "train/dog/img0.png", "sketch/cat/y.png")
    splits = {s: listing(tmp_path, s) for s in ("train", "heldout", "test", "sketch")}
    msg = refusal(trust.check_leakage, splits)
    assert msg == ("data: 3 held-out images and 3 test images and 1 sketch image are also in train (same "
                   "content): heldout/cat/x0.png = train/cat/img0.png; heldout/cat/x1.png = train/cat/img1.png; "
                   "heldout/cat/x2.png = train/cat/img2.png; test/dog/x0.png = train/dog/img0.png; "
                   "test/dog/x1.png = train/dog/img1.png; and 2 more; remove them from one split")
    shutil.rmtree(tmp_path / "test" / "dog")
    (tmp_path / "test" / "dog").mkdir()
    copy(tmp_path, "train/dog/img2.png", "test/dog/z.png")
    one = {"train": splits["train"], "test": listing(tmp_path, "test")}
    assert refusal(trust.check_leakage, one) == (
        "data: 1 test image is also in train (same content): test/dog/z.png = train/dog/img2.png; "
        "remove them from one split")


def test_unreadable_images_skipped_are_left_out_of_the_leakage_check(tmp_path):
    clean(tmp_path)
    broken(tmp_path / "train" / "cat" / "img0b.png")
    copy(tmp_path, "train/cat/img0b.png", "test/cat/img0b.png")  # the same broken bytes in test
    report = trust.check_found(found(tmp_path), skip_unreadable=True)
    assert report.unreadable["train"] == (1,) and report.unreadable["test"] == (1,)


@pytest.mark.parametrize("prefix", [trust.PREFIX, 0, 64])
def test_only_images_whose_sizes_collide_across_splits_are_read(tmp_path, prefix):
    """Uncompressed PNGs: the size is set by (w, h). Sizes unique to one split, or shared only
    within train, are never read; `hashed` counts the images read."""
    dims = {"train": [(10, 10), (10, 10), (11, 11), (12, 12), (13, 13), (14, 14), (15, 15), (15, 15)],
            "heldout": [(10, 10), (12, 12), (20, 20)],
            "test": [(21, 21)]}
    for split, ds in dims.items():
        for k, (w, h) in enumerate(ds):
            png(tmp_path / split / "c" / f"img{k}.png", w, h)
    copy(tmp_path, "train/c/img4.png", "test/c/img9.png")  # a 13x13 twin in test
    splits = {s: listing(tmp_path, s) for s in dims}
    sizes = {s: [splits[s].reader.size(i) for i in range(len(splits[s].reader))] for s in splits}
    other = set(sizes["heldout"]) | set(sizes["test"])
    expected = {("train", i) for i, z in enumerate(sizes["train"]) if z in other}
    expected |= {(s, i) for s in ("heldout", "test") for i, z in enumerate(sizes[s]) if z in set(sizes["train"])}
    assert len(expected) == 7  # train 10x10 twice, 12x12, 13x13; held-out 10x10, 12x12; test 13x13

    dup = trust.find_duplicates(splits, prefix=prefix)
    read = {(s, i) for s in splits for i in splits[s].reader.contents}
    assert read == expected
    assert dup.hashed == len(expected)
    assert dup.examined == 8 + 3 + 2
    assert dup.pairs == (("test", "test/c/img9.png", "train/c/img4.png"),)
    once = sum(sizes[s][i] for s, i in expected)
    if prefix and prefix < min(sizes[s][i] for s, i in expected):  # first bytes, then the twins whole
        assert dup.bytes_read == prefix * len(expected) + 2 * sizes["test"][1]
    else:
        assert dup.bytes_read == once
        assert all(n == 1 for s in splits for n in splits[s].reader.contents.values())


def test_a_second_readable_check_is_answered_from_the_cache(tmp_path):
    clean(tmp_path)
    cache = tmp_path / "cache"
    first = listing(tmp_path, "train")
    assert trust.check_readable(first, skip=False, cache_dir=cache) == ()
    assert sum(first.reader.opens.values()) == 6
    again = listing(tmp_path, "train")
    assert trust.check_readable(again, skip=False, cache_dir=cache) == ()
    assert sum(again.reader.opens.values()) == 0
    assert len(list(cache.glob("readable-*.json"))) == 1

    broken(tmp_path / "train" / "cat" / "img0b.png")  # another listing: decoded again
    changed = listing(tmp_path, "train")
    assert trust.check_readable(changed, skip=True, cache_dir=cache) == (1,)
    assert sum(changed.reader.opens.values()) == 7
    cached = listing(tmp_path, "train")  # skipped before, refused now, from the cache
    msg = refusal(trust.check_readable, cached, skip=False, cache_dir=cache)
    assert msg.startswith("data: cannot read train image train/cat/img0b.png: ")
    assert sum(cached.reader.opens.values()) == 0


def test_shifts_given_to_check_found_are_checked_for_readability_and_leakage(tmp_path):
    clean(tmp_path)
    tree(tmp_path, "sketch", {"dog": 2})
    broken(tmp_path / "sketch" / "dog" / "img2.png")
    report = trust.check_found(found(tmp_path), skip_unreadable=True, shifts={"sketch": listing(tmp_path, "sketch")})
    assert report.images["sketch"] == 3 and report.unreadable["sketch"] == (2,)
    copy(tmp_path, "train/dog/img0.png", "sketch/dog/img3.png")
    msg = refusal(trust.check_found, found(tmp_path), skip_unreadable=True, shifts={"sketch": listing(tmp_path, "sketch")})
    assert msg == ("data: 1 sketch image is also in train (same content): sketch/dog/img3.png = train/dog/img0.png; "
                   "remove them from one split")


def test_a_clean_leakage_result_is_remembered_for_the_same_listings(tmp_path):
    clean(tmp_path)
    cache = tmp_path / "cache"
    first = trust.check_found(found(tmp_path), False, cache_dir=cache)
    assert not first.duplicates.remembered and "hashed" in first.summary()
    again = found(tmp_path)
    second = trust.check_found(again, False, cache_dir=cache)
    assert second.duplicates.remembered and second.duplicates.examined == first.duplicates.examined
    assert sum(n for s in again.splits().values() for n in s.reader.contents.values()) == 0
    assert "found so before: nothing read" in second.summary()
    png(tmp_path / "test" / "cat" / "new.png", 9, 9)  # a changed listing is checked again
    assert not trust.check_found(found(tmp_path), False, cache_dir=cache).duplicates.remembered
