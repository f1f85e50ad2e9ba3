"""Every relative link and image in README.md and docs/*.md names a file or folder in the
repository, and the README stays a five-minute read."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](path), ![alt](path "title")
SKIP = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|#)|get-artifact\?", re.I)  # http(s):, mailto:, #anchor, MLflow UI


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # not in code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # nor in code spans
    return [t for t in LINK.findall(text) if not SKIP.search(t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: links to nothing: {missing}"


def test_readme_is_under_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250


def test_the_checker_sees_links_and_images():
    assert "docs/screenshots/ranking.png" in relative_links(ROOT / "README.md")
    assert "docs/faults.md" in relative_links(ROOT / "README.md")
