import pytest
import torch

from orchestrator import data
from orchestrator.config import DataConfig, ModelConfig
from orchestrator.data import digits as tinyworld
from orchestrator.hashing import file_sha256
from orchestrator.train import models
from orchestrator.train.evaluate import accuracy


def test_tiny_arch_is_registered_with_open_clip():
    import open_clip

    models.register_tiny_arch()
    assert "tiny-clip-glyphs" in open_clip.list_models()
    assert models.arch_config("tiny-clip-glyphs")["vision_cfg"]["image_size"] == 32


def test_named_open_clip_arch_builds_without_weights():
    cfg = models.arch_config("ViT-B-32")
    assert cfg["vision_cfg"]["width"] == 768
    with pytest.raises(ValueError, match="unknown architecture"):
        models.arch_config("no-such-arch")


def test_classifier_holds_only_tower_and_head():
    clf = models.build_classifier(ModelConfig(), tinyworld.DIGITS)
    keys = list(clf.state_dict())
    assert all(k.startswith(("visual.", "head.")) for k in keys)
    assert clf.head.weight.shape == (10, 64)
    assert clf(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_zero_shot_head_comes_from_the_text_tower():
    clip, tok = models.build_clip(ModelConfig())
    w1 = models.zeroshot_head(clip, tok, ["1", "7"], ["a photo of the digit {}."])
    w2 = models.zeroshot_head(clip, tok, ["7", "1"], ["a photo of the digit {}."])
    assert torch.allclose(w1, w2.flip(0))
    w3 = models.zeroshot_head(clip, tok, ["1", "7"], ["the letter {}."])
    assert not torch.allclose(w1, w3)


def test_base_checkpoint_beats_chance_zero_shot():
    task = data.load_task(DataConfig())
    clf = models.build_classifier(ModelConfig(), task.classnames)
    assert accuracy(clf, task.test) >= 0.30


def test_base_checkpoint_is_small_safetensors():
    assert models.TINY_CHECKPOINT.suffix == ".safetensors"
    assert models.TINY_CHECKPOINT.stat().st_size <= 20 * 2**20


def test_pickle_checkpoints_are_refused():
    with pytest.raises(ValueError, match="safetensors"):
        models.resolve_pretrained("weights.pt")


def test_the_probe_head_lives_in_one_place():
    # the linear-probe head is fitted by orchestrator.probe (tests/train/test_probe.py), not here
    assert not hasattr(models, "set_linear_probe_head")


def test_pretrained_ref_hashes_the_file():
    ref, digest = models.pretrained_ref(ModelConfig())
    assert ref == "tiny-glyphs" and digest == file_sha256(models.TINY_CHECKPOINT)


@pytest.mark.parametrize("arch", ["tiny-clip-glyphs", "ViT-B-32"])
def test_the_classifier_layout_is_the_classifiers_without_building_it(arch):
    """What the cook checks ingredients against: every tensor's name, shape and dtype of the
    classifier, as meta tensors (no storage: nothing loaded, no zero-shot text pass)."""
    cfg = ModelConfig(arch=arch, pretrained=None) if arch != "tiny-clip-glyphs" else ModelConfig()
    real = models.build_classifier(cfg, ["a", "b", "c"], pretrained_weights=False).state_dict()
    layout = models.classifier_layout(cfg, 3)
    assert list(layout) == list(real)
    assert all(layout[k].shape == real[k].shape and layout[k].dtype == real[k].dtype for k in real)
    assert all(t.is_meta for t in layout.values())
