"""The model-stock and learned-layerwise recipes on tiny state dicts (fast, CPU only, no Ray or
MLflow). Model Stock is checked against an in-memory reference that computes every pairwise
cosine explicitly; tiny chunks force every tensor across many chunks and both reading threads."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from blobs import blobs, finetune, make_model

from orchestrator.data.splits import TensorSplit
from orchestrator.soups.io import stream
from orchestrator.soups.io.weights import save_weights
from orchestrator.soups.learned import cook_learned_layerwise, learned_soup
from orchestrator.soups.model_stock import cook_model_stock, model_stock_soup, model_stock_t
from orchestrator.soups.recipe import BUILTIN, RecipeInputs, RecipeOptions, default_recipes, get_recipe

QUIET = lambda s: None


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(stream, "CHUNK_BYTES", 40)


@pytest.fixture(scope="module")
def world():
    """Blob MLPs fine-tuned from one init, and a held-out set."""
    model = make_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = blobs(300, 1)
    states = [finetune(init, x, y, lr, seed) for lr, seed in [(0.05, 0), (0.1, 1), (0.02, 2), (0.1, 3)]]
    xho, yho = blobs(150, 2)
    return {"model": model, "init": init, "states": states, "x": xho, "y": yho}


def reference(ingredients, base):
    """Model Stock in memory, every pair explicit: per float tensor, the mean cosine over pairs
    i < j of nonzero updates; t = 1 without a pair; else the paper's t, 0 for cos <= 0."""
    n, out, ts = len(ingredients), {}, {}
    for k, w0 in base.items():
        if not w0.is_floating_point():
            out[k] = ingredients[0][k].clone()
            continue
        d = [(s[k].double() - w0.double()).flatten() for s in ingredients]
        live = [x for x in d if x.norm() > 0]
        cos = [F.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(live, 2)]
        c = float(torch.stack(cos).mean()) if cos else None
        t = 1.0 if c is None else 0.0 if c <= 0 else min(1.0, n * c / (1 + (n - 1) * c))
        mean = torch.stack([s[k].double() for s in ingredients]).mean(0)
        out[k], ts[k] = (t * mean + (1 - t) * w0.double()).to(w0.dtype), t
    return out, ts


def toy(n=4, seed=0):
    """A base and `n` fine-tunes of it: a shared update plus each one's own, so cosines differ
    per tensor; one tensor frozen in every ingredient, one left alone by ingredient 0, and an
    integer buffer that differs between ingredients."""
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(37, 11, generator=g), "a.bias": torch.randn(37, generator=g),
            "b.weight": torch.randn(5, 37, generator=g), "frozen": torch.randn(13, generator=g),
            "partly": torch.randn(29, generator=g), "steps": torch.tensor([3])}
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()}
    ingredients = []
    for i in range(n):
        own = {k: v + 0.5 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in shared.items()}
        own["frozen"] = torch.zeros(13)
        if i == 0:
            own["partly"] = torch.zeros(29)
        ingredients.append({**{k: base[k] + own[k] for k in own}, "steps": torch.tensor([3 + i])})
    return base, ingredients


def assert_close(got, expected, atol=1e-5):
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert torch.allclose(got[k].double(), expected[k].double(), atol=atol, rtol=0), k


# --- model-stock ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_equals_the_all_pairs_reference(tiny_chunks, n):
    base, ingredients = toy(n, seed=n)
    lines = []
    res = model_stock_soup(ingredients, base, log=lines.append)
    expected, ts = reference(ingredients, base)
    assert_close(res.state_dict, expected)
    assert res.stats["t"] == pytest.approx(ts, abs=1e-6)
    assert 0 < min(ts.values()) < max(ts.values()) == 1.0  # varied, and the frozen tensor at 1
    assert res.stats["cos"]["frozen"] is None and res.stats["heldout_passes"] == 0
    assert res.recipe == "model-stock" and res.kept == list(range(n)) and res.heldout_acc is None
    assert set(res.coefficients) == set(ts)
    assert all(c == pytest.approx([res.stats["t"][k] / n] * n) for k, c in res.coefficients.items())
    assert torch.equal(res.state_dict["steps"], ingredients[0]["steps"])  # integer: the first's
    assert torch.allclose(res.state_dict["frozen"], base["frozen"], atol=1e-6)  # t 1: the mean
    assert len(lines) == 1 and lines[0].startswith(f"model-stock soup: {n} ingredients, t from ")
    assert lines[0].endswith(f"over {len(ts)} tensors (mean {sum(ts.values()) / len(ts):.3f})")


def test_model_stock_on_real_fine_tunes_from_one_init(world):
    """The blob MLPs, fine-tuned from the model's init: the pretrained base of every ingredient."""
    ingredients, init = world["states"], world["init"]
    res = model_stock_soup(ingredients, init, log=QUIET)
    expected, ts = reference(ingredients, init)
    assert_close(res.state_dict, expected)
    assert res.stats["t"] == pytest.approx(ts, abs=1e-6)


