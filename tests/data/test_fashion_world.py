"""The Fashion-MNIST world's plumbing on synthetic files in the official formats: a Debian
``dataset-*`` package's gzipped idx files copied where torchvision looks for them, the train
range and train size of a task, the web slice its base is pretrained on kept apart from the
task, and the demo's choice of world when the files are missing."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch
import yaml

from orchestrator import cli, data, demo
from orchestrator.config import DataConfig, SearchSpace, load_yaml
from orchestrator.data import fashion, tvsets
from orchestrator.data.trust import DataError
from tests.data.test_tvsets import _images, _write_idx


def _debian_package(packages, n_train: int = 200, n_test: int = 40):
    """`<packages>/fashion-mnist/` as Debian's dataset-fashion-mnist lays it out: the four idx
    files, gzipped; train's labels cycle through the ten classes."""
    raw = packages / "plain"
    train_labels = [k % 10 for k in range(n_train)]
    test_labels = [k % 10 for k in range(n_test)]
    _write_idx(raw, "train", _images(train_labels, 0), train_labels)
    _write_idx(raw, "t10k", _images(test_labels, 1), test_labels)
    pkg = packages / "fashion-mnist"
    pkg.mkdir(parents=True)
    for f in raw.iterdir():
        (pkg / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    return raw, train_labels


@pytest.fixture
def debian(tmp_path, monkeypatch):
    packages = tmp_path / "datasets"
    raw, labels = _debian_package(packages)
    monkeypatch.setattr(tvsets, "DEBIAN_DATASETS", packages)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return raw, labels, tmp_path / "cache" / "model-soup" / "torchvision"


def test_a_debian_package_is_copied_where_torchvision_looks_and_read(debian):
    raw, labels, root = debian
    found = tvsets.find(DataConfig(dataset="torchvision", source="FashionMNIST"))  # no root: the cache's
    assert found.source == f"torchvision.datasets.FashionMNIST at {root}"
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert (root / "FashionMNIST" / "raw" / name).read_bytes() == (raw / name).read_bytes()
    assert found.train.labels == tuple(labels) and len(found.test.labels) == 40
    assert np.array_equal(np.asarray(found.train.reader.open(3)), _images(labels, 0)[3])


def test_a_missing_or_partial_package_copies_nothing(tmp_path, monkeypatch):
    import torchvision.datasets

    packages = tmp_path / "datasets"
    monkeypatch.setattr(tvsets, "DEBIAN_DATASETS", packages)
    (packages / "fashion-mnist").mkdir(parents=True)
    (packages / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"x"))
    assert not tvsets.debian_copy(torchvision.datasets.FashionMNIST, str(tmp_path / "root"), packages)
    assert not tvsets.debian_copy(torchvision.datasets.CIFAR10, str(tmp_path / "root"), packages)
    assert not (tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    with pytest.raises(ValueError, match="found no files under .*data.download: true fetches them"):
        tvsets.find(DataConfig(dataset="torchvision", source="FashionMNIST", root=str(tmp_path / "root")))


def _cfg(**kw) -> DataConfig:
    return DataConfig(dataset="torchvision", source="FashionMNIST", image_size=32, shifts=(), **kw)


def test_train_range_and_size_carve_held_out_and_train_from_the_range_only(debian):
    task = data.load_task(_cfg(train_range=(0, 100), heldout_fraction=0.2, train_size=40))
    assert len(task.heldout) == 20 and len(task.train) == 40 and len(task.test) == 40
    assert torch.bincount(task.heldout.labels).tolist() == [2] * 10  # stratified
    assert torch.bincount(task.train.labels).tolist() == [4] * 10
    rows = {int(p.rsplit(" ", 1)[1]) for split in (task.train, task.heldout) for p in split.dataset.paths}
    assert len(rows) == 60 and max(rows) < 100  # none from train's rows 100..199
    again = data.load_task(_cfg(train_range=(0, 100), heldout_fraction=0.2, train_size=40))
    assert again.train.dataset.paths == task.train.dataset.paths  # seeded
    other = data.load_task(_cfg(train_range=(0, 100), heldout_fraction=0.2, train_size=40, split_seed=1))
    assert other.train.dataset.paths != task.train.dataset.paths


def test_a_range_past_the_end_and_a_size_past_what_is_left_are_refused_in_one_line(debian):
    with pytest.raises(DataError, match=r"^data.train_range \[150, 300\] reaches past the 200 images of train$"):
        data.load_task(_cfg(train_range=(150, 300)))
    with pytest.raises(DataError, match=r"^data.train_size 90 is more than the 80 training images left"):
        data.load_task(_cfg(train_range=(0, 100), heldout_fraction=0.2, train_size=90))
    with pytest.raises(ValueError, match="train_range"):
        load_yaml(SearchSpace, _space_with(debian[2].parent, {"train_range": [5, 5]}))


def _space_with(folder, data_update: dict):
    space = yaml.safe_load(fashion.SPACE.read_text())
    space["base"]["data"].update(data_update)
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_the_world_keeps_its_base_s_web_slice_apart_from_its_task():
    cfg = load_yaml(SearchSpace, fashion.SPACE).base.data
    assert tuple(cfg.train_range) == fashion.TASK
    assert fashion.TASK[1] <= fashion.WEB[0]  # disjoint whatever the split seed
    assert tuple(fashion.web_config().train_range) == fashion.WEB
    assert tuple(cfg.classnames) == fashion.CLASSNAMES


def test_the_demo_runs_the_digits_world_when_fashion_is_missing_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tvsets, "DEBIAN_DATASETS", tmp_path / "no-packages")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(demo.WORLDS, "fashion", _space_with(tmp_path, {"download": False}))
    said = []
    assert demo.choose_world(None, said.append) == demo.WORLDS["digits"]
    assert len(said) == 1 and said[0].startswith("demo: Fashion-MNIST is not on this machine (no Debian "
                                                 "package dataset-fashion-mnist under ")
    assert said[0].endswith("; running the digits world instead")
    assert demo.choose_world("digits", said.append) == demo.WORLDS["digits"] and len(said) == 1
    with pytest.raises(demo.WorldUnavailable, match="Fashion-MNIST is not on this machine"):
        demo.choose_world("fashion")
    for key in demo.hermetic_env(tmp_path) | {"RAY_ADDRESS": ""}:  # run_demo sets them for its process:
        if key in os.environ:  # restored after this test, as they were
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    assert cli.main(["demo", "--world", "fashion", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("soup demo: error: Fashion-MNIST is not on this machine")


def test_the_demo_chooses_fashion_when_its_package_is_there(debian):
    assert demo.choose_world(None, pytest.fail) == demo.WORLDS["fashion"]
    assert demo.choose_world("fashion", pytest.fail) == demo.WORLDS["fashion"]


@pytest.mark.slow
def test_the_world_s_base_is_pretrained_on_the_web_slice_from_the_glyph_base(tmp_path):
    """`soup pretrain-base --world fashion`, a few steps: the glyph base trained on (the written
    weights differ from it) with glyphs and the web slice's captioned images, never the task's."""
    from safetensors.torch import load_file

    from orchestrator.train import models
    from orchestrator.train.pretrain import pretrain_fashion

    if (why := fashion.missing()) is not None:
        pytest.skip(why)
    said = []
    path = pretrain_fashion(tmp_path, steps=2, batch_size=16, glyph_pool=100, log=said.append)
    assert path == tmp_path / models.FASHION_CHECKPOINT.name
    assert "web slice: 30000 Fashion-MNIST train images 30000..59999" in said
    assert any(s.startswith("captions: ") and "by kind only" in s for s in said)
    assert said[-1].startswith("  zero-shot Fashion-MNIST held-out: ")
    new, glyph = load_file(str(path)), load_file(str(models.TINY_CHECKPOINT))
    assert new.keys() == glyph.keys()
    assert any(not torch.equal(new[k], glyph[k]) for k in new)
    committed = models.build_classifier(load_yaml(SearchSpace, fashion.SPACE).base.model, fashion.CLASSNAMES)
    assert models.resolve_pretrained(models.FASHION_PRETRAINED) == str(models.FASHION_CHECKPOINT)
    assert committed.head.weight.shape == (10, 64)
