import math

import pytest
import torch

from orchestrator.config import with_overrides
from orchestrator.train.finetune import finetune

pytestmark = pytest.mark.slow


def test_finetune_returns_curves_metrics_logits_and_weights(tiny_finetune_config):
    cfg = with_overrides(tiny_finetune_config, {"train.epochs": 2})
    seen = []
    res = finetune(cfg, on_epoch=seen.append)
    assert [r["epoch"] for r in res.curves] == [1, 2] and seen == res.curves
    assert all(math.isfinite(r["train_loss"]) for r in res.curves)
    m = res.metrics()
    assert set(m) == {"heldout_acc", "test_acc", "shift_rotate_acc", "shift_noise_acc",
                      "shift_blur_acc", "shift_invert_acc", "shift_rendered_acc", "shift_mean_acc"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert res.logits["test"].shape == (539, 10)
    assert set(res.logits) == {"heldout", "test", "rotate", "noise", "blur", "invert", "rendered"}
    assert all(k.startswith(("visual.", "head.")) for k in res.state_dict)


def test_same_seed_same_weights_other_seed_other_weights(tiny_finetune_config):
    a = finetune(tiny_finetune_config)
    b = finetune(tiny_finetune_config)
    c = finetune(with_overrides(tiny_finetune_config, {"train.seed": 1}))
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.test_acc == b.test_acc
    assert any(not torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)


@pytest.mark.parametrize("overrides", [
    {"train.augment": "randaugment", "train.randaug_magnitude": 15},
    {"train.augment": "none", "train.mixup_alpha": 0.4, "train.label_smoothing": 0.1},
    {"model.head_init": "linear_probe", "train.lr": 1e-5},
])
def test_every_option_trains_deterministically(tiny_finetune_config, overrides):
    cfg = with_overrides(tiny_finetune_config, overrides)
    a, b = finetune(cfg), finetune(cfg)
    assert torch.equal(a.state_dict["head.weight"], b.state_dict["head.weight"])
    assert a.heldout_acc > 0.2


def test_the_held_out_split_is_scored_once_an_epoch_and_not_again_at_the_end(tiny_finetune_config):
    """The last epoch's held-out pass is the final model's: its logits are the final result's
    (one forward pass over held-out per epoch, none more), equal to scoring the weights afresh."""
    from dataclasses import replace

    from orchestrator import data
    from orchestrator.data.splits import TensorSplit
    from orchestrator.train import evaluate, models

    passes = []

    class Counted(TensorSplit):
        def batches(self, *args, **kw):
            passes.append(self.name)
            yield from super().batches(*args, **kw)

    cfg = with_overrides(tiny_finetune_config, {"train.epochs": 2})
    task = data.load_task(cfg.data)
    held = task.heldout
    res = finetune(cfg, task=replace(task, heldout=Counted(held.name, held.images, held.labels)))
    assert passes == ["heldout", "heldout"]
    assert res.heldout_acc == res.curves[-1]["heldout_acc"]
    model = models.build_classifier(cfg.model, task.classnames)
    model.load_state_dict(res.state_dict)
    assert torch.equal(res.logits["heldout"], evaluate.logits(model, held))
