"""The reliability table (docs/faults.md, linked from the README): every row names at least one
test, and every named test exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "faults.md"


def table_rows() -> list[list[str]]:
    text = PAGE.read_text()
    section = text.split("# Faults, bad input and trust\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]


def test_every_row_of_the_reliability_table_names_tests_that_exist():
    rows = table_rows()
    assert len(rows) >= 20
    for fault, behaviour, tests in rows:
        named = re.findall(r"`([^`]+)`", tests)
        assert named, f"row {fault!r} names no test"
        current = None
        for ref in named:
            ref = ref.replace("BI::", "tests/e2e/test_bad_input.py::")
            path, _, name = ref.rpartition("::")
            current = path or current  # `::name` continues the previous file
            source = (ROOT / current).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{current}::{name} (row {fault!r})"


def test_the_readme_links_the_reliability_table():
    assert "](docs/faults.md)" in (ROOT / "README.md").read_text()
