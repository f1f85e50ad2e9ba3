"""Tables people read: the same rows as aligned text (terminal) or Markdown (MLflow artifacts).

Floats are accuracies and print as percentages; everything else prints as itself.
"""

from __future__ import annotations

from typing import Any, Sequence


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
