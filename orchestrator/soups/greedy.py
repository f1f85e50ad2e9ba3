"""The greedy soup (Wortsman et al. 2022, Algorithm 1).

Ingredients are tried best held-out accuracy first; one is kept only if the soup's held-out
accuracy does not drop. The soup is never worse than the best single ingredient on held-out.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .registry import SoupResult, register
from .weights import StateDict, check_compatible


def rank_best_first(order_scores: Sequence[float], n: int) -> list[int]:
    """Ingredient indices by decreasing score; ties keep the original order (stable sort)."""
    if len(order_scores) != n:
        raise ValueError(f"{len(order_scores)} order scores for {n} ingredients")
    return sorted(range(n), key=lambda i: -float(order_scores[i]))


def improves(new: float, old: float, strict: bool) -> bool:
    """The acceptance rule: the paper's ``>=`` by default, the reference code's ``>`` if strict."""
    return new > old if strict else new >= old


def _soup(total: dict[str, torch.Tensor], k: int, ref: StateDict,
          extra: StateDict | None = None) -> dict[str, torch.Tensor]:
    """The mean of a float32 running sum of k ingredients (plus `extra`, if given) in the
    ingredients' dtypes: one new model-sized tensor set, the running sum is left untouched."""
    out = {}
    for name, t in ref.items():
        if not t.is_floating_point():
            out[name] = t.clone()  # integer buffers (counters) are not averaged: the best's
            continue
        s = total[name] + extra[name].float() if extra is not None else total[name].clone()
        out[name] = s.div_(k).to(t.dtype)
    return out


@register("greedy")
def greedy_soup(states: Sequence[StateDict], heldout_acc_fn: Callable[[dict], float],
                order_scores: Sequence[float], strict: bool = False,
                names: Sequence[str] | None = None, log: Callable[[str], None] = print) -> SoupResult:
    """Greedy soup of `states`, ranked by `order_scores` (their individual held-out accuracies).

    `heldout_acc_fn(state_dict)` scores a candidate soup. Only a float32 running sum of the kept
    ingredients is held, so each candidate costs one model's size. `steps` holds one entry per
    ingredient considered: ``{"considered", "accepted", "kept", "heldout_acc"}``.
    """
    if not states:
        raise ValueError("no ingredients for a greedy soup")
    check_compatible(states, names)
    order = rank_best_first(order_scores, len(states))
    ref = states[order[0]]
    total = {k: v.float().clone() for k, v in ref.items() if v.is_floating_point()}
    kept, best = [order[0]], float(heldout_acc_fn(_soup(total, 1, ref)))
    steps = [{"considered": order[0], "accepted": True, "kept": list(kept), "heldout_acc": best}]
    for i in order[1:]:
        acc = float(heldout_acc_fn(_soup(total, len(kept) + 1, ref, states[i])))
        accepted = improves(acc, best, strict)
        if accepted:
            # Same float ops as the scored candidate, so the final soup is bit-identical to it.
            for k, v in total.items():
                v.add_(states[i][k].float())
            kept.append(i)
            best = acc
        steps.append({"considered": i, "accepted": accepted, "kept": list(kept), "heldout_acc": best})
        log(f"greedy soup: ingredient {i} {'kept' if accepted else 'skipped'} "
            f"(candidate {acc:.2%}, soup {best:.2%}, {len(kept)} kept)")
    coefficients = [1.0 / len(kept) if i in kept else 0.0 for i in range(len(states))]
    return SoupResult("greedy", _soup(total, len(kept), ref), coefficients, kept, steps, best)
