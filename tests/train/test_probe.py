"""The linear-probe head (LP-FT): class-stratified sample, features in batches, the fitted head."""

import dataclasses
import warnings

import pytest
import torch

from orchestrator import data
from orchestrator.config import DataConfig, ModelConfig
from orchestrator.data.splits import TensorSplit
from orchestrator.train import evaluate, models, probe
from orchestrator.train.accel import CPU, Accel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny ops, and two spinning OpenMP threads crawl on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def by_class(counts) -> torch.Tensor:
    """Labels stored class by class, as ImageNet's training folders are listed."""
    return torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts))


# --- stratified_sample ---------------------------------------------------------------------------

def test_sample_covers_every_class_of_a_class_ordered_split():
    labels = by_class([3 + i % 10 for i in range(1000)])  # 1,000 classes of 3 to 12 images
    idx = probe.stratified_sample(labels, 2000, 1000, seed=0)
    assert len(idx) == 2000 and torch.equal(idx, idx.sort().values) and len(idx.unique()) == 2000
    assert torch.equal(torch.bincount(labels[idx], minlength=1000), torch.full((1000,), 2))
    # the first 2,000 images, as the old probe took them, hold only a quarter of the classes
    assert len(labels[:2000].unique()) < 300


def test_sample_is_seeded():
    labels = by_class([20] * 50)
    a, b = (probe.stratified_sample(labels, 300, 50, seed=7) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, probe.stratified_sample(labels, 300, 50, seed=8))


def test_small_classes_give_all_they_have_and_the_rest_fills_up():
    labels = by_class([1, 2, 50, 50, 50])
    idx = probe.stratified_sample(labels, 100, 5, seed=0)
    counts = torch.bincount(labels[idx], minlength=5).tolist()
    assert counts[:2] == [1, 2] and sum(counts) == 100 and max(counts) - min(counts[2:]) <= 1
    assert torch.equal(probe.stratified_sample(labels, 10**6, 5, seed=0), torch.arange(len(labels)))


def test_fewer_images_than_classes_is_raised_to_one_a_class():
    labels = by_class([4] * 10)
    with pytest.warns(UserWarning, match="raised to 10"):
        idx = probe.stratified_sample(labels, 3, 10, seed=0)
    assert torch.equal(torch.bincount(labels[idx], minlength=10), torch.ones(10, dtype=torch.int64))


def test_a_class_without_images_is_a_one_line_error():
    labels = by_class([3, 3, 0, 3, 0])
    with pytest.raises(ValueError, match=r"^class 2 \(and 1 more\) has no training image") as err:
        probe.stratified_sample(labels, 10, 5, seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="^label 7 is outside the model's 5 classes$"):
        probe.stratified_sample(torch.tensor([0, 1, 7]), 3, 5, seed=0)


# --- fit_probe_head ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CountingAccel(Accel):
    """The CPU accel, counting the image batches that go through `to_device`."""

    seen: list = dataclasses.field(default_factory=list)

    def to_device(self, x):
        self.seen.append(len(x))
        return super().to_device(x)


def counting_cpu() -> CountingAccel:
    return CountingAccel(CPU.device, CPU.precision, CPU.channels_last, CPU.loader)


class NoTensors(TensorSplit):
    def tensors(self, limit=None):
        raise AssertionError("the probe must read batches, not the whole split")


def test_thousand_class_head_from_batched_features():
    names = [f"thing {i}" for i in range(1000)]
    clf = models.build_classifier(ModelConfig(), names)
    g = torch.Generator().manual_seed(0)
    labels = by_class([3] * 1000)  # class-ordered, like ImageNet
    split = NoTensors("train", torch.rand(len(labels), 3, 32, 32, generator=g), labels)
    accel = counting_cpu()
    clf.train()
    stats = probe.fit_probe_head(clf, split, 2000, accel, seed=0, batch_size=256)
    assert (stats.images, stats.classes, stats.feature_dim) == (2000, 1000, 64) and stats.seconds > 0
    assert clf.head.weight.shape == (1000, 64) and clf.head.bias.shape == (1000,)
    assert torch.isfinite(clf.head.weight).all() and torch.isfinite(clf.head.bias).all()
    assert sum(accel.seen) == 2000 and max(accel.seen) <= 256 and len(accel.seen) == 8
    assert clf.training  # the mode it was in


def test_head_keeps_every_model_class_row():
    clf = models.build_classifier(ModelConfig(), [str(d) for d in range(10)])
    labels = by_class([5] * 10)
    split = TensorSplit("train", torch.rand(len(labels), 3, 32, 32), labels)
    stats = probe.fit_probe_head(clf, split, 20, CPU)
    assert clf.head.weight.shape == (10, 64) and stats.classes == 10 and stats.images == 20
    missing = TensorSplit("train", split.images[:15], labels[:15])  # classes 0-2 only
    with pytest.raises(ValueError, match=r"^class 3 \(and 6 more\) has no training image"):
        probe.fit_probe_head(clf, missing, 20, CPU)


@pytest.fixture(scope="module")
def tiny():
    return data.load_task(DataConfig())


def test_probe_beats_zero_shot_on_heldout_and_is_deterministic(tiny):
    clf = models.build_classifier(ModelConfig(), tiny.classnames)
    zero_shot = evaluate.accuracy(clf, tiny.heldout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = probe.fit_probe_head(clf, tiny.train, 50_000, CPU, seed=0)
    assert stats.images == len(tiny.train) and stats.classes == 10
    first = clf.head.weight.clone()
    fitted = evaluate.accuracy(clf, tiny.heldout)
    assert fitted >= max(zero_shot, 0.85)  # the scikit-learn probe reached 0.93 on held-out
    assert evaluate.accuracy(clf, tiny.train) > fitted - 0.1
    probe.fit_probe_head(clf, tiny.train, 50_000, CPU, seed=0)
    assert torch.equal(clf.head.weight, first)


def test_regression_matches_scikit_learn_objective():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    w, b = probe.fit_softmax_regression(x, y, 3, c=1.0)
    ref = LogisticRegression(C=1.0, tol=1e-8, max_iter=5000).fit(x.numpy(), y.numpy())
    assert torch.allclose(w, torch.tensor(ref.coef_, dtype=torch.float32), atol=1e-2)
    assert torch.allclose(b, torch.tensor(ref.intercept_, dtype=torch.float32), atol=1e-2)
