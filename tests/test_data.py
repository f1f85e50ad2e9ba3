import numpy as np
import torch

from orchestrator import data
from orchestrator.config import DataConfig


def test_splits_are_fixed_disjoint_and_stratified():
    task = data.load_task(DataConfig())
    sizes = len(task.train), len(task.heldout), len(task.test)
    assert sum(sizes) == 1797 and min(sizes) > 200
    keys = [set(map(lambda t: t.numpy().tobytes(), s.images)) for s in (task.train, task.heldout, task.test)]
    assert not (keys[1] & keys[2]), "held-out and test share images"
    for split in (task.train, task.heldout, task.test):
        counts = torch.bincount(split.labels, minlength=10)
        assert counts.min() > 0.7 * counts.max()
    first = data._stratified_split(data._digits()[1], DataConfig())
    second = data._stratified_split(data._digits()[1], DataConfig())
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
    a = data.render_batch(list("0123A"), np.random.default_rng(3))
    b = data.render_batch(list("0123A"), np.random.default_rng(3))
    c = data.render_batch(list("0123A"), np.random.default_rng(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 3, 32, 32) and a.max() > 0.5
