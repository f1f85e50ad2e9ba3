"""The greedy soup (Wortsman et al. 2022, Algorithm 1), streamed, with exact early rejection.

Ingredients are tried best held-out accuracy first; one is kept only if the soup's held-out
accuracy does not drop. The soup is never worse than the best single ingredient on held-out.

Memory: a float32 running sum of the kept ingredients plus one candidate soup, whatever the
number of ingredients; each ingredient is read from its file when it is tried (and once more
if it is kept). Time: a candidate scored by a `HeldoutCounter` is evaluated chunk by chunk and
rejected as soon as it can no longer reach the soup's correct count, which changes no decision.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from orchestrator.soups.io.stream import Ingredient, is_file, read_weights
from orchestrator.soups.io.weights import (
    StateDict,
    check_compatible,
    float_keys,
    stream_add,
    stream_mean_with,
)
from orchestrator.soups.recipe import RecipeInputs, RecipeOptions, SoupResult, register
from orchestrator.train.evaluate import HeldoutCounter, heldout_counter


def rank_best_first(order_scores: Sequence[float], n: int) -> list[int]:
    """Ingredient indices by decreasing score; ties keep the original order (stable sort)."""
    if len(order_scores) != n:
        raise ValueError(f"{len(order_scores)} order scores for {n} ingredients")
    return sorted(range(n), key=lambda i: -float(order_scores[i]))


def improves(new: float, old: float, strict: bool) -> bool:
    """The acceptance rule: the paper's ``>=`` by default, the reference code's ``>`` if strict."""
    return new > old if strict else new >= old


def hopeless(right: int, seen: int, size: int, best: int, strict: bool) -> bool:
    """True when a candidate with `right` of `seen` examples correct cannot pass any more: even
    all the ``size - seen`` remaining right would leave it below (at or below, if strict) `best`."""
    reachable = right + (size - seen)
    return reachable <= best if strict else reachable < best


def _score(scorer, state: StateDict, best: int | None, strict: bool, early: bool):
    """(correct count or accuracy, examples evaluated, rejected early) of one candidate."""
    if not isinstance(scorer, HeldoutCounter):
        return float(scorer(state)), None, False
    right = seen = 0
    for r, s in scorer.correct(state):
        right, seen = right + r, seen + s
        if early and best is not None and seen < scorer.size and hopeless(right, seen, scorer.size, best, strict):
            return right, seen, True
    if seen != scorer.size:
        raise ValueError(f"held-out chunks covered {seen} examples, the counter says {scorer.size}")
    return right, seen, False


def _acc(score, scorer) -> float:
    return score / scorer.size if isinstance(scorer, HeldoutCounter) else score


def _settings(options: RecipeOptions) -> dict:
    return {"strict": options.strict}


@register("greedy", _settings)
def cook_greedy(inputs: RecipeInputs) -> SoupResult:
    """Greedy soup (the paper's Algorithm 1): add ingredients best first while held-out accuracy holds."""
    # Integer correct counts, chunk by chunk: a candidate is dropped as soon as it cannot reach
    # the soup, with the same decisions as scoring every held-out example.
    return greedy_soup(inputs.ingredients, heldout_counter(inputs.model, inputs.heldout),
                       inputs.scores, strict=inputs.options.strict, names=inputs.names, log=inputs.log)


def greedy_soup(ingredients: Sequence[Ingredient], heldout: HeldoutCounter | Callable[[dict], float],
                order_scores: Sequence[float], strict: bool = False,
                names: Sequence[str] | None = None, log: Callable[[str], None] = print,
                early_reject: bool = True) -> SoupResult:
    """Greedy soup of `ingredients` (safetensors paths or state dicts), ranked by `order_scores`
    (their individual held-out accuracies).

    `heldout` scores a candidate soup: a `HeldoutCounter` (integer correct counts, chunk by
    chunk, so that a candidate is rejected as soon as it cannot reach the soup; exact, the
    result is bit-identical to ``early_reject=False``) or a plain ``state -> accuracy``
    function. `steps` holds one entry per ingredient considered: ``{"considered", "accepted",
    "kept", "heldout_acc" (the soup's), "candidate_acc" (None if rejected early), "evaluated"
    (held-out examples; None for a plain function), "rejected_early"}``; ``stats`` the totals.
    Progress lines, prefixed ``greedy soup:``, go to `log`.
    """
    check_compatible(ingredients, names)
    label = (lambda i: names[i]) if names else (lambda i: f"ingredient {i}")
    run = GreedyRun(heldout, strict, early_reject, log)
    for i in rank_best_first(order_scores, len(ingredients)):
        run.offer(i, ingredients[i], label(i))
    return run.result(len(ingredients))


class GreedyRun:
    """The greedy rule one ingredient at a time, in the order they are offered: the first starts
    the soup, each later one is kept if the soup's held-out accuracy does not drop (`improves`).
    `greedy_soup` offers them best first (the paper's Algorithm 1); the online soup offers them
    as their trials finish. `restore` re-adds an ingredient an earlier run already decided on,
    without scoring it again."""

    def __init__(self, heldout, strict: bool = False, early_reject: bool = True,
                 log: Callable[[str], None] = print, prefix: str = "greedy soup"):
        self.heldout, self.strict, self.early, self.log, self.prefix = heldout, strict, early_reject, log, prefix
        self.infos = self.fixed = self.total = self.first = None
        self.kept: list[int] = []
        self.steps: list[dict] = []
        self.best = None  # the soup's score: a correct count for a `HeldoutCounter`

    def offer(self, i: int, ingredient: Ingredient, label: str) -> dict:
        """Try ingredient `i`; its step (`greedy_soup`'s) is returned and kept in `steps`."""
        if self.total is None:
            self._begin(ingredient, label)
            best, seen, _ = _score(self.heldout, stream_mean_with(self.total, None, 1, self.infos, self.fixed),
                                   None, self.strict, False)
            self.kept, self.best = [i], best
            acc = _acc(best, self.heldout)
            self.steps.append(_step(i, True, self.kept, acc, acc, seen, False))
            self.log(f"{self.prefix}: start from {label} (held-out {acc:.2%})")
            return self.steps[-1]
        check_compatible([self.first[0], ingredient], [self.first[1], label])
        candidate = stream_mean_with(self.total, ingredient, len(self.kept) + 1, self.infos, self.fixed)
        score, seen, early = _score(self.heldout, candidate, self.best, self.strict, self.early)
        del candidate  # before reading the ingredient again: one candidate at a time
        accepted = not early and improves(score, self.best, self.strict)
        if accepted:
            # Same float ops as the scored candidate, so the final soup is bit-identical to it.
            stream_add(self.total, ingredient)
            self.kept.append(i)
            self.best = score
        self.steps.append(_step(i, accepted, self.kept, _acc(self.best, self.heldout),
                                None if early else _acc(score, self.heldout), seen, early))
        self.log(_line(label, self.steps[-1], self.heldout, len(self.kept), self.prefix))
        return self.steps[-1]

    def restore(self, i: int, ingredient: Ingredient, label: str, kept: bool, best) -> None:
        """Re-add ingredient `i` as an earlier run decided (kept or not), the soup's score then
        being `best`, with the same float operations as `offer`: no forward pass."""
        if kept and self.total is None:
            self._begin(ingredient, label)
        elif kept:
            stream_add(self.total, ingredient)
        if kept:
            self.kept.append(i)
        self.best = best

    def _begin(self, ingredient: Ingredient, label: str) -> None:
        self.infos = check_compatible([ingredient], [label])
        self.first = (ingredient, label)
        self.fixed, self.total = _start(ingredient, self.infos)

    def soup(self) -> dict[str, torch.Tensor]:
        """The soup's weights now: the mean of the kept ingredients."""
        return stream_mean_with(self.total, None, len(self.kept), self.infos, self.fixed)

    def result(self, n: int) -> SoupResult:
        """The soup as a `SoupResult` over `n` ingredients (indices as offered)."""
        return _result(n, self.soup(), self.kept, self.steps, _acc(self.best, self.heldout), self.heldout)


def _start(ingredient: Ingredient, infos) -> tuple[dict, dict]:
    """The best ingredient's non-float tensors (kept as they are) and its float ones in float32
    (the running sum of one; no copy for a float32 file)."""
    keys = set(float_keys(infos))
    if is_file(ingredient):
        state = read_weights(ingredient)
    else:
        state = {k: torch.clone(v, memory_format=torch.contiguous_format) for k, v in ingredient.items()}
    fixed = {k: v for k, v in state.items() if k not in keys}
    return fixed, {k: state.pop(k).float() for k in list(state) if k in keys}


def _step(i, accepted, kept, soup_acc, cand_acc, seen, early) -> dict:
    return {"considered": i, "accepted": accepted, "kept": list(kept), "heldout_acc": soup_acc,
            "candidate_acc": cand_acc, "evaluated": seen, "rejected_early": early}


def _line(name: str, step: dict, heldout, n_kept: int, prefix: str = "greedy soup") -> str:
    what = "kept" if step["accepted"] else "skipped"
    size = f"/{heldout.size}" if isinstance(heldout, HeldoutCounter) else ""
    if step["rejected_early"]:
        detail = f"rejected after {step['evaluated']}{size} held-out examples"
    else:
        detail = f"candidate {step['candidate_acc']:.2%}"
        detail += f" on {step['evaluated']}{size} examples" if step["evaluated"] is not None else ""
    return f"{prefix}: {name} {what} ({detail}; soup {step['heldout_acc']:.2%}, {n_kept} kept)"


def _result(n, state, kept, steps, best, heldout) -> SoupResult:
    coefficients = [1.0 / len(kept) if i in kept else 0.0 for i in range(n)]
    evaluated = [s["evaluated"] for s in steps]
    stats = {}
    if isinstance(heldout, HeldoutCounter):
        stats = {"heldout_evaluated": sum(e or 0 for e in evaluated),
                 "heldout_evaluated_plain": heldout.size * len(steps),
                 "rejected_early": sum(s["rejected_early"] for s in steps)}
    return SoupResult("greedy", state, coefficients, list(kept), steps, best, stats)
