"""A recipe defined outside the package, with `@register` and nothing else, is cooked and
registered by `soup cook --recipes <its name>`: neither the cook nor the CLI names recipes."""

import shutil

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.soups.io.weights import stream_weighted_sum
from orchestrator.soups.recipe import RECIPES, RecipeInputs, SoupResult, register

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# Sorts after the built-in recipes, so that the "known: greedy, learned, uniform" of other tests'
# error messages stays a prefix while this module is loaded.
NAME = "weighted-by-rank"


@register(NAME)
def rank_weighted(inputs: RecipeInputs) -> SoupResult:
    """Rank-weighted soup: ingredient k of N (best first) weighs N - k (a test recipe)."""
    n = len(inputs.ingredients)
    order = sorted(range(n), key=lambda i: -inputs.scores[i])
    weights = [0.0] * n
    for rank, i in enumerate(order):
        weights[i] = float(n - rank)
    coefficients = [w / sum(weights) for w in weights]
    state = stream_weighted_sum(inputs.ingredients, coefficients, inputs.names)
    return SoupResult(NAME, state, coefficients, order)


@pytest.fixture(scope="module", autouse=True)
def _unregister():
    yield
    RECIPES.pop(NAME, None)


def test_a_recipe_registered_by_a_test_module_is_cooked_and_registered(cooked, tmp_path, capsys,
                                                                        monkeypatch):
    shutil.copy(cooked["tmp"] / "mlflow.db", tmp_path / "mlflow.db")  # a copy: the shared store stays
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(SystemExit):
        main(["cook", "--help"])
    assert NAME in "".join(capsys.readouterr().out.split())  # the help lists the recipe table
    assert main(["cook", "--sweep", "c4", "--recipes", NAME, "--no-ray"]) == 0
    assert f"{NAME} soup" in capsys.readouterr().out
    client = MlflowClient(uri)
    runs = client.search_runs([r.info.experiment_id for r in [client.get_run(
        cooked["sweep"].parent_run_id)]], f"tags.recipe = '{NAME}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    versions = [v for v in client.search_model_versions("name = 'tiny4-soup'")
                if v.tags.get("recipe") == NAME]
    assert len(versions) == 1 and versions[0].run_id == runs[0].info.run_id
    assert float(versions[0].tags["heldout_acc"]) > 0.5
