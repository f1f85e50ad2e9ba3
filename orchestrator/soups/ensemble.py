"""Output-space baselines: the logit ensemble and the greedy ensemble.

Ensembles cost N forward passes at inference, where a soup costs one; the paper reports them
beside every soup. The greedy ensemble applies the greedy soup's rule to averaged logits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from orchestrator.soups.greedy import improves, rank_best_first


def logit_ensemble(logits_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of several models' logits on the same inputs."""
    if not logits_list:
        raise ValueError("no logits to ensemble")
    return torch.stack([lg.float() for lg in logits_list]).mean(0)


class GreedyEnsemble:
    """The greedy ensemble built one model at a time, best first: keep a model if the ensemble's
    held-out accuracy does not drop (rises, if `strict`).

    It holds the running sum of the kept models' held-out logits, never every model's logits, so
    a cook can score a sweep of any size one checkpoint at a time. Accuracy is taken from the
    argmax of that sum, which is the argmax of the mean.
    """

    def __init__(self, labels: torch.Tensor, strict: bool = False):
        self.labels, self.strict = labels, strict
        self.kept: list[int] = []
        self.best = float("nan")
        self.steps: list[dict] = []
        self._sum: torch.Tensor | None = None

    def offer(self, index: int, logits_heldout: torch.Tensor) -> bool:
        """Consider model `index` (offered in best-first order); True if it was kept."""
        cand = logits_heldout.float() if self._sum is None else self._sum + logits_heldout.float()
        acc = (cand.argmax(1) == self.labels).float().mean().item()
        accepted = not self.kept or improves(acc, self.best, self.strict)
        if accepted:
            self.kept.append(index)
            self.best, self._sum = acc, cand
        self.steps.append({"considered": index, "accepted": accepted, "kept": list(self.kept),
                           "heldout_acc": self.best})
        return accepted


def greedy_ensemble(logits_heldout: Sequence[torch.Tensor], labels: torch.Tensor,
                    order_scores: Sequence[float], strict: bool = False
                    ) -> tuple[list[int], float, list[dict]]:
    """Greedy ensemble on held-out logits: best first, keep a model if accuracy does not drop.

    Returns the kept indices (in the order added), the ensemble's held-out accuracy and one
    history entry per model considered (as in `greedy_soup`).
    """
    if not logits_heldout:
        raise ValueError("no logits for a greedy ensemble")
    ens = GreedyEnsemble(labels, strict)
    for i in rank_best_first(order_scores, len(logits_heldout)):
        ens.offer(i, logits_heldout[i])
    return ens.kept, ens.best, ens.steps
