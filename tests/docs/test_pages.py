"""The README stays one page, and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import pytest

from heist_common.layout import REPO_ROOT
from tests.docs.markdown import anchors, links, pages

README_LIMIT_BYTES = 15_000
"""The README is the front door: what the system is, two commands, a tour, the CLI, the layout, links."""


def test_readme_is_at_most_15_kb():
    size = len((REPO_ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; move detail into docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda page: page.name)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_check_sees_links_and_anchors():
    readme = REPO_ROOT / "README.md"
    assert "docs/cli.md" in links(readme)
    assert {"exit-codes", "make"} <= anchors(REPO_ROOT / "docs" / "cli.md")
    assert "services-name" not in anchors(REPO_ROOT / "docs" / "configuration.md")
    assert "servicesname" in anchors(REPO_ROOT / "docs" / "configuration.md")


def test_the_architecture_page_names_every_module():
    """The layout table cannot fall behind the tree: a new module must be placed in it."""
    page = (REPO_ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(REPO_ROOT))
        for package in ("heist_common", "orchestrator", "servers")
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py") and f"`{path.stem}.py`" not in page
        and f"`{path.relative_to(REPO_ROOT)}`" not in page and f"/{path.name}`" not in page
    ]
    assert missing == []
