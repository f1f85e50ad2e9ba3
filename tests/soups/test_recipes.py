"""Soup recipes on tiny MLPs fine-tuned from one shared init on 2-D blobs (fast, CPU only)."""

import pytest
import torch
import torch.nn.functional as F
from blobs import blobs, finetune, make_model

from orchestrator.soups.ensemble import greedy_ensemble, logit_ensemble
from orchestrator.soups.greedy import cook_greedy, greedy_soup
from orchestrator.soups.io.weights import check_compatible, weighted_average
from orchestrator.soups.learned import cook_learned, heldout_loss_and_acc, learned_soup
from orchestrator.soups.recipe import RECIPES, SoupResult, get_recipe
from orchestrator.soups.uniform import cook_uniform, uniform_soup

QUIET = lambda s: None  # noqa: E731


@pytest.fixture(scope="module")
def world():
    """Ingredients from one init (varied lr and seed, one over-driven), plus a held-out set."""
    model = make_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    xtr, ytr = blobs(300, 1)
    xho, yho = blobs(150, 2)
    states = [finetune(init, xtr, ytr, lr, seed) for lr, seed in
              [(0.05, 0), (0.1, 1), (0.02, 2), (0.1, 3), (3.0, 4)]]

    def acc(state):
        return heldout_loss_and_acc(model, state, xho, yho)[1]

    return {"model": model, "states": states, "x": xho, "y": yho, "acc": acc,
            "scores": [acc(s) for s in states]}


def test_registry_knows_the_recipes():
    assert get_recipe("uniform").build is cook_uniform
    assert get_recipe("greedy").build is cook_greedy
    assert get_recipe("learned").build is cook_learned
    with pytest.raises(ValueError, match="known: .*greedy.*learned.*uniform"):
        get_recipe("bouillabaisse")
    assert set(RECIPES) >= {"uniform", "greedy", "learned"}


@pytest.mark.parametrize("name", ["uniform", "greedy", "learned"])
def test_every_recipe_takes_the_one_inputs_object(world, name):
    """The cook calls every recipe the same way: `build(RecipeInputs)` -> `SoupResult`."""
    from orchestrator.data.splits import TensorSplit
    from orchestrator.soups.recipe import RecipeInputs, RecipeOptions

    heldout = TensorSplit("heldout", world["x"], world["y"])
    inputs = RecipeInputs(world["states"], [f"run{i}" for i in range(5)], world["scores"],
                          world["model"], heldout, RecipeOptions(learned_mode="memory"), QUIET)
    res = get_recipe(name).build(inputs)
    assert isinstance(res, SoupResult) and res.recipe == name
    assert set(res.state_dict) == set(world["states"][0]) and res.kept


def test_recipe_settings_are_the_options_each_soup_depends_on():
    from orchestrator.config import LEARNED_MODES
    from orchestrator.soups.learned import MODES
    from orchestrator.soups.recipe import RecipeOptions

    opts = RecipeOptions(strict=True, learned_mode="stacked")
    assert get_recipe("uniform").settings(opts) == {}
    assert get_recipe("greedy").settings(opts) == {"strict": True}
    assert get_recipe("learned").settings(opts) == {"learned_mode": "stacked"}
    assert set(LEARNED_MODES) <= set(MODES)  # what a space may choose, the recipe can do


def test_soup_keys_keep_the_first_releases_layout():
    """Soups registered before the recipe table keep their keys: a re-cook finds them."""
    import hashlib
    import json

    from orchestrator.cook.driver import soup_key

    def old(recipe, ids, strict, mode="streaming"):
        key = [recipe, strict if recipe == "greedy" else None, ids]
        if recipe == "learned" and mode != "streaming":
            key.append(mode)
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]

    ids = ["a", "b"]
    assert soup_key("uniform", ids, {}) == old("uniform", ids, False)
    for strict in (False, True):
        assert soup_key("greedy", ids, {"strict": strict}) == old("greedy", ids, strict)
    for mode in ("streaming", "stacked"):
        assert soup_key("learned", ids, {"learned_mode": mode}) == old("learned", ids, False, mode)


def test_learned_steps_are_a_setting_of_their_own_only_off_their_default(world):
    """``cook.learned_steps`` reaches the learned soup; at its default (50) the settings, and so
    the soup keys and the cook's record, are what they were before the setting existed."""
    from orchestrator.config import SearchSpace, validate
    from orchestrator.cook.driver import recipe_options, soup_key
    from orchestrator.data.splits import TensorSplit
    from orchestrator.soups.recipe import LEARNED_STEPS, RecipeInputs, RecipeOptions

    assert LEARNED_STEPS == 50
    learned = get_recipe("learned")
    assert learned.settings(RecipeOptions(learned_mode="stacked")) == {"learned_mode": "stacked"}
    ten = RecipeOptions(learned_mode="stacked", learned_steps=10)
    assert learned.settings(ten) == {"learned_mode": "stacked", "learned_steps": 10}
    ids = ["a", "b"]
    assert soup_key("learned", ids, learned.settings(ten)) != soup_key("learned", ids, {"learned_mode": "stacked"})
    space = validate(SearchSpace, {"cook": {"learned_steps": 10}})
    assert recipe_options(space).learned_steps == 10
    assert recipe_options(validate(SearchSpace, {})).learned_steps == LEARNED_STEPS
    said = []
    inputs = RecipeInputs(world["states"], [f"run{i}" for i in range(5)], world["scores"], world["model"],
                          TensorSplit("heldout", world["x"], world["y"]),
                          RecipeOptions(learned_mode="stacked", learned_steps=3), said.append)
    cook_learned(inputs)
    assert any("after 3 steps" in line for line in said), said


