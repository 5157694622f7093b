"""The IMAP room's import graph: command groups never import the session, and nothing circles."""

from __future__ import annotations

import ast
from pathlib import Path

import mailsys.imap

_ROOM = Path(mailsys.imap.__file__).parent


def _imap_imports(path: Path) -> set[str]:
    """The mailsys.imap modules a file imports, TYPE_CHECKING imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mailsys.imap":
                found.update(f"mailsys.imap.{alias.name}" for alias in node.names)
            elif node.module.startswith("mailsys.imap."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names
                         if alias.name.startswith("mailsys.imap."))
    return found


def _graph() -> dict[str, set[str]]:
    return {f"mailsys.imap.{path.stem}": _imap_imports(path)
            for path in _ROOM.glob("*.py") if path.stem != "__init__"}


def test_no_import_cycle_in_the_imap_room() -> None:
    """No chain of imports inside mailsys.imap leads back to where it started."""
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join((*path, module)))
        if module in done:
            return
        for imported in graph.get(module, set()):
            visit(imported, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_command_groups_do_not_import_the_session() -> None:
    """Only the session module knows the session; groups see the narrow command context."""
    importers = {module for module, imports in _graph().items()
                 if "mailsys.imap.session" in imports}
    assert importers == set()
