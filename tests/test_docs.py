"""The README and the docs site: a short README whose links all land, and docs pages that mkdocs can build
(`make docs` runs `mkdocs build --strict`, which checks every link, anchor and API reference)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_short_and_its_links_land():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links into the docs"
    assert [link for link in local if not (ROOT / link).exists()] == []


def test_every_docs_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md") if "pending" not in p.parts}
    assert pages and {page for page in pages if f": {page}" not in nav} == set()


def test_no_page_cites_the_method_outside_the_repository():
    """The method's derivations live in docs/method.md, which code and pages cite by section."""
    cited = []
    for path in [*ROOT.glob("tccli/**/*.py"), *ROOT.glob("docs/**/*.md"), ROOT / "README.md"]:
        if "METHOD.md" in path.read_text():
            cited.append(str(path.relative_to(ROOT)))
    assert cited == []
    method = (ROOT / "docs" / "method.md").read_text()
    for section in {int(n) for n in re.findall(r"docs/method\.md sections? (\d+)", _code_text())}:
        assert re.search(rf"^## {section}\. ", method, re.M), f"code cites docs/method.md section {section}"


def _code_text() -> str:
    return "\n".join(path.read_text() for path in ROOT.glob("tccli/**/*.py"))
