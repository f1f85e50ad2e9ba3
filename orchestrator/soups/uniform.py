"""The uniform soup: the plain mean of every ingredient's weights, streamed from files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from orchestrator.soups.io.stream import Ingredient
from orchestrator.soups.io.weights import stream_weighted_sum
from orchestrator.soups.recipe import RecipeInputs, SoupResult, register


@register("uniform")
def cook_uniform(inputs: RecipeInputs) -> SoupResult:
    """Uniform soup: the mean of every ingredient's weights."""
    return uniform_soup(inputs.ingredients, names=inputs.names)


def uniform_soup(ingredients: Sequence[Ingredient], names: Sequence[str] | None = None,
                 out: str | Path | None = None, metadata: dict[str, str] | None = None) -> SoupResult:
    """Average all ingredients (safetensors paths or state dicts) with coefficients 1/N.

    Ingredients are read chunk by chunk: memory is one output model (none with `out`, where the
    soup is written to that safetensors file and returned as `path` with an empty `state_dict`)
    plus small buffers, whatever N. Bit-identical to `weighted_average`. Refuses incompatible
    ingredients, naming the ingredient and tensor.
    """
    n = len(ingredients)
    coefficients = [1.0 / n] * n if n else []
    state = stream_weighted_sum(ingredients, coefficients, names, out=out, metadata=metadata)
    if out is not None:
        return SoupResult("uniform", {}, coefficients, list(range(n)), [], None, path=Path(state))
    return SoupResult("uniform", state, coefficients, list(range(n)), [], None)
