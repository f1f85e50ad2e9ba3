"""The uniform soup: the plain mean of every ingredient's weights."""

from __future__ import annotations

from typing import Sequence

from .registry import SoupResult, register
from .weights import StateDict, weighted_average


@register("uniform")
def uniform_soup(states: Sequence[StateDict], names: Sequence[str] | None = None) -> SoupResult:
    """Average all ingredients with coefficients 1/N (refuses incompatible ingredients)."""
    n = len(states)
    coefficients = [1.0 / n] * n if n else []
    state = weighted_average(states, coefficients, names)  # raises on none / incompatible
    return SoupResult("uniform", state, coefficients, list(range(n)), [], None)
