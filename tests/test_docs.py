"""The docs name the code as it is: every module of the package has its row in
docs/architecture.md, every module the docs name exists, and no doc links to a missing file."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "diskcache_ocr"
ARCHITECTURE = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")


def _modules() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if p.name not in ("__init__.py", "_version.py"))


def test_every_module_is_in_the_architecture_page():
    missing = [m for m in _modules() if f"`{m}`" not in ARCHITECTURE]
    assert not missing, f"docs/architecture.md has no row for {missing}"


def test_every_module_the_architecture_page_names_exists():
    named = set(re.findall(r"`((?:store/|ocr/|batchmem/|ops/|cli/)?[a-z_]+\.py)`", ARCHITECTURE))
    assert named, "no module named"
    gone = sorted(m for m in named if not (PACKAGE / m).is_file())
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"


def test_links_between_docs_resolve():
    pages = [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "benchmarks" / "README.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
