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


def test_options_and_textfmt_import_nothing_of_popsync() -> None:
    # Both are shared by layers that must not depend on each other (config and
    # session; daemon, cli and sync), so they stand alone.
    for name in ("options.py", "textfmt.py"):
        assert not any(n.startswith("popsync") for n in imported_modules(PACKAGE / name)), name


def test_every_package_ships_in_the_wheel() -> None:
    # pyproject.toml lists the packages by name: one missing there works in a
    # checkout and is absent from an installed popsync.
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(PACKAGE.parent).parts)
        for init in PACKAGE.rglob("__init__.py")
    }
    assert "popsync.config" in found
    assert found <= listed, sorted(found - listed)
