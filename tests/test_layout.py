"""The tree reads as the data flow: the compiler core never imports the training application."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE_DIRS = (ROOT / "mebp_compiler", ROOT / "passes", ROOT / "targets")
APP = "mebp_compiler.app"


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_core_does_not_import_the_application() -> None:
    core_files = [f for d in CORE_DIRS for f in d.rglob("*.py") if APP.replace(".", "/") not in f.as_posix()]
    assert len(core_files) > 20
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f) if m == APP or m.startswith(APP + "."))
                 for f in core_files}
    assert not {f: m for f, m in offenders.items() if m}, "core modules import the application"