@pytest.mark.parametrize("cos", [0.9, 0.5, 0.1])
def test_two_ingredients_match_the_papers_closed_form(cos):
    """N = 2: t = 2 cos / (1 + cos), for updates at a known angle (and of different lengths)."""
    e1, e2 = torch.zeros(2, 8), torch.zeros(2, 8)
    e1[0, 0], e2[1, 3] = 1.0, 1.0
    base = {"w": torch.randn(2, 8, generator=torch.Generator().manual_seed(1))}
    d2 = cos * e1 + math.sqrt(1 - cos ** 2) * e2
    ingredients = [{"w": base["w"] + 0.3 * e1}, {"w": base["w"] + 2.0 * d2}]
    res = model_stock_soup(ingredients, base, log=QUIET)
    t = 2 * cos / (1 + cos)
    assert res.stats["cos"]["w"] == pytest.approx(cos, abs=1e-6)
    assert res.stats["t"]["w"] == pytest.approx(t, abs=1e-6) == model_stock_t(cos, 2)
    mean = (ingredients[0]["w"] + ingredients[1]["w"]) / 2
    assert torch.allclose(res.state_dict["w"], t * mean + (1 - t) * base["w"], atol=1e-6)


def test_parallel_updates_give_the_mean_and_orthogonal_ones_the_base(tiny_chunks):
    g = torch.Generator().manual_seed(2)
    base, d = {"w": torch.randn(6, 10, generator=g)}, torch.randn(6, 10, generator=g)
    same = [{"w": base["w"] + d} for _ in range(3)]
    scaled = [{"w": base["w"] + c * d} for c in (0.5, 1.0, 3.0)]
    for ingredients in (same, scaled):
        res = model_stock_soup(ingredients, base, log=QUIET)
        assert res.stats["t"]["w"] == pytest.approx(1.0, abs=1e-6)
        mean = torch.stack([s["w"] for s in ingredients]).mean(0)
        assert torch.allclose(res.state_dict["w"], mean, atol=1e-6)
    # Disjoint supports: every pair of updates orthogonal, cos 0, so t 0 and the soup is the base.
    orthogonal = []
    for i in range(4):
        delta = torch.zeros(6, 10)
        delta[i] = torch.randn(10, generator=g)
        orthogonal.append({"w": base["w"] + delta})
    res = model_stock_soup(orthogonal, base, log=QUIET)
    assert res.stats["t"]["w"] == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(res.state_dict["w"], base["w"], atol=1e-6)


def test_opposed_updates_fall_back_to_the_base():
    """cos < 0 (updates that disagree) gives t = 0, not the formula's value past its pole."""
    base = {"w": torch.zeros(4), "v": torch.zeros(4)}
    d = torch.tensor([1.0, 2.0, 0.0, -1.0])
    # "v": one update zero, the other two opposed: cos = -1 < -1/(N - 1), where the formula gives 3
    ingredients = [{"w": d, "v": torch.zeros(4)}, {"w": -d, "v": d}, {"w": 0.5 * d, "v": -d}]
    res = model_stock_soup(ingredients, base, log=QUIET)
    assert res.stats["t"] == {"w": 0.0, "v": 0.0}
    assert res.stats["cos"]["v"] == pytest.approx(-1.0)
    assert all(torch.equal(res.state_dict[k], base[k]) for k in base)
    assert model_stock_t(-1.0, 3) == 0.0 and model_stock_t(1.0 + 1e-9, 3) == 1.0


def test_files_and_state_dicts_give_identical_soups(tmp_path, tiny_chunks):
    base, ingredients = toy(4)
    g = torch.Generator().manual_seed(3)
    base["h"] = torch.randn(9, generator=g).half()  # a float16 tensor: mixed in float32, kept float16
    states = [{**s, "h": (base["h"] + 0.1 * torch.randn(9, generator=g)).half()} for s in ingredients]
    paths = [save_weights(s, tmp_path / f"ing{i}.safetensors") for i, s in enumerate(states)]
    base_path = save_weights(base, tmp_path / "base.safetensors")
    in_memory = model_stock_soup(states, base, log=QUIET)
    for ings, b in ((paths, base_path), (paths, base), (states, base_path)):
        got = model_stock_soup(ings, b, log=QUIET)
        assert set(got.state_dict) == set(in_memory.state_dict)
        assert all(torch.equal(got.state_dict[k], in_memory.state_dict[k]) for k in got.state_dict)
        assert got.stats == in_memory.stats and got.coefficients == in_memory.coefficients
    assert in_memory.state_dict["h"].dtype == torch.float16


