"""Logged logits: float16 on disk, bound to their checkpoint and to the labels they were
computed against; anything else is refused with the reason."""

import json

import torch
from safetensors import safe_open

from orchestrator.record import logits as logitstore


def _labeled(n=50, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return {"heldout": (labels, 30 * torch.randn(n, classes, generator=g)),
            "test": (labels.flip(0), 30 * torch.randn(n, classes, generator=g))}


def test_round_trip_is_float16_with_digests_and_the_checkpoint(tmp_path):
    labeled = _labeled()
    path = logitstore.save_logits(tmp_path / "l.safetensors", labeled, "abc")
    back = logitstore.load_logits(path)
    assert logitstore.checkpoint_of(path) == "abc"
    for split, (labels, logits) in labeled.items():
        assert back[split].logits.dtype == torch.float16
        shifted = logits - logits.max(1, keepdim=True).values  # each row's top at 0
        assert torch.allclose(back[split].logits.float(), shifted, rtol=1e-3, atol=1e-3)  # float16: 11 bits
        assert torch.equal(back[split].logits.float().argmax(1), logits.argmax(1))
        assert back[split].labels_sha256 == logitstore.labels_sha256(labels)
    assert json.loads(logitstore.splits_tag(labeled)) == {
        k: [v.n, v.labels_sha256] for k, v in back.items()}
    # 2 bytes per logit plus 4 per label, and a small header
    assert path.stat().st_size < 2 * 50 * 10 * 2 + 2 * 50 * 4 + 1024


def test_near_ties_keep_their_argmax(tmp_path):
    """Raw float16 would round 99.99 and 100.02 to the same value (0.06 apart near 100) and tie;
    shifted to a top of 0, the runner-up stays below it, alone and in an ensemble."""
    logits = torch.tensor([[99.99, 100.02, -3.0], [100.02, 99.99, 5.0]])
    labels = torch.tensor([1, 0])
    assert torch.equal(logits.half()[0, :2], logits.half()[1, :2].flip(0))  # the raw tie
    path = logitstore.save_logits(tmp_path / "l.safetensors", {"heldout": (labels, logits)})
    back = logitstore.load_logits(path)["heldout"].logits.float()
    assert torch.equal(back.argmax(1), torch.tensor([1, 0]))
    assert torch.equal((back + back).argmax(1), (logits + logits).argmax(1))


def test_logits_that_overflow_float16_stay_float32(tmp_path):
    labels = torch.zeros(3, dtype=torch.long)
    path = logitstore.save_logits(tmp_path / "l.safetensors", {"heldout": (labels, torch.tensor([[1e6, -1e6]] * 3))})
    assert logitstore.load_logits(path)["heldout"].logits.dtype == torch.float32


def test_mismatch_names_what_differs():
    labeled = _labeled()
    found = {k: (len(y), logitstore.labels_sha256(y)) for k, (y, _) in labeled.items()}
    wanted = {k: y for k, (y, _) in labeled.items()}
    assert logitstore.mismatch(found, wanted) is None
    assert logitstore.mismatch(None, wanted) == "no logged logits"
    assert "no logged logits for split 'shift'" in logitstore.mismatch(found, {**wanted, "shift": wanted["test"]})
    assert "cover 50 examples, the split has 49" in logitstore.mismatch(found, {"test": wanted["test"][:49]})
    reordered = {"heldout": wanted["heldout"].roll(1)}
    assert "other labels (or another order)" in logitstore.mismatch(found, reordered)


def test_the_tag_is_read_back_and_garbage_is_none(tmp_path):
    labeled = _labeled()
    assert logitstore.from_tag(logitstore.splits_tag(labeled))["heldout"][0] == 50
    assert logitstore.from_tag("not json") is None and logitstore.from_tag(None) is None


def test_the_file_holds_no_pickle(tmp_path):
    path = logitstore.save_logits(tmp_path / "l.safetensors", _labeled(), "abc")
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"logits/heldout", "logits/test", "labels/heldout", "labels/test"}
