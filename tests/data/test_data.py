
import numpy as np
import pytest
import torch

from orchestrator import data
from orchestrator.config import DataConfig
from orchestrator.data import digits as tinyworld


def test_splits_are_fixed_disjoint_and_stratified():
    task = data.load_task(DataConfig())
    sizes = len(task.train), len(task.heldout), len(task.test)
    assert sum(sizes) == 1797 and min(sizes) > 200
    keys = [set(map(lambda t: t.numpy().tobytes(), s.images)) for s in (task.train, task.heldout, task.test)]
    assert not (keys[1] & keys[2]), "held-out and test share images"
    for split in (task.train, task.heldout, task.test):
        counts = torch.bincount(split.labels, minlength=10)
        assert counts.min() > 0.7 * counts.max()
    first = tinyworld._stratified_split(tinyworld._digits()[1], DataConfig())
    second = tinyworld._stratified_split(tinyworld._digits()[1], DataConfig())
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_other_seed_gives_other_split():
    a = data.load_task(DataConfig(split_seed=0)).test.images
    b = data.load_task(DataConfig(split_seed=1)).test.images
    assert not torch.equal(a, b)


def test_shifts_cover_the_test_split_and_differ_from_it():
    task = data.load_task(DataConfig())
    assert set(task.shifts) == {"rotate", "noise", "blur", "invert", "rendered"}
    for name, s in task.shifts.items():
        assert s.images.shape[1:] == (3, 32, 32)
        assert 0.0 <= s.images.min() and s.images.max() <= 1.0
        if name != "rendered":
            assert torch.equal(s.labels, task.test.labels)
            assert (s.images - task.test.images).abs().mean() > 0.02, name
    assert torch.equal(torch.bincount(task.shifts["rendered"].labels), torch.full((10,), 50))


def test_rendering_is_deterministic_per_seed():
    a = tinyworld.render_batch(list("0123A"), np.random.default_rng(3))
    b = tinyworld.render_batch(list("0123A"), np.random.default_rng(3))
    c = tinyworld.render_batch(list("0123A"), np.random.default_rng(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 3, 32, 32) and a.max() > 0.5


def test_unknown_data_set_names_the_known_ones():
    cfg = DataConfig(dataset="mnist")  # a name the schema takes; the table refuses it
    with pytest.raises(ValueError, match="data.dataset: unknown data set 'mnist'; known: tiny_digits, imagenet, "
                                         "folder, torchvision, huggingface"):
        data.load_task(cfg)


def test_shifts_are_per_data_set():
    """A bare name is the data set's own shift set or a corruption; a shift data set only where the
    data set takes one; names are refused with what the data set offers."""
    assert data.plan(DataConfig())[0] == tinyworld.SHIFTS  # the tiny world's own five
    named, made = data.plan(DataConfig(dataset="imagenet", shifts=("imagenet_r", "rotate")))
    assert named == ("imagenet_r",) and [(i, s.name, s.corruption, s.severity) for i, s in made] == [(1, "rotate", "rotate", 3)]
    with pytest.raises(ValueError, match="data.shifts: 'rendered' is not a shift of data set 'imagenet'; "
                                         "it offers imagenetv2, imagenet_r, .*, rotate, noise, blur, invert$"):
        data.check_config(DataConfig(dataset="imagenet", shifts=("rendered",)))
    with pytest.raises(ValueError, match="shift 'x': data set 'tiny_digits' takes no shift data sets"):
        data.check_config(DataConfig(shifts=({"name": "x", "root": "/d"},)))
    with pytest.raises(ValueError, match="shift 'x': unknown corruption 'fog'; known: rotate, noise, blur, invert"):
        data.check_config(DataConfig(dataset="folder", shifts=({"name": "x", "corruption": "fog"},)))
    assert data.plan(DataConfig(dataset="folder"))[1][3][1].name == "invert"  # default: the four corruptions
    with pytest.raises(ValueError, match=r"shift names must be unique: \['rotate'\]"):
        DataConfig(shifts=("rotate", {"name": "rotate", "corruption": "blur"}))


def test_a_corruption_of_the_tiny_world_is_made_from_its_test_split():
    task = data.load_task(DataConfig(shifts=("rendered", {"name": "blur5", "corruption": "blur", "severity": 5})))
    assert list(task.shifts) == ["rendered", "blur5"]
    assert torch.equal(task.shifts["blur5"].labels, task.test.labels)
    assert not torch.equal(task.shifts["blur5"].images, task.test.images)


def test_data_modules_import_one_way():
    # splits, listing <- each adapter <- the table (data/__init__): no adapter reaches another;
    # a user's own data sets (folder, tvsets, hfsets) only list, owntask and trust do the rest
    from test_architecture import module_graph

    graph = module_graph()
    d = "orchestrator.data"
    config = {"orchestrator.config", "orchestrator.config.loading"}
    assert graph[f"{d}.splits"] <= config and graph[f"{d}.listing"] == set()
    assert graph[f"{d}.digits"] <= config | {f"{d}.splits", "orchestrator.hashing"}
    assert graph[f"{d}.imagenet"] <= config | {f"{d}.splits"}
    for own in ("folder", "tvsets", "hfsets"):
        assert graph[f"{d}.{own}"] <= config | {f"{d}.listing"}, own
    assert graph[f"{d}.trust"] <= {f"{d}.listing"}
    assert graph[f"{d}.owntask"] <= config | {f"{d}.listing", f"{d}.splits", f"{d}.trust"}
    adapters = {f"{d}.{m}" for m in ("digits", "imagenet", "folder", "tvsets", "hfsets")}
    assert adapters <= graph[d]


def test_the_built_tiny_world_is_cached_and_read_back_identical(tmp_path, monkeypatch):
    from orchestrator.config import DataConfig
    from orchestrator.data import digits as tinyworld

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = DataConfig(split_seed=3)
    built = tinyworld.load_digits_task(cfg)
    (cached,) = (tmp_path / "model-soup").glob("tinyworld-*.safetensors")
    again = tinyworld.load_digits_task(cfg)
    for name, split in {"train": built.train, "heldout": built.heldout, "test": built.test, **built.shifts}.items():
        other = again.shifts[name] if name in built.shifts else getattr(again, name)
        assert other.name == split.name
        assert torch.equal(other.images, split.images) and torch.equal(other.labels, split.labels)
    cached.write_bytes(b"not safetensors")  # a damaged file is rebuilt, not trusted
    assert torch.equal(tinyworld.load_digits_task(cfg).train.images, built.train.images)
    assert len(list((tmp_path / "model-soup").glob("tinyworld-*"))) == 1


def test_the_shipped_digits_are_scikit_learns_and_building_the_world_does_not_import_it(tmp_path):
    """The digits ship with the package (orchestrator/assets/digits.npz) so that the world's
    first build does not import scikit-learn (0.8 s); they are its `load_digits`, value for value."""
    import os
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    d = load_digits()
    with np.load(tinyworld.DIGITS_FILE, allow_pickle=False) as shipped:
        assert shipped["images"].dtype == np.uint8 and shipped["target"].dtype == np.uint8
        assert np.array_equal(shipped["images"], d.images) and np.array_equal(shipped["target"], d.target)
    code = ("import sys; from orchestrator.data import digits; from orchestrator.config import DataConfig; "
            "task = digits.load_digits_task(DataConfig()); "
            "print(len(task.train) + len(task.heldout) + len(task.test), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert out.stdout.split() == ["1797", "False"]
