"""Every shipped search space loads and validates; the paper's space samples inside its ranges."""

from pathlib import Path

import pytest

from orchestrator.config import FinetuneConfig, SearchSpace, load_yaml
from orchestrator.sweep.driver import param_space, sample_configs

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml")) + sorted((REPO / "tests" / "spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_space_validates_and_opens_with_its_command(path):
    space = load_yaml(SearchSpace, path)
    assert param_space(space)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "soup sweep " + str(path.relative_to(REPO)) in first


# Every YAML the project ships for `soup` (deploy/ has its own test, tests/test_deploy.py).
EVERY_YAML = sorted(p for d in ("search_spaces", "examples") for ext in ("*.yaml", "*.yml")
                    for p in (REPO / d).rglob(ext))
SCHEMAS = {"soup sweep": SearchSpace, "soup finetune": FinetuneConfig, "soup zeroshot": FinetuneConfig}


@pytest.mark.parametrize("path", EVERY_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_loads_with_the_command_it_names(path):
    """Each file's header names the command it is for; the project's loader accepts it as such."""
    header = " ".join(line for line in path.read_text().splitlines()[:5] if line.startswith("#"))
    named = [cmd for cmd in SCHEMAS if f"{cmd} " in header and str(path.relative_to(REPO)) in header]
    assert named, f"{path.name}: its header names no `soup ...` command with its own path"
    load_yaml(SCHEMAS[named[0]], path)


def test_every_shipped_yaml_is_found():
    assert {p.relative_to(REPO).as_posix() for p in EVERY_YAML} >= {
        "search_spaces/tiny_digits.yaml", "search_spaces/tiny_fashion.yaml", "search_spaces/clip_vit_b32_imagenet.yaml",
        "search_spaces/clip_vit_l14_imagenet.yaml", "examples/tiny_digits/finetune.yaml"}


def test_paper_space_samples_stay_in_the_papers_ranges():
    space = load_yaml(SearchSpace, REPO / "search_spaces" / "clip_vit_b32_imagenet.yaml")
    assert space.sweep.num_samples == 72 and space.base.model.arch == "ViT-B-32"
    assert space.base.data.heldout_fraction == 0.02 and space.base.train.batch_size == 512
    cfgs = sample_configs(space, 400, seed=1)
    t = [c.train for c in cfgs]
    assert all(1e-6 <= x.lr <= 1e-4 for x in t)
    assert all(8e-5 <= x.weight_decay <= 0.53 for x in t)
    assert all(4 <= x.epochs <= 16 for x in t) and {x.epochs for x in t} == set(range(4, 17))
    assert all(0 <= x.randaug_magnitude <= 20 and 0 <= x.randaug_num_ops <= 2 for x in t)
    assert all(x.mixup_alpha == 0.0 or 0.0 < x.mixup_alpha < 0.9 for x in t)
    assert all(x.label_smoothing == 0.0 or 0.0 < x.label_smoothing < 0.23 for x in t)
    frac = lambda pred: sum(map(pred, t)) / len(t)  # noqa: E731
    assert 0.3 < frac(lambda x: x.augment == "none") < 0.5
    assert 0.4 < frac(lambda x: x.mixup_alpha == 0.0) < 0.6
    assert 0.4 < frac(lambda x: x.label_smoothing == 0.0) < 0.6
    assert len({x.lr for x in t}) == len(t)


def test_sampling_is_reproducible():
    space = load_yaml(SearchSpace, REPO / "search_spaces" / "tiny_digits.yaml")
    assert sample_configs(space, 8, seed=3) == sample_configs(space, 8, seed=3)
    assert sample_configs(space, 8, seed=3) != sample_configs(space, 8, seed=4)
