"""The README and docs/ link only to files in the repository, and those files exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target): a target without spaces (error messages quoted in tables hold "](args = (...").
LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page):
    for target in LINK.findall(page.read_text()):
        assert "://" not in target, f"{page.name} links outside the repository: {target}"
        path = target.split("#")[0]
        if path:
            assert (page.parent / path).resolve().is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
            assert (page.parent / path).exists(), f"{page.name}: {target} does not exist"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
