"""What a cook reports for people to read and compare: its table as aligned text (terminal) or
Markdown (MLflow artifacts), the verdict in words, and the soups figure (the paper's Figure 1 in
miniature).

Floats are accuracies and print as percentages; everything else prints as itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.record.schema import HELDOUT_ACC  # noqa: E402


def cell(value: Any) -> str:
    """One value as it is shown: floats as percentages with one decimal."""
    return f"{value:.1%}" if isinstance(value, float) else str(value)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as aligned text: the first column left-aligned, the others right-aligned."""
    cols = list(columns or rows[0])
    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as a Markdown table (with a trailing newline)."""
    cols = list(columns or rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _points(diff: float) -> str:
    return f"{diff * 100:+.1f}"


def verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The cook's table in words: did the greedy soup beat the best individual model in
    distribution (test) and under shift, by how much, and what to do about it.

    Rows are the cook's (``name``, ``test``, ``shift_mean``); without a greedy soup or a best
    individual row there is nothing to say and the list is empty.
    """
    by = {r["name"]: r for r in rows}
    soup, best = by.get("greedy soup"), by.get("best individual")
    if soup is None or best is None:
        return []
    d_test, d_shift = soup["test"] - best["test"], soup["shift_mean"] - best["shift_mean"]
    said = (f"greedy soup vs best individual: {_points(d_test)} points on test "
            f"({cell(soup['test'])} vs {cell(best['test'])}), {_points(d_shift)} under shift "
            f"({cell(soup['shift_mean'])} vs {cell(best['shift_mean'])}).")
    if d_test == 0 and d_shift == 0 and soup.get("heldout") == best.get("heldout"):
        advice = ("The greedy soup is the best individual model: adding any other ingredient lowered "
                  "held-out accuracy, so it kept that one alone; promoting either is the same.")
    elif d_test >= 0 and d_shift > 0:
        advice = (f"Promote the greedy soup: {_points(d_test)} on test, {_points(d_shift)} under shift, "
                  "same inference cost as one model.")
    elif d_test >= 0 and d_shift == 0:
        advice = (f"The greedy soup matches the best individual under shift and is {_points(d_test)} on "
                  "test at the same inference cost: promote it if the held-out gate agrees.")
    elif d_shift > 0:
        advice = (f"The greedy soup trades {_points(d_test)} on test for {_points(d_shift)} under shift: "
                  "promote it if shifted data is what production sees, else keep the best individual.")
    else:
        advice = (f"Keep the best individual model: the greedy soup is {_points(d_test)} on test and "
                  f"{_points(d_shift)} under shift in this sweep.")
    ens = by.get("ensemble")
    lines = [said, advice]
    if ens is not None:
        lines.append(f"(The logit ensemble of every ingredient: {cell(ens['test'])} test, "
                     f"{cell(ens['shift_mean'])} under shift, at one forward pass per ingredient.)")
    return lines

MARKERS = {"soup": ("*", 220), "baseline": ("D", 70), "ingredient": ("o", 30)}


def soup_figure(rows: list[dict], singles: list[dict], greedy, path: str | Path) -> Path:
    """Left: greedy soup held-out accuracy against ingredients considered. Right: test against
    mean-shift accuracy for ingredients, soups and ensembles."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    if greedy is not None and greedy.steps:
        xs = list(range(1, len(greedy.steps) + 1))
        ax1.plot(xs, [s[HELDOUT_ACC] for s in greedy.steps], "-o", label="greedy soup")  # the soup's
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
