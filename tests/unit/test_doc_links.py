"""Every relative link in README.md and docs/*.md points at a file of the repository, and a link
to a heading (`file.md#heading`) at a heading that exists (GitHub's anchors)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]  # http:, https:, mailto:


def test_the_anchor_rule_matches_github():
    assert anchor("Bad images: `--on_bad_image error|skip`") == "bad-images---on_bad_image-errorskip"
    assert anchor("Where a run's files are") == "where-a-runs-files-are"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_an_existing_file(doc):
    broken = []
    for target in relative_links(doc):
        file, _, heading = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif heading and resolved.suffix == ".md" and heading not in anchors(resolved):
            broken.append(f"{target} (no heading #{heading} in {resolved.name})")
    assert not broken, f"{doc.name}: broken links: {broken}"


def test_the_readme_links_the_reference():
    links = set(relative_links(REPO / "README.md"))
    for doc in DOCS[1:]:
        assert f"docs/{doc.name}" in links, f"README.md does not link docs/{doc.name}"
