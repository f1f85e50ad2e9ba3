"""Every shipped search space trains: one step end to end for each branch of each searched key.

Each case is (space file, searched key, one value it can draw): every value of a choice or grid,
the off value and one on value of a switchable range, one value of a plain range. ImageNet spaces
train on a synthetic 1,000-class folder tree in the real layout, with the tiny architecture
standing in for ViT-B/32 or ViT-L/14 (their weights cannot be downloaded here) under the same
1,000-class head; everything else is the space's own setting.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from orchestrator import data
from orchestrator.config import (
    TINY_ARCH,
    TINY_PRETRAINED,
    Distribution,
    SearchSpace,
    load_yaml,
    with_overrides,
)
from orchestrator.data import imagenet
from orchestrator.train import models, probe

SPACES = sorted((Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml"))
IMAGE_SIZE = 32  # the tiny tower's input size (patch size divides it)


def branches(d: Distribution) -> list:
    """The values a case is run with: each choice, the off value, and a range's midpoint."""
    kind = d.kind
    if kind in ("choice", "grid"):
        values = list(getattr(d, kind))
    else:
        lo, hi = getattr(d, kind)
        values = [{"loguniform": math.sqrt(lo * hi), "uniform": (lo + hi) / 2,
                   "randint": (lo + hi) // 2}[kind]]
    return ([d.off_value] if d.p_off > 0 else []) + values


def _label(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _files_missing(space: SearchSpace, path: Path) -> str | None:
    """Why a space on a torchvision data set cannot run here (its files are neither installed by
    a Debian package nor downloadable), else None. `.ci/run` installs Fashion-MNIST's."""
    if space.base.data.dataset != "torchvision":
        return None
    from orchestrator.data import fashion

    return fashion.missing(path)


def cases():
    for path in SPACES:
        space = load_yaml(SearchSpace, path)
        missing = _files_missing(space, path)
        marks = [pytest.mark.skip(reason=missing)] if missing else []
        for key, dist in space.search.items():
            for value in branches(dist):
                yield pytest.param(path, key, value, id=f"{path.stem}:{key}={_label(value)}", marks=marks)


# --- a synthetic ImageNet tree: 1,000 training classes, tiny val and shift sets ------------------

def _write(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        colour = ((seed * 37 + k * 91) % 256, (seed * 53) % 256, (seed * 11 + k * 29) % 256)
        Image.new("RGB", (12 + k % 3, 10), colour).save(folder / f"img_{k}.JPEG", quality=90)


def build_imagenet_tree(root: Path) -> None:
    wnids = imagenet.imagenet_wnids()
    for i, w in enumerate(wnids):
        _write(root / "imagenet" / "train" / w, 2, seed=i)
    for i in (0, 1, 6, 409, 504):
        _write(root / "imagenet" / "val" / wnids[i], 1, seed=i + 1)
    for i in (0, 999):
        _write(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(i), 1, seed=i)
    for w in imagenet.imagenet_r_wnids()[:2]:
        _write(root / "imagenet-r" / w, 1, seed=3)
    for w in imagenet.imagenet_a_wnids()[:2]:
        _write(root / "imagenet-a" / w, 1, seed=4)
    _write(root / "sketch" / wnids[1], 1, seed=5)
    for folder in list(imagenet.objectnet_classes())[:2]:
        _write(root / "objectnet-1.0" / "images" / folder, 1, seed=6)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet-1000")
    build_imagenet_tree(root)
    return root


_HEADS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these are many tiny ops, and on a busy 2-core machine two spinning
    OpenMP threads made the 1,000-class zero-shot head 30x slower (93 s against 3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_zeroshot_heads(monkeypatch):
    """Every case starts from the same tiny CLIP, so its zero-shot head for given class names and
    templates is the same: build it once (1,000 classes x 6 prompts through the text tower)."""
    build = models.zeroshot_head

    def cached(clip, tokenizer, classnames, templates):
        key = (tuple(classnames), tuple(templates))
        if key not in _HEADS:
            _HEADS[key] = build(clip, tokenizer, classnames, templates)
        return _HEADS[key].clone()

    monkeypatch.setattr(models, "zeroshot_head", cached)


def cheap(space: SearchSpace, root: Path) -> dict:
    """Overrides that make one trial of `space` a one-step CPU run of the tiny stand-in."""
    out = {"model.arch": TINY_ARCH, "model.pretrained": TINY_PRETRAINED, "model.probe_images": 2000,
           "train.epochs": 1, "train.batch_size": 8, "train.device": "cpu", "data.workers": 0}
    if space.base.train.micro_batch_size:  # keep gradient accumulation: 2 passes a step
        out["train.micro_batch_size"] = 4
    if space.base.data.dataset == "imagenet":
        out.update({"data.root": str(root), "data.image_size": IMAGE_SIZE})
    if space.base.data.dataset == "torchvision":
        out["data.shifts"] = ["rotate"]  # the branches are what is tested: one shift of 10,000 is enough
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("path", "key", "value"), list(cases()))
def test_space_branch_trains_one_step(path, key, value, imagenet_root, shared_zeroshot_heads, monkeypatch):
    from orchestrator.train.finetune import finetune

    space = load_yaml(SearchSpace, path)
    cfg = with_overrides(space.base, {**cheap(space, imagenet_root), key: value}, str(path))
    task = data.load_task(cfg.data)
    fitted = []
    fit = probe.fit_probe_head
    monkeypatch.setattr(probe, "fit_probe_head", lambda *a, **kw: fitted.append(fit(*a, **kw)) or fitted[-1])

    result = finetune(cfg, task=task, max_steps=1)

    rows = len(task.classnames)
    assert rows == (1000 if cfg.data.dataset == "imagenet" else 10)  # ImageNet; digits and Fashion-MNIST
    assert result.state_dict["head.weight"].shape[0] == rows
    assert all(torch.isfinite(t).all() for t in result.state_dict.values())
    assert all(math.isfinite(row["train_loss"]) for row in result.curves)
    assert len(result.curves) == cfg.train.epochs
    assert all(math.isfinite(v) for v in result.metrics().values())
    if cfg.model.head_init == "linear_probe":
        assert len(fitted) == 1, "build_model did not fit the head with probe.fit_probe_head"
        sample = probe.stratified_sample(task.train.labels, cfg.model.probe_images, rows, cfg.train.seed)
        assert len(torch.bincount(task.train.labels[sample], minlength=rows).nonzero()) == rows
        assert (fitted[0].classes, fitted[0].images) == (rows, len(sample))
    else:
        assert not fitted
