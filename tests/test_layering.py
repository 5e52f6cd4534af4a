"""The layering of docs/design.md §3, checked on the source: the protocol core does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import popsync

PACKAGE = Path(popsync.__file__).parent
IO_MODULES = {"socket", "ssl", "select", "selectors", "asyncio", "time", "logging", "os", "io"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_pop3_core_imports_no_io_and_nothing_of_popsync_but_errors() -> None:
    files = sorted((PACKAGE / "pop3").glob("*.py"))
    assert files
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in IO_MODULES, f"{path.name} imports {name}"
            if top == "popsync":
                assert name == "popsync.errors" or name.startswith("popsync.pop3"), (
                    f"{path.name} imports {name}"
                )


def test_errors_module_imports_nothing_of_popsync() -> None:
    assert not any(n.startswith("popsync") for n in imported_modules(PACKAGE / "errors.py"))