def test_uniform_soup_is_the_mean(world):
    states = world["states"]
    res = uniform_soup(states)
    assert isinstance(res, SoupResult) and res.recipe == "uniform"
    assert res.coefficients == pytest.approx([0.2] * 5) and res.kept == list(range(5))
    for k in states[0]:
        assert torch.allclose(res.state_dict[k], torch.stack([s[k] for s in states]).mean(0), atol=1e-6)


def test_greedy_soup_beats_best_single_and_matches_its_coefficients(world):
    states, scores = world["states"], world["scores"]
    res = greedy_soup(states, world["acc"], scores, log=QUIET)
    best = max(range(len(states)), key=lambda i: scores[i])
    assert res.kept[0] == best and res.heldout_acc >= max(scores)
    assert 4 not in res.kept  # the over-driven ingredient lies in another basin
    assert len(res.steps) == len(states) and [s["heldout_acc"] for s in res.steps] == sorted(
        s["heldout_acc"] for s in res.steps)  # never drops
    assert res.coefficients == pytest.approx([1 / len(res.kept) if i in res.kept else 0.0
                                              for i in range(len(states))])
    expected = weighted_average(states, res.coefficients)
    assert all(torch.allclose(res.state_dict[k], expected[k], atol=1e-6) for k in expected)
    assert world["acc"](res.state_dict) == res.heldout_acc  # the returned soup is the one scored


def test_strict_rule_rejects_ties_the_default_rule_keeps():
    states = [{"w": torch.full((2,), float(i))} for i in range(4)]
    flat = lambda state: 0.5  # noqa: E731  every soup ties with the best single
    loose = greedy_soup(states, flat, [0.9, 0.8, 0.7, 0.6], log=QUIET)
    strict = greedy_soup(states, flat, [0.9, 0.8, 0.7, 0.6], strict=True, log=QUIET)
    assert loose.kept == [0, 1, 2, 3] and torch.allclose(loose.state_dict["w"], torch.full((2,), 1.5))
    assert strict.kept == [0] and strict.coefficients == [1.0, 0.0, 0.0, 0.0]
    assert torch.equal(strict.state_dict["w"], states[0]["w"])
    # Accuracy as the soup's weight: ingredients 1 and 2 pull it down, 3 lifts it.
    mixed = [{"w": torch.full((2,), v)} for v in (0.0, -1.0, -1.0, 2.0)]
    by_weight = lambda state: float(state["w"][0])  # noqa: E731
    for rule in (False, True):
        assert greedy_soup(mixed, by_weight, [0.9, 0.8, 0.7, 0.6], strict=rule, log=QUIET).kept == [0, 3]


@pytest.mark.parametrize("per_layer", [False, True])
def test_learned_soup_lowers_the_heldout_loss(world, per_layer):
    states, model, x, y = world["states"], world["model"], world["x"], world["y"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(per_layer=per_layer, steps=40, lr=0.1, batch_size=64, seed=3, log=QUIET)
    res = learned_soup(states, model, x, y, **kw)
    uniform_loss = heldout_loss_and_acc(model, weighted_average(states), x, y)[0]
    assert heldout_loss_and_acc(model, res.state_dict, x, y)[0] <= uniform_loss
    coeffs = res.coefficients
    if per_layer:
        assert isinstance(coeffs, dict) and set(coeffs) == set(states[0])
        assert all(sum(c) == pytest.approx(1.0, abs=1e-5) for c in coeffs.values())
    else:
        assert isinstance(coeffs, list) and sum(coeffs) == pytest.approx(1.0, abs=1e-5)
    for k in states[0]:
        c = coeffs[k] if per_layer else coeffs
        expected = sum(float(ci) * s[k] for ci, s in zip(c, states))
        assert torch.allclose(res.state_dict[k], expected, atol=1e-6)
    again = learned_soup(states, model, x, y, **kw)
    assert again.coefficients == coeffs
    assert all(torch.equal(again.state_dict[k], res.state_dict[k]) for k in states[0])
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)  # model untouched


def test_incompatible_ingredients_are_refused_by_name(world):
    states = [dict(s) for s in world["states"][:3]]
    states[2]["2.weight"] = torch.zeros(4, 16)
    names = ["run-a", "run-b", "run-c"]
    match = r"run-c: tensor '2\.weight'"
    with pytest.raises(ValueError, match=match):
        check_compatible(states, names)
    with pytest.raises(ValueError, match=match):
        uniform_soup(states, names=names)
    with pytest.raises(ValueError, match=match):
        greedy_soup(states, world["acc"], [0.3, 0.2, 0.1], names=names, log=QUIET)
    with pytest.raises(ValueError, match=match):
        learned_soup(states, world["model"], world["x"], world["y"], steps=1, names=names, log=QUIET)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_ensemble_is_never_worse_than_the_best_single(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (200,), generator=g)
    # Noisy "models": the true class boosted by a model-specific amount.
    logits = [torch.randn(200, 5, generator=g) + s * F.one_hot(labels, 5)
              for s in torch.rand(6, generator=g) * 2]
    singles = [(lg.argmax(1) == labels).float().mean().item() for lg in logits]
    kept, acc, steps = greedy_ensemble(logits, labels, singles)
    assert kept[0] == max(range(6), key=lambda i: singles[i]) and acc >= max(singles)
    mean = logit_ensemble([logits[i] for i in kept])
    assert (mean.argmax(1) == labels).float().mean().item() == acc
    assert len(steps) == 6 and steps[-1]["heldout_acc"] == acc
