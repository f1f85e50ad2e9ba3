"""A tiny registry of soup recipes and the result every recipe returns.

Recipes live one per module (uniform, greedy, learned) and register themselves on import;
`get_recipe` imports them lazily so that importing the registry stays cheap and cycle-free.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RECIPES: dict[str, Callable] = {}
# Modules whose import registers the built-in recipes.
_BUILTIN_MODULES = ("uniform", "greedy", "learned")


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


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a recipe function available as `name`."""
    def deco(fn: Callable) -> Callable:
        RECIPES[name] = fn
        return fn
    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def get_recipe(name: str) -> Callable:
    """The recipe registered as `name`; ValueError naming the known recipes otherwise."""
    _load_builtins()
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown soup recipe {name!r}; known: {', '.join(sorted(RECIPES))}") from None
