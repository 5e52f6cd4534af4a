"""``password_command`` runs without a shell; the usual slips get a hint.

Each case runs the real CLI against nothing (the secret fails before any
connection) and expects one line naming the account, the key and the fix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_config

SECRET = "hint-s3cret"


def sync_line(tmp_path: Path, command: str) -> str:
    config = write_config(tmp_path, [{"name": "home", "port": 1, "password_command": command}])
    done = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(config), "sync", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert SECRET not in done.stdout + done.stderr
    return lines[0]


def test_a_pipe_without_a_shell_is_named(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    line = sync_line(tmp_path, "cat pw | head -1")
    assert "account 'home': password_command: exited with status 1" in line
    assert "runs without a shell, so '|' reached cat as an argument" in line
    assert "sh -c" in line


@pytest.mark.parametrize(
    ("command", "what"),
    [
        # The pipeline "succeeds" (head's status) but prints nothing; sh said why.
        ("sh -c 'no-such-helper-xyz -d pw | head -1'", "printed nothing"),
        ("sh -c 'no-such-helper-xyz -d pw'", "exited with status 127"),
    ],
)
def test_a_shell_that_cannot_find_a_program_gets_a_hint(
    tmp_path: Path, command: str, what: str
) -> None:
    line = sync_line(tmp_path, command)
    assert f"account 'home': password_command: {what}" in line
    assert "a program it runs was not found" in line


def test_an_ordinary_failure_gets_no_shell_hint(tmp_path: Path) -> None:
    line = sync_line(tmp_path, f"{sys.executable} -c 'import sys; sys.exit(3)'")
    assert "exited with status 3 (run it by hand to see its error output)" in line
    assert "shell" not in line
