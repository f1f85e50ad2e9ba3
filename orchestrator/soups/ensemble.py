"""Output-space baselines: the logit ensemble and the greedy ensemble.

Ensembles cost N forward passes at inference, where a soup costs one; the paper reports them
beside every soup. The greedy ensemble applies the greedy soup's rule to averaged logits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .greedy import improves, rank_best_first


def logit_ensemble(logits_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of several models' logits on the same inputs."""
    if not logits_list:
        raise ValueError("no logits to ensemble")
    return torch.stack([lg.float() for lg in logits_list]).mean(0)


def _acc(logits_heldout: Sequence[torch.Tensor], members: list[int], labels: torch.Tensor) -> float:
    # Scored exactly as reported (mean of stacked logits), not from a running sum: logits are
    # small, and this keeps the reported accuracy bit-for-bit the one the rule compared.
    return (logit_ensemble([logits_heldout[i] for i in members]).argmax(1) == labels).float().mean().item()


def greedy_ensemble(logits_heldout: Sequence[torch.Tensor], labels: torch.Tensor,
                    order_scores: Sequence[float], strict: bool = False
                    ) -> tuple[list[int], float, list[dict]]:
    """Greedy ensemble on held-out logits: best first, keep a model if accuracy does not drop.

    Returns the kept indices (in the order added), the ensemble's held-out accuracy and one
    history entry per model considered (as in `greedy_soup`).
    """
    if not logits_heldout:
        raise ValueError("no logits for a greedy ensemble")
    order = rank_best_first(order_scores, len(logits_heldout))
    kept, best = [order[0]], _acc(logits_heldout, order[:1], labels)
    steps = [{"considered": order[0], "accepted": True, "kept": list(kept), "heldout_acc": best}]
    for i in order[1:]:
        acc = _acc(logits_heldout, kept + [i], labels)
        accepted = improves(acc, best, strict)
        if accepted:
            kept.append(i)
            best = acc
        steps.append({"considered": i, "accepted": accepted, "kept": list(kept), "heldout_acc": best})
    return kept, best, steps
