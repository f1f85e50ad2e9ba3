"""The recipe table: one signature for every soup recipe, and the result every recipe returns.

A recipe is one file under `orchestrator/soups/` that decorates one function with `@register`:
the function takes a `RecipeInputs` and returns a `SoupResult`. The cook, the CLI's help and its
validation know recipes only through this table, so a recipe defined anywhere (a plugin, a test
module) is cooked and registered as soon as its module is imported. The built-in recipes
register themselves when the `orchestrator.soups` package is imported (its `__init__` imports
them), so this module imports nothing of the package.

(This is the table of *recipes*; MLflow's model registry, where soups are registered as model
versions, is reached through `orchestrator.tracking` only.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The built-in recipes (each in the module of its name), in the cook's default order.
BUILTIN = ("uniform", "greedy", "learned", "learned-layerwise", "model-stock")
LEARNED_STEPS = 50  # a learned soup's optimisation steps unless ``cook.learned_steps`` says otherwise


@dataclass(frozen=True)
class RecipeOptions:
    """How recipes run, as chosen by the user (space's ``cook:`` section or ``soup cook`` flags).

    `strict`: the greedy rule keeps a candidate only if held-out accuracy rises (the reference
    code's ``>``), instead of the paper's ``>=``. `learned_mode`: how the learned soup gets its
    gradients (``auto``: stacked when the ingredients fit `memory_budget`, else sampled;
    ``stacked``: every ingredient read once and held on the device; ``sampled``:
    `learned_sample` ingredients mixed and differentiated per step; ``streaming``: memory flat
    in the number of ingredients, every one read at every step). `memory_budget`: ``("bytes",
    n)`` or ``("share", f)`` of the device's free memory (``cook.memory_budget``, parsed); None:
    the learned recipe's default share. `learned_steps`: the learned soups' optimisation steps.
    """

    strict: bool = False
    learned_mode: str = "auto"
    memory_budget: tuple[str, float] | None = None
    learned_sample: int = 8
    learned_steps: int = LEARNED_STEPS


@dataclass(frozen=True)
class RecipeInputs:
    """Everything a recipe may use, one object for every recipe.

    `ingredients` are safetensors paths (or in-memory state dicts), named by `names` (in the cook,
    each trial's run name and run id prefix) and scored by `scores` (their individual held-out accuracies, for ranking).
    `model` gives the architecture and device (its own weights are not an ingredient);
    `heldout` is the selection split (anything with ``batches``, ``tensors`` and ``labels``).
    `base` is the weights every ingredient was fine-tuned from (the pretrained classifier with
    its initial head: a safetensors path or a state dict); None when unknown. `finish_order` is
    each ingredient's place in the order its trial finished (0 first); None when unknown.
    """

    ingredients: Sequence[Any]
    names: Sequence[str]
    scores: Sequence[float]
    model: nn.Module
    heldout: Any
    options: RecipeOptions = RecipeOptions()
    log: Callable[[str], None] = print
    base: Any = None
    finish_order: Sequence[int] | None = None


@dataclass
class SoupResult:
    """A built soup: its weights, how they were mixed, and how it got there."""

    recipe: str
    state_dict: dict[str, torch.Tensor]
    coefficients: list[float] | dict[str, list[float]]  # original ingredient order
    kept: list[int]  # indices of the ingredients used, in the order they were added
    steps: list[dict] = field(default_factory=list)  # history, for logging and plots
    heldout_acc: float | None = None
    stats: dict = field(default_factory=dict)  # recipe-specific totals (e.g. examples evaluated)
    path: Path | None = None  # set when the soup was written to a file instead (state_dict empty)


@dataclass(frozen=True)
class Recipe:
    """A registered recipe: its name, its build function and the options it depends on.

    `settings` maps the user's options to the ones that make this recipe's soup what it is (the
    greedy rule for greedy, the mode for learned): they are part of the soup's identity and are
    recorded with its registered version.
    """

    name: str
    build: Callable[[RecipeInputs], SoupResult]
    settings: Callable[[RecipeOptions], dict[str, Any]] = lambda options: {}
    summary: str = ""


RECIPES: dict[str, Recipe] = {}


def register(name: str, settings: Callable[[RecipeOptions], Mapping[str, Any]] | None = None
             ) -> Callable[[Callable[[RecipeInputs], SoupResult]], Callable]:
    """Decorator: make ``build(inputs: RecipeInputs) -> SoupResult`` the recipe `name`.

    `settings(options)` names the options this recipe's soup depends on (default: none); the
    first line of the function's docstring is its summary in ``soup cook --help``.
    """
    def deco(build: Callable[[RecipeInputs], SoupResult]) -> Callable:
        summary = (build.__doc__ or "").strip().splitlines()[0] if build.__doc__ else ""
        RECIPES[name] = Recipe(name, build, (lambda o: dict(settings(o))) if settings else
                               (lambda o: {}), summary)
        return build
    return deco


def get_recipe(name: str) -> Recipe:
    """The recipe registered as `name`; ValueError naming the known recipes otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown soup recipe {name!r}; known: {', '.join(sorted(RECIPES))}") from None


def recipe_names() -> list[str]:
    """Every registered recipe: the built-in ones first, in their default order, then the rest."""
    return [*BUILTIN, *sorted(set(RECIPES) - set(BUILTIN))]


def default_recipes() -> tuple[str, ...]:
    """The recipes a cook builds when none are named: the built-in ones."""
    return BUILTIN


def option_defaults() -> dict[str, Any]:
    """Each `RecipeOptions` field's default value."""
    return {f.name: f.default for f in fields(RecipeOptions)}
