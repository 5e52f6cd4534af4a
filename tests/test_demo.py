"""``popsync demo``, end to end in a process of its own, as a new user runs it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import popsync.demo
from tests.helpers import maildir_files

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^demo: (\d+) on server, (\d+) new, (\d+) fetched ", re.MULTILINE)


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popsync", "demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


def test_demo_fetches_seven_then_the_two_new_then_nothing(tmp_path: Path) -> None:
    done = run_demo("--dir", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    polls = [tuple(map(int, m)) for m in SUMMARY.findall(done.stdout)]
    # (on server, new, fetched) for each of the three polls
    assert polls == [(7, 7, 7), (9, 2, 2), (9, 0, 0)], done.stdout
    assert "ledger: 9 delivered" in done.stdout
    assert len(maildir_files(tmp_path / "demo" / "Maildir")) == 9


def test_demo_without_a_directory_cleans_up_after_itself() -> None:
    done = run_demo()
    assert done.returncode == 0, done.stderr
    match = re.search(r"^Config: (.+)$", done.stdout, re.MULTILINE)
    assert match, done.stdout
    assert not Path(match[1]).parent.exists()
    assert "now removed" in done.stdout


def test_demo_does_not_import_the_command_line() -> None:
    # cli imports demo for `popsync demo`; demo gets the command line handed in.
    tree = ast.parse(Path(popsync.demo.__file__).read_text())
    imported = {
        f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not [name for name in imported if name.startswith("popsync.cli")], imported
