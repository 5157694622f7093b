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


_LINK = re.compile(r"\]\(([^)\s]+)\)")  # a Markdown link's target
_UPWARD = re.compile(r"(?:\.\./)+[\w.-][\w./-]*")  # a path that climbs out of its folder


def _escapes(document: Path, target: str) -> bool:
    """Whether ``target``, read relative to ``document``, leaves the repository or is missing."""
    if re.match(r"[a-z]+:|#", target):  # a URL or an anchor in the same page
        return False
    resolved = (document.parent / target.split("#")[0]).resolve()
    return not resolved.is_relative_to(ROOT) or not resolved.exists()


def test_the_project_refers_to_nothing_outside_itself() -> None:
    """README and docs link only to files inside the repository (a clone must stand on its own),
    and name no path that climbs out of it."""
    outside = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for target in _LINK.findall(text):
            if _escapes(path, target):
                outside.append(f"{path.name}: link {target}")
        for target in _UPWARD.findall(text):
            if not (path.parent / target).resolve().is_relative_to(ROOT):
                outside.append(f"{path.name}: path {target}")
    assert outside == []


def test_a_path_outside_the_repository_is_caught() -> None:
    """The check above finds a link that climbs out of the repository, and one to a missing file."""
    document = ROOT / "docs" / "ARCHITECTURE.md"
    assert _escapes(document, "../../elsewhere/DESIGN.md")
    assert _escapes(document, "missing.md")
    assert not _escapes(document, "../README.md")
    assert not _escapes(document, "https://example.test/x")
