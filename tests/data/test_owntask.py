"""A user's own task from a folder: splits carved when missing (seeded, stratified), images sized
for the model, shifts per task (corruptions at a severity, a shift folder of a class subset),
class names from the data or the config."""

import numpy as np
import pytest
import torch
from owndata import CLASSES, DISPLAY, write_folder

from orchestrator import data
from orchestrator.config import DataConfig
from orchestrator.data import owntask
from orchestrator.data.corruptions import CORRUPTIONS, corrupt
from orchestrator.data.splits import fingerprint

FOLDERS = tuple(sorted(CLASSES))


def cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), image_size=24, **kw)


def test_missing_splits_are_carved_from_train_seeded_and_stratified(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 20})
    task = data.load_task(cfg(root))
    assert task.classnames == tuple(DISPLAY[CLASSES.index(c)] for c in FOLDERS)
    assert [len(s) for s in (task.train, task.heldout, task.test)] == [33, 9, 18]  # 15% and 30% of each class
    for split in (task.heldout, task.test):
        assert torch.equal(torch.bincount(split.labels), torch.bincount(split.labels).max().repeat(3))
    paths = [set(s.dataset.paths) for s in (task.train, task.heldout, task.test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    again = data.load_task(cfg(root, split_seed=0, heldout_fraction=0.15000001))  # a new config, same seed
    assert again.heldout.dataset.paths == task.heldout.dataset.paths
    other = data.load_task(cfg(root, split_seed=1))
    assert other.heldout.dataset.paths != task.heldout.dataset.paths
    x, y = task.train.dataset[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 24, 24) and y == int(task.train.labels[0])


def test_carve_keeps_one_image_per_class_in_each_split_while_it_can():
    labels = np.array([0] * 3 + [1] * 10)
    held, test, train = owntask.carve(labels, (0.15, 0.3), seed=0)
    assert sorted(labels[held]) == [0, 1, 1] and sorted(labels[test]) == [0, 1, 1, 1]  # round(1.5) = 2
    assert sorted(labels[train]) == [0] + [1] * 5


def test_a_class_too_small_to_carve_is_refused(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 6})
    for f in sorted((root / "train" / FOLDERS[1]).iterdir())[1:]:  # one image left in a class
        f.unlink()
    with pytest.raises(ValueError, match="has too few training images to carve a held-out split from train"):
        data.load_task(cfg(root))


def test_corruptions_at_a_severity_and_a_shift_folder_of_a_class_subset(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 6, "heldout": 2, "test": 3})
    sub = write_folder(tmp_path / "s", {"x": 2}, classes=CLASSES[:2], names=False)
    task = data.load_task(cfg(root, shifts=("noise", {"name": "strong_blur", "corruption": "blur", "severity": 5},
                                           {"name": "drawn", "root": str(sub / "x")})))
    assert list(task.shifts) == ["noise", "strong_blur", "drawn"]
    noise, test = task.shifts["noise"], task.test
    assert torch.equal(noise.labels, test.labels) and fingerprint(noise) != fingerprint(test)
    x0, _ = test.dataset[1]
    assert torch.equal(noise.dataset[1][0], corrupt("noise", x0, 3, 1000 + 0, 1))  # seeded by position and index
    drawn = task.shifts["drawn"]
    kept = sorted(CLASSES[:2])  # the shift's classes, in its own (sorted folder) order
    assert drawn.project is not None and drawn.project.index == tuple(FOLDERS.index(c) for c in kept)
    assert drawn.project(torch.arange(6.0).reshape(2, 3)).shape == (2, 2)
    assert sorted(drawn.labels.tolist()) == [0, 0, 1, 1]


def test_a_shift_folder_with_a_class_the_task_lacks_is_refused(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 6, "heldout": 2, "test": 2})
    other = write_folder(tmp_path / "s", {"x": 1}, classes=("red_square", "purple_star"), names=False)
    with pytest.raises(ValueError, match=r"shift 'odd' has classes the task does not: \['purple_star'\]"):
        data.load_task(cfg(root, shifts=({"name": "odd", "root": str(other / "x")},)))


def test_class_names_from_the_config_replace_the_data_sets_and_must_match_its_count(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 6, "heldout": 2, "test": 2}, names=False)
    assert data.load_task(cfg(root)).classnames == tuple(c.replace("_", " ") for c in FOLDERS)
    assert data.load_task(cfg(root, classnames=("a", "b", "c"))).classnames == ("a", "b", "c")
    with pytest.raises(ValueError, match="data.classnames: 2 names for the data set's 3 classes"):
        data.load_task(cfg(root, classnames=("a", "b")))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_keeps_shape_and_dtype_and_grows_with_severity(name):
    img = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    img[:, 8:24, 8:24] = 250
    out = [corrupt(name, img, s, seed=0, index=3) for s in (1, 5)]
    assert all(o.dtype == torch.uint8 and o.shape == img.shape for o in out)
    d = [(o.float() - img.float()).abs().mean() for o in out]
    assert d[1] > d[0] > 0
    assert torch.equal(corrupt(name, img, 3, seed=0, index=3), corrupt(name, img, 3, seed=0, index=3))
    f = corrupt(name, img.float() / 255, 3, seed=0, index=3)
    assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 1


def test_evaluation_splits_held_in_memory_give_the_same_logits_and_only_when_they_fit(tmp_path):
    """`splits.resident` (the cook's evaluation splits, read once instead of once a soup): the
    same pixels, so the same logits, including a corruption and a class-subset shift; over the
    budget the task is returned as it is."""
    from orchestrator.data.splits import TensorSplit, resident
    from orchestrator.train import evaluate

    root = write_folder(tmp_path / "d", {"train": 6, "heldout": 2, "test": 3})
    sub = write_folder(tmp_path / "s", {"x": 2}, classes=CLASSES[:2], names=False)
    task = data.load_task(cfg(root, shifts=("blur", {"name": "drawn", "root": str(sub / "x")})))
    held = resident(task)
    assert held.train is task.train
    assert all(isinstance(s, TensorSplit) and s.images.dtype == torch.uint8
               for s in (held.heldout, held.test, *held.shifts.values()))
    assert list(held.shifts) == ["blur", "drawn"] and held.shifts["drawn"].project is task.shifts["drawn"].project
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 3))
    for name in ("heldout", "test", "blur", "drawn"):
        a = getattr(task, name, None) or task.shifts[name]
        b = getattr(held, name, None) or held.shifts[name]
        assert torch.equal(evaluate.logits(model, a), evaluate.logits(model, b)), name
        assert torch.equal(a.tensors()[0], b.tensors()[0])
    size = sum(len(s) for s in (task.heldout, task.test, *task.shifts.values())) * 3 * 24 * 24
    assert resident(task, max_bytes=size) is not task
    assert resident(task, max_bytes=size - 1) is task
