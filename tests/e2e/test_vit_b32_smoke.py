"""CPU smoke test of the real-world path: open_clip ViT-B-32 at 224 px on ImageNet-layout folders.

No CLIP weights can be downloaded here, so the base is ViT-B-32 with seeded random weights saved
as a local safetensors file (the same route as `pretrained: /path/to/base.safetensors` on a
cluster). Two trials train two steps each through Ray Tune and MLflow, then one cook mixes the
two checkpoints (uniform, greedy, learned, Model Stock from the real zero-shot base). Accuracies mean nothing here; shapes, plumbing and lineage do.
"""

from pathlib import Path

import pytest
import yaml
from benches import load_benchmark
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LEARNED_STEPS = 5


def _space(tmp: Path) -> Path:
    """The smoke sweep's data tree, random base and space, written under `tmp` by the one
    definition that `benchmarks/cook_cost.py` also measures (the first three ImageNet classes as
    random JPEGs, a seeded random ViT-B-32 base, two learning rates, two steps each)."""
    return load_benchmark("cook_cost")._vit_space(tmp)


def test_vit_b32_two_steps_then_cook_on_cpu(hermetic):
    import ray

    from orchestrator.cook.driver import cook
    from orchestrator.sweep.driver import run_sweep

    tmp = hermetic["tmp"]
    space = _space(tmp)
    # five steps of the learned soups, not 50: each is a forward and backward pass of a ViT-B/32
    # on one CPU thread (about 1.9 s here), and five go through the same path
    text = yaml.safe_load(space.read_text())
    space.write_text(yaml.safe_dump({**text, "cook": {"learned_steps": LEARNED_STEPS}}))
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
    learned = client.get_model_version("vitb32-smoke-soup", res.versions["learned"])
    assert learned.tags["learned_steps"] == str(LEARNED_STEPS)  # cook.learned_steps, a setting of its own
    assert {p["name"]: p for p in res.phases}["learned"]["passes"] == 3 * LEARNED_STEPS + 3