def test_an_incompatible_base_is_refused_naming_the_tensor():
    base, ingredients = toy(3)
    names = ["run-a", "run-b", "run-c"]
    with pytest.raises(ValueError, match=r"the base: tensor 'b\.weight' is \(5, 36\).*run-a has \(5, 37\)"):
        model_stock_soup(ingredients, {**base, "b.weight": torch.zeros(5, 36)}, names=names, log=QUIET)
    missing = {k: v for k, v in base.items() if k != "a.bias"}
    with pytest.raises(ValueError, match=r"tensor 'a\.bias' is not in both run-a and the base"):
        model_stock_soup(ingredients, missing, names=names, log=QUIET)
    with pytest.raises(ValueError, match=r"ingredient 0 has"):  # unnamed ingredients: by position
        model_stock_soup(ingredients, {**base, "a.bias": torch.zeros(36)}, log=QUIET)


def test_model_stock_recipe_needs_the_base_and_two_ingredients_or_returns_the_one():
    base, ingredients = toy(3)
    assert get_recipe("model-stock").build is cook_model_stock
    assert get_recipe("model-stock").settings(RecipeOptions(strict=True)) == {}
    assert get_recipe("model-stock").summary.startswith("Model Stock: ")
    inputs = RecipeInputs(ingredients, ["a", "b", "c"], [0.5, 0.4, 0.3], None, None, log=QUIET)
    with pytest.raises(ValueError, match=r"model-stock needs the base weights .*\(RecipeInputs\.base\)"):
        cook_model_stock(inputs)
    res = cook_model_stock(RecipeInputs(ingredients, ["a", "b", "c"], [0.5, 0.4, 0.3], None, None,
                                        log=QUIET, base=base))
    assert res.recipe == "model-stock"
    assert_close(res.state_dict, reference(ingredients, base)[0])
    with pytest.raises(ValueError, match="model-stock needs at least 2 ingredients"):
        model_stock_soup(ingredients[:1], base, log=QUIET)
    said = []  # the cook's recipe with one ingredient left: that ingredient, and a line saying why
    one = cook_model_stock(RecipeInputs(ingredients[:1], ["a"], [0.5], None, None, log=said.append, base=base))
    assert one.recipe == "model-stock" and one.kept == [0]
    assert_close(one.state_dict, ingredients[0])
    assert said == ["model-stock soup: one ingredient left, no angle between updates: it is that ingredient"]


# --- learned-layerwise ---------------------------------------------------------------------------

def test_learned_layerwise_is_a_builtin_recipe_with_the_learned_settings():
    recipe = get_recipe("learned-layerwise")
    assert recipe.build is cook_learned_layerwise
    assert recipe.settings(RecipeOptions(learned_mode="stacked")) == {"learned_mode": "stacked"}
    assert recipe.summary.startswith("Learned soup by layer: one coefficient per ingredient per")
    assert BUILTIN == default_recipes() == ("uniform", "greedy", "learned", "learned-layerwise",
                                            "model-stock")


def test_learned_layerwise_recipe_returns_one_coefficient_per_ingredient_per_tensor(world):
    lines = []
    heldout = TensorSplit("heldout", world["x"], world["y"])
    inputs = RecipeInputs(world["states"], [f"run{i}" for i in range(4)], [0.5] * 4, world["model"],
                          heldout, RecipeOptions(learned_mode="memory"), lines.append, world["init"])
    res = get_recipe("learned-layerwise").build(inputs)
    assert res.recipe == "learned-layerwise" and res.kept == [0, 1, 2, 3]
    assert isinstance(res.coefficients, dict) and set(res.coefficients) == set(world["states"][0])
    assert all(len(c) == 4 and sum(c) == pytest.approx(1.0, abs=1e-5) for c in res.coefficients.values())
    assert len({tuple(c) for c in res.coefficients.values()}) > 1  # the tensors did not all agree
    assert lines[-1].startswith("learned-layerwise soup (memory): held-out loss ")
    glob = get_recipe("learned").build(inputs)
    assert glob.recipe == "learned" and isinstance(glob.coefficients, list)
    assert lines[-1].startswith("learned soup (memory): held-out loss ")


def test_learned_layerwise_streaming_and_stacked_agree_with_memory(world, tmp_path, tiny_chunks):
    model, x, y = world["model"], world["x"], world["y"]
    paths = [save_weights(s, tmp_path / f"ing{i}.safetensors") for i, s in enumerate(world["states"])]
    kw = {"per_layer": True, "steps": 15, "lr": 0.1, "batch_size": 64, "seed": 3, "log": QUIET,
          "stack_dtype": torch.float32}
    ref = learned_soup(world["states"], model, x, y, mode="memory", **kw)
    for mode in ("streaming", "stacked"):
        got = learned_soup(paths, model, x, y, mode=mode, **kw)
        assert got.recipe == "learned-layerwise" and set(got.coefficients) == set(ref.coefficients)
        for k, c in ref.coefficients.items():
            assert got.coefficients[k] == pytest.approx(c, abs=1e-5), (mode, k)
        assert [h["loss"] for h in got.steps] == pytest.approx([h["loss"] for h in ref.steps], abs=1e-5)
        assert_close(got.state_dict, ref.state_dict, atol=1e-5)
