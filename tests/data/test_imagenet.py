"""ImageNet and its shifts from folders: class maps, splits, projections, errors (tiny trees)."""

import pickle
import shutil

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image
from pydantic import ValidationError

from orchestrator import data
from orchestrator.config import DataConfig
from orchestrator.data import imagenet, splits
from orchestrator.data.splits import fingerprint

SIZE = 16
# 1000-class indices of the tiny tree's training classes, chosen to cover the subsets:
# ImageNet-R has 1, 6, 11, 805; ImageNet-A has 6, 11, 530; ObjectNet's alarm_clock is 409 + 530,
# mug is 504;
# 0 (tench) is in none of them.
IDX = (0, 1, 6, 11, 409, 504, 530, 805)
SHAPES = ((40, 30), (24, 48), (33, 33))  # (width, height): landscape, portrait, square
ALL_SHIFTS = ("imagenetv2", "imagenet_r", "imagenet_sketch", "objectnet", "imagenet_a")


def wnid(i: int) -> str:
    return imagenet.imagenet_wnids()[i]


def write_images(folder, n: int, ext: str, seed: int, border: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        w, h = SHAPES[(seed + k) % len(SHAPES)]
        colour = ((seed * 37 + k * 91) % 256, (seed * 53) % 256, (k * 29) % 256)
        img = Image.new("RGB", (w, h), (0, 200, 0) if border else colour)
        if border:  # ObjectNet's frame: a 1-px red border round a green picture
            for x in range(w):
                img.putpixel((x, 0), (255, 0, 0)), img.putpixel((x, h - 1), (255, 0, 0))
            for y in range(h):
                img.putpixel((0, y), (255, 0, 0)), img.putpixel((w - 1, y), (255, 0, 0))
        img.save(folder / f"img_{k}{ext}")


def build_tree(root) -> None:
    for j, i in enumerate(IDX):
        write_images(root / "imagenet" / "train" / wnid(i), 3, ".JPEG", seed=j)
        write_images(root / "imagenet" / "val" / wnid(i), 2, ".JPEG", seed=50 + j)
    (root / "imagenet" / "val" / "LOC_val_solution.csv").write_text("loose files are ignored\n")
    v2 = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for i in (0, 6, 409, 999):  # 999 is not a training class: its images are dropped
        write_images(v2 / str(i), 2, ".jpeg", seed=i)
    for i in (1, 2, 6, 11, 805):  # 2 is an ImageNet-R class the model lacks
        write_images(root / "imagenet-r" / wnid(i), 2, ".jpg", seed=i)
    for i in (0, 504, 999):
        write_images(root / "sketch" / wnid(i), 2, ".JPEG", seed=i)
    for i in (6, 11, 13):  # 13 is an ImageNet-A class the model lacks
        write_images(root / "imagenet-a" / wnid(i), 2, ".jpg", seed=i)
    on = root / "objectnet-1.0" / "images"
    for folder in ("alarm_clock", "mug", "backpack", "squeegee"):  # backpack: 414 not in the model
        write_images(on / folder, 2, ".png", seed=len(folder), border=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    build_tree(r)
    return r


def config(root, **kw) -> DataConfig:
    kw = {"dataset": "imagenet", "root": str(root), "image_size": SIZE, "heldout_fraction": 0.25,
          "shifts": ALL_SHIFTS, **kw}
    return DataConfig(**kw)


@pytest.fixture(scope="module")
def task(root):
    return imagenet.load_imagenet_task(config(root))


# --- the committed maps --------------------------------------------------------------------------

def test_committed_maps_have_the_standard_counts():
    w, r, a = imagenet.imagenet_wnids(), imagenet.imagenet_r_wnids(), imagenet.imagenet_a_wnids()
    assert len(w) == len(set(w)) == 1000 and list(w) == sorted(w)
    assert (w[0], w[1], w[-1]) == ("n01440764", "n01443537", "n15075141")
    assert len(r) == len(set(r)) == 200 and set(r) <= set(w)
    assert len(a) == len(set(a)) == 200 and set(a) <= set(w)
    assert set(r) != set(a)
    # the 1000-class indices published as CLASS_SUBLIST in mlfoundations/wise-ft
    assert [w.index(x) for x in r][:6] == [1, 2, 4, 6, 8, 9] and w.index(r[-1]) == 988
    assert [w.index(x) for x in a][:6] == [6, 11, 13, 15, 17, 22] and w.index(a[-1]) == 988
    on = imagenet.objectnet_classes()
    members = [i for idx in on.values() for i in idx]
    assert len(on) == 113 and len(members) == len(set(members)) == 125
    assert all(0 <= i < 1000 for i in members)
    assert on["alarm_clock"] == (409, 530) and on["mug"] == (504,)
    assert len(IMAGENET_CLASSNAMES) == 1000


# --- ImageNet train / held-out / val --------------------------------------------------------------

def test_class_order_and_names(task):
    assert task.classnames == tuple(IMAGENET_CLASSNAMES[i] for i in IDX)
    assert task.classnames[:2] == ("tench", "goldfish")
    seen = set(task.train.labels.tolist()) | set(task.heldout.labels.tolist())
    assert sorted(seen) == list(range(8))


def paths(split) -> list[str]:
    return list(split.dataset.paths)


def test_heldout_is_a_seeded_disjoint_slice(root, task):
    tr, he = paths(task.train), paths(task.heldout)
    assert len(tr) + len(he) == 24 and len(he) == 6  # 25% of 8 classes x 3 images
    assert not set(tr) & set(he)
    again = imagenet.load_imagenet_task(config(root))
    assert paths(again.heldout) == he and torch.equal(again.heldout.labels, task.heldout.labels)
    other = imagenet.load_imagenet_task(config(root, split_seed=1))
    assert set(paths(other.heldout)) != set(he)


def test_split_is_independent_of_listing_order(root, task, monkeypatch):
    listdir, scandir = imagenet.os.listdir, imagenet.os.scandir
    monkeypatch.setattr(imagenet.os, "listdir", lambda p: list(reversed(listdir(p))))
    monkeypatch.setattr(imagenet.os, "scandir", lambda p: list(reversed(list(scandir(p)))))
    shuffled = imagenet.load_imagenet_task(config(root))
    assert paths(shuffled.heldout) == paths(task.heldout)
    assert paths(shuffled.train) == paths(task.train)


def test_val_is_the_test_split(root, task):
    assert task.test.labels.tolist() == [k for k in range(8) for _ in (0, 1)]  # 2 images a class
    assert all("/val/" in p.replace("\\", "/") for p in paths(task.test))
    other = imagenet.load_imagenet_task(config(root, test_fraction=0.5))  # ignored for ImageNet
    assert paths(other.test) == paths(task.test)
    assert task.test.project is None


def test_images_are_resized_centre_cropped_uint8(task):
    for split in (task.train, task.test, task.shifts["imagenet_r"]):
        x, y = split.dataset[0]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.uint8  # float only on the device
        assert isinstance(y, int) and y == split.labels[0]
        images, labels = split.tensors(2)  # tensors() stays float in [0, 1] for its callers
        assert images.dtype == torch.float32 and 0.0 <= images.min() and images.max() <= 1.0
        assert torch.equal(images[0], x.float() / 255) and torch.equal(labels, split.labels[:2])


# --- the shifts ----------------------------------------------------------------------------------

def test_imagenetv2_maps_folder_indices_to_model_classes(task):
    s = task.shifts["imagenetv2"]
    assert s.labels.tolist() == [0, 0, 4, 4, 2, 2]  # folders "0", "409", "6" in name order
    assert s.labels.dtype == torch.int64 and s.project is None


def test_sketch_uses_the_model_classes(task):
    s = task.shifts["imagenet_sketch"]
    assert sorted(s.labels.tolist()) == [0, 0, 5, 5] and s.project is None


# The label space is the subset's classes the model has, whether or not the shift's tree holds
# images of each: the tiny ImageNet-A tree has no digital-clock (530) folder.
@pytest.mark.parametrize("name, kept, seen", [("imagenet_r", (1, 2, 3, 7), [0, 1, 2, 3]),
                                              ("imagenet_a", (2, 3, 6), [0, 1])])
def test_200_class_shifts_project_to_their_classes_the_model_has(task, name, kept, seen):
    s = task.shifts[name]
    assert sorted(set(s.labels.tolist())) == seen
    logits = torch.randn(5, len(IDX))
    out = s.project(logits)
    assert out.shape == (5, len(kept)) and torch.equal(out, logits[:, list(kept)])
    # a label's projected logit is the model's logit of that very class
    for path, label in zip(paths(s), s.labels.tolist()):
        assert imagenet.imagenet_wnids()[IDX[kept[label]]] in path


def test_full_projection_matches_the_reference_sublists():
    w = imagenet.imagenet_wnids()
    p = imagenet.SubsetProjection(tuple(w.index(x) for x in imagenet.imagenet_r_wnids()), 1000)
    assert p(torch.zeros(2, 1000)).shape == (2, 200)
    with pytest.raises(ValueError, match="1000"):
        p(torch.zeros(2, 999))


def test_objectnet_max_projection_and_dropped_classes(task):
    s = task.shifts["objectnet"]
    assert len(s) == 4  # backpack (no model class) and squeegee (no ImageNet class) dropped
    assert s.labels.tolist() == [0, 0, 1, 1]  # alarm_clock, mug
    logits = torch.randn(6, len(IDX))
    out = s.project(logits)
    assert out.shape == (6, 2)
    clocks = torch.maximum(logits[:, 4], logits[:, 6])  # analog and digital clock
    assert torch.equal(out[:, 0], clocks)
    assert torch.equal(out[:, 1], logits[:, 5])  # coffee mug


def test_objectnet_crops_the_border(task):
    x, _ = task.shifts["objectnet"].dataset[0]
    assert x[0].max() < 13 and x[1].min() > 178  # no red frame left, only the green picture


def test_full_objectnet_projection_has_113_classes():
    groups = tuple(imagenet.objectnet_classes().values())
    out = imagenet.MaxProjection(groups, 1000)(torch.randn(3, 1000))
    assert out.shape == (3, 113)


def test_projections_pickle(task):
    for name in ("imagenet_r", "imagenet_a", "objectnet"):
        p = task.shifts[name].project
        q = pickle.loads(pickle.dumps(p))
        x = torch.randn(2, len(IDX))
        assert torch.equal(p(x), q(x))


# --- loading batches -----------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_batches_through_a_dataloader(task, workers):
    s = task.shifts["imagenet_r"]
    order = torch.arange(len(s)).flip(0)
    got = list(s.batches(3, order=order, opts=splits.LoaderOptions(workers=workers)))
    x = torch.cat([b[0] for b in got])
    y = torch.cat([b[1] for b in got])
    assert x.shape == (len(s), 3, SIZE, SIZE) and torch.equal(y, s.labels[order])
    assert x.dtype == torch.uint8
    assert torch.equal(x[0], s.dataset[len(s) - 1][0])


def test_load_task_end_to_end(root):
    cfg = DataConfig(dataset="imagenet", root=str(root), image_size=SIZE,
                     shifts=("imagenet_r", "objectnet"))
    task = data.load_task(cfg)
    assert isinstance(task.train, splits.FolderSplit) and len(task.classnames) == 8
    assert list(task.reporting()) == ["test", "imagenet_r", "objectnet"]
    assert data.load_task(cfg) is task  # cached on the frozen config


# --- errors --------------------------------------------------------------------------------------

def test_missing_shift_folder_names_path_and_data_set(root, tmp_path):
    shutil.copytree(root / "imagenet", tmp_path / "imagenet")
    with pytest.raises(FileNotFoundError, match=r"ImageNet-A: expected folder .*imagenet-a"):
        imagenet.load_imagenet_task(config(tmp_path, shifts=("imagenet_a",)))
    with pytest.raises(FileNotFoundError, match="ObjectNet"):
        imagenet.load_imagenet_task(config(tmp_path, shifts=("objectnet",)))


def test_missing_root_and_empty_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="data root"):
        imagenet.load_imagenet_task(config(tmp_path / "nowhere", shifts=()))
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        imagenet.load_imagenet_task(config(tmp_path, shifts=()))
    with pytest.raises(ValueError, match="data.root"):
        imagenet.load_imagenet_task(DataConfig(dataset="imagenet", shifts=()))


def test_unknown_wnid_names_the_folder(tmp_path):
    write_images(tmp_path / "imagenet" / "train" / wnid(0), 2, ".JPEG", seed=0)
    write_images(tmp_path / "imagenet" / "train" / "n99999999", 2, ".JPEG", seed=1)
    with pytest.raises(ValueError, match="n99999999"):
        imagenet.load_imagenet_task(config(tmp_path, shifts=()))


def test_shift_folder_outside_its_class_set_is_refused(root, tmp_path):
    shutil.copytree(root / "imagenet", tmp_path / "imagenet")
    write_images(tmp_path / "imagenet-r" / wnid(0), 1, ".jpg", seed=0)  # tench is not in ImageNet-R
    with pytest.raises(ValueError, match=wnid(0)):
        imagenet.load_imagenet_task(config(tmp_path, shifts=("imagenet_r",)))


def test_the_tiny_worlds_own_shift_is_refused_for_imagenet(root):
    with pytest.raises(ValueError, match=r"data.shifts: 'rendered' is not a shift of data set 'imagenet'"):
        data.check_config(config(root, shifts=("rendered",)))


def test_a_corruption_of_imagenet_val_is_read_from_its_files(root):
    task = data.load_task(config(root, shifts=("imagenet_r", "invert")))
    assert list(task.shifts) == ["imagenet_r", "invert"]
    blur, test = task.shifts["invert"], task.test
    assert torch.equal(blur.labels, test.labels) and blur.project is test.project
    x, _ = blur.dataset[0]
    assert x.dtype == torch.uint8 and x.shape == test.dataset[0][0].shape and not torch.equal(x, test.dataset[0][0])
    assert fingerprint(blur) != fingerprint(test)


def test_selection_split_may_not_be_a_reporting_split(root):
    with pytest.raises(ValidationError, match="also a reporting split"):
        DataConfig(dataset="imagenet", root=str(root), selection_split="test",
                   reporting_splits=("test",))
