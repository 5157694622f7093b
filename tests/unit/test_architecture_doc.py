"""docs/ARCHITECTURE.md stays the map of the code: every module is named in it by its path."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _modules() -> list[str]:
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "mailsys").rglob("*.py")
        if path.name != "__init__.py"
    )


def test_every_module_is_named_in_the_architecture_document() -> None:
    """Each module under mailsys/ (``__init__.py`` aside) appears in the document by its path."""
    text = DOC.read_text(encoding="utf-8")
    missing = [module for module in _modules() if f"`{module}`" not in text]
    assert missing == []


def test_the_document_names_no_module_that_is_gone() -> None:
    """Every ``mailsys/...py`` path the document names exists, so a removed module leaves it too."""
    text = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`(mailsys/[\w/]+\.py)`", text))
    assert sorted(name for name in named if not (ROOT / name).is_file()) == []


def test_the_project_refers_to_nothing_outside_itself() -> None:
    """README and docs link only inside the repository (a clone must stand on its own)."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "../shared" not in path.read_text(encoding="utf-8"), path
