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


def notebook_and_doc_sources() -> dict[str, str]:
    """The Python a user copies: notebook code cells and the ```python blocks of README and docs/."""
    import json
    import re

    sources = {}
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        sources[str(notebook.relative_to(ROOT))] = "\n".join(
            line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
        sources.update({f"{page.relative_to(ROOT)}#{i}": block for i, block in enumerate(blocks)})
    return sources


def test_notebooks_and_docs_import_what_exists() -> None:
    """A module moved in the tree must not leave a notebook or a docs example importing its old path."""
    import importlib
    import importlib.util

    missing = []
    for where, source in notebook_and_doc_sources().items():
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mebp_compiler":
                module = importlib.import_module(node.module)
                missing += [f"{where}: from {node.module} import {alias.name}" for alias in node.names
                            if not hasattr(module, alias.name)
                            and importlib.util.find_spec(f"{node.module}.{alias.name}") is None]
            elif isinstance(node, ast.Import):
                missing += [f"{where}: import {alias.name}" for alias in node.names
                            if alias.name.split(".")[0] == "mebp_compiler" and importlib.util.find_spec(alias.name) is None]
    assert not missing, "stale imports: " + "; ".join(missing)
