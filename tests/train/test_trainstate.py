"""A run's resumable state: resumed at an epoch's end or mid-epoch, the weights come out
bit-identical to the uninterrupted run's; the global batch splits evenly or is refused."""

import json
from pathlib import Path

import pytest
import torch

from orchestrator import data
from orchestrator.config import ConfigError, FinetuneConfig, SearchSpace, validate, with_overrides
from orchestrator.train import state as trainstate
from orchestrator.train.finetune import Hooks, Plan, finetune

pytestmark = pytest.mark.slow


class Recorder(Hooks):
    """Writes every checkpoint to a folder of its own; resumes from `resume` when given."""

    def __init__(self, root: Path, resume: Path | None = None):
        self.root, self.resume, self.names, self.logged = root, resume, [], []

    def resume_folder(self):
        return self.resume

    def log_steps(self, step, metrics):
        self.logged.append(step)

    def checkpoint(self, position, metrics, write):
        name = f"e{position.epoch}-s{position.step}"
        write(self.root / name)
        self.names.append(name)


@pytest.fixture(scope="module")
def setup():
    cfg = validate(FinetuneConfig, {"train": {
        "epochs": 3, "batch_size": 32, "warmup_steps": 4, "augment": "randaugment", "mixup_alpha": 0.4,
        "label_smoothing": 0.1, "checkpoint_every_steps": 7, "log_every_steps": 5, "seed": 3}})
    return cfg, data.load_task(cfg.data)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_at_an_epoch_end_or_mid_epoch_is_bit_identical(setup, tmp_path):
    cfg, task = setup
    full = Recorder(tmp_path)
    whole = finetune(cfg, task=task, max_steps=12, hooks=full)
    assert "e2-s0" in full.names and "e2-s2" in full.names  # epoch 1 ended; global step 14 = step 2 of epoch 2
    assert full.logged == sorted(set(full.logged))
    for name in ("e2-s0", "e2-s2"):
        again = finetune(cfg, task=task, max_steps=12, hooks=Recorder(tmp_path / "again", tmp_path / name))
        assert _same(again.state_dict, whole.state_dict), name
        assert [r["epoch"] for r in again.curves] == [1, 2, 3]
        assert again.curves == whole.curves


def test_a_checkpoint_is_safetensors_and_json_only(setup, tmp_path):
    cfg, task = setup
    finetune(with_overrides(cfg, {"train.epochs": 1}), task=task, max_steps=3, hooks=Recorder(tmp_path))
    folder = tmp_path / "e2-s0"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [trainstate.MODEL, trainstate.OPTIMIZER, trainstate.RNG, trainstate.STATE])
    doc = json.loads((folder / trainstate.STATE).read_text())
    assert doc["position"] == {"epoch": 2, "step": 0, "global_step": 3}
    assert trainstate.peek(folder).position.global_step == 3


def test_one_process_with_micro_batches_matches_in_loss_and_sees_every_image():
    plan = Plan.of(100, with_overrides(FinetuneConfig(), {"train.batch_size": 32}).train, 2, None)
    assert plan.steps == 4  # 3 full batches and a last one of 4 images, split 2 + 2
    seen = []
    for step in range(plan.steps):
        for rank in range(2):
            seen += [step * 32 + p for s, e, _ in plan.micro_slices(step, rank, 2) for p in range(s, e)]
    assert sorted(seen) == list(range(100))  # disjoint shards covering the epoch
    tiny_rest = Plan.of(97, with_overrides(FinetuneConfig(), {"train.batch_size": 32}).train, 2, None)
    assert tiny_rest.steps == 3  # a last batch of 1 image cannot feed 2 workers: dropped


@pytest.mark.parametrize("space, message", [
    ({"base": {"train": {"batch_size": 63}}, "sweep": {"resources": {"workers": 2}}},
     "key 'base.train.batch_size': train.batch_size 63 does not split evenly across 2 workers"),
    ({"base": {"train": {"batch_size": 64, "micro_batch_size": 24}}, "sweep": {"resources": {"workers": 2}}},
     "train.micro_batch_size 24 does not divide the 32 images each of the 2 workers takes per step"),
    ({"search": {"train.batch_size": {"choice": [64, 96, 100]}}, "sweep": {"resources": {"workers": 8}}},
     "key 'search.train.batch_size': train.batch_size 100 does not split evenly across 8 workers"),
    ({"sweep": {"resources": {"workers": 2, "gpu": 0.5}}},
     "key 'sweep.resources.gpu': a trial of 2 workers needs whole GPUs per worker"),
])
def test_a_batch_that_does_not_split_is_refused_naming_the_key(space, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(SearchSpace, space)
