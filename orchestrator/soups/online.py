"""The online greedy soup (beyond the paper): the greedy rule with ingredients taken in the order
their trials finished, not best first.

It is the soup a sweep cooks while it runs (``sweep.online_soup``: `orchestrator.sweep.online`
offers each trial as it finishes, one held-out pass each, with the greedy soup's exact early
rejection); registered at the sweep's end under this recipe, it is rebuilt by this function from
the order the sweep recorded. Unlike the paper's greedy soup it is not guaranteed to match the
best single model on held-out: it starts from whichever trial finished first.
"""

from __future__ import annotations

from orchestrator.soups.greedy import GreedyRun
from orchestrator.soups.recipe import RecipeInputs, SoupResult, register
from orchestrator.train.evaluate import heldout_counter

NAME = "online-greedy"


@register(NAME, lambda options: {"strict": options.strict})
def cook_online_greedy(inputs: RecipeInputs) -> SoupResult:
    """Online greedy soup: ingredients in the order their trials finished, each kept if held-out does not drop."""
    n = len(inputs.ingredients)
    order = inputs.finish_order if inputs.finish_order is not None else range(n)
    run = GreedyRun(heldout_counter(inputs.model, inputs.heldout), inputs.options.strict,
                    log=inputs.log, prefix="online greedy soup")
    for i in sorted(range(n), key=lambda i: order[i]):
        run.offer(i, inputs.ingredients[i], inputs.names[i])
    result = run.result(n)
    result.recipe = NAME
    return result
