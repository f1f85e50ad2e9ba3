"""Pictures people compare: the paper's Figure 1 in miniature."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"soup": ("*", 220), "baseline": ("D", 70), "ingredient": ("o", 30)}


def soup_figure(rows: list[dict], singles: list[dict], greedy, path: str | Path) -> Path:
    """Left: greedy soup held-out accuracy against ingredients considered. Right: test against
    mean-shift accuracy for ingredients, soups and ensembles."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    if greedy is not None and greedy.steps:
        xs = list(range(1, len(greedy.steps) + 1))
        ax1.plot(xs, [s["heldout_acc"] for s in greedy.steps], "-o", label="greedy soup")
    ranked = sorted((s["heldout"] for s in singles), reverse=True)
    ax1.plot(range(1, len(ranked) + 1), ranked, "x", color="grey", label="ingredient k (ranked)")
    ax1.set(xlabel="ingredients considered (best first)", ylabel="held-out accuracy",
            title="Greedy soup vs. its ingredients")
    ax1.legend()
    ax2.scatter([s["test"] for s in singles], [s["shift_mean"] for s in singles],
                marker="o", s=30, color="grey", label="fine-tuned runs")
    for r in rows:
        if r["kind"] == "ingredient":
            continue
        m, size = MARKERS[r["kind"]]
        ax2.scatter(r["test"], r["shift_mean"], marker=m, s=size, label=r["name"])
    ax2.set(xlabel="test accuracy (in distribution)", ylabel="mean accuracy over shifts",
            title="In distribution vs. under distribution shift")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
