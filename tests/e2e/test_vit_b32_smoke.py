"""CPU smoke test of the real-world path: open_clip ViT-B-32 at 224 px on ImageNet-layout folders.

No CLIP weights can be downloaded here, so the base is ViT-B-32 with seeded random weights saved
as a local safetensors file (the same route as `pretrained: /path/to/base.safetensors` on a
cluster). Two trials train two steps each through Ray Tune and MLflow, then one cook mixes the
two checkpoints (uniform, greedy, learned, Model Stock from the real zero-shot base). Accuracies mean nothing here; shapes, plumbing and lineage do.
"""

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLASSES = 3  # the first three ImageNet classes; ImageNet-R holds two of them


def _images(folder, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        w, h = 160 + 40 * (k % 3), 260 - 30 * (k % 2)  # not square: exercises resize + crop
        px = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"img_{k}.JPEG")


def _tree(root) -> None:
    from orchestrator.data.imagenet import imagenet_r_wnids, imagenet_wnids

    wnids = imagenet_wnids()[:CLASSES]
    for i, w in enumerate(wnids):
        _images(root / "imagenet" / "train" / w, 4, seed=i)
        _images(root / "imagenet" / "val" / w, 1, seed=100 + i)
        if w in imagenet_r_wnids():
            _images(root / "imagenet-r" / w, 1, seed=200 + i)


def _base(path) -> str:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _space(tmp, base: str) -> str:
    space = {
        "base": {"model": {"arch": "ViT-B-32", "pretrained": base, "templates": ["a photo of a {}."]},
                 "data": {"dataset": "imagenet", "root": str(tmp / "data"), "image_size": 224,
                          "heldout_fraction": 0.25, "shifts": ["imagenet_r"]},
                 "train": {"epochs": 1, "batch_size": 5, "warmup_steps": 1, "augment": "randaugment",
                           "device": "cpu"}},
        "search": {"train.lr": {"grid": [1.0e-5, 3.0e-5]}},
        "sweep": {"num_samples": 1, "max_concurrent_trials": 1, "resources": {"cpu": 1}},
        "tracking": {"experiment_name": "vitb32-smoke"},
    }
    path = tmp / "vitb32_smoke.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def test_vit_b32_two_steps_then_cook_on_cpu(hermetic):
    import ray

    from orchestrator.cook.driver import cook
    from orchestrator.sweep.driver import run_sweep

    tmp = hermetic["tmp"]
    _tree(tmp / "data")
    space = _space(tmp, _base(tmp / "vit-b-32-random.safetensors"))
    out = run_sweep(space, name="vitb32", storage_path=hermetic["storage"])
    assert (out.finished, out.failed) == (2, 0)
    client = MlflowClient(hermetic["uri"])
    trials = client.search_runs([out.experiment_id], "tags.`soup.role` = 'trial'")
    for t in trials:  # 12 training images, 3 held out: 9 to train on, in 2 steps of 5 and 4
        # MLflow step = global step: train_loss logged at the epoch's end, step 2
        assert [m.step for m in client.get_metric_history(t.info.run_id, "train_loss")] == [2]
        assert t.data.params["model.arch"] == "ViT-B-32"
    # stacked: two ViT-B/32s held once in bf16; streaming would read both 100 times (~67 GiB), a
    # cost the soup-scaling benchmark measures, not this plumbing test
    recipes = ("uniform", "greedy", "learned", "model-stock")
    res = cook("vitb32", recipes=recipes, tracking_uri=hermetic["uri"], learned_mode="stacked")
    ray.shutdown()
    rows = {r["name"]: r for r in res.rows}
    assert {f"{r} soup" for r in recipes} | {"best individual", "ensemble"} <= set(rows)
    assert set(res.versions) == set(recipes)
    assert {p["name"]: p for p in res.phases}["baselines"]["passes"] == 0  # from the trials' logits
    v = client.get_model_version("vitb32-smoke-soup", res.versions["uniform"])
    assert len(v.tags["ingredients"].split(",")) == 2
