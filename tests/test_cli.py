"""The command line as cron, systemd and a user at a shell meet it: the real
``popsync`` process (``sys.executable -m popsync``) against the project's
POP3 test server on loopback, with real config files, ledger and Maildirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from popsync.config import load_config
from popsync.locks import account_lock
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import write_config

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


def popsync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popsync", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.fixture
def server() -> Iterator[POP3TestServer]:
    with POP3TestServer(MailStore(generate_messages(3, 800, seed=12))) as srv:
        yield srv


@pytest.fixture
def config(tmp_path: Path, server: POP3TestServer) -> Path:
    return write_config(tmp_path, [{"name": "acct", "port": server.port}])


def test_quiet_sync_prints_nothing_on_success_and_one_line_per_error(
    tmp_path: Path, server: POP3TestServer, config: Path
) -> None:
    ok = popsync("-q", "-c", str(config), "sync", "--no-progress")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    server.faults = Faults(errors={"UIDL": b"-ERR [SYS/TEMP] later"})
    bad = popsync("-q", "-c", str(config), "sync", "--no-progress")
    assert bad.returncode == 1 and bad.stdout == ""
    (line,) = bad.stderr.splitlines()
    assert line.startswith("popsync: acct: FAILED (temporary):"), line


def test_sync_of_an_account_another_process_is_polling_exits_0(config: Path) -> None:
    state_dir = load_config(config).state_dir
    with account_lock(state_dir, "acct", wait=False):
        busy = popsync("-c", str(config), "sync", "--no-progress")
        quiet = popsync("-q", "-c", str(config), "sync", "--no-progress")
    assert busy.returncode == 0, busy.stderr
    (line,) = (busy.stdout + busy.stderr).splitlines()
    assert line.startswith("account acct: process ") and "being fetched" in line, line
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def test_status_exit_status_filter_and_iso_times(tmp_path: Path, server: POP3TestServer) -> None:
    config = write_config(
        tmp_path,
        [
            {"name": "good", "port": server.port},
            {"name": "bad", "port": server.port, "auth": "user"},
        ],
    )
    assert popsync("-q", "-c", str(config), "sync", "--no-progress", "good").returncode == 0
    never = popsync("-c", str(config), "status")
    assert never.returncode == 0, never.stderr  # "bad" was never polled: nothing failed
    server.faults = Faults(errors={"PASS": b"-ERR [AUTH] invalid credentials"})
    assert popsync("-q", "-c", str(config), "sync", "--no-progress", "bad").returncode == 1

    everything = popsync("-c", str(config), "status")
    assert everything.returncode == 1  # a permanent failure: the daemon pauses "bad"
    assert "needs attention" in everything.stdout
    only_good = popsync("-c", str(config), "status", "--json", "good")
    assert only_good.returncode == 0, only_good.stderr
    (entry,) = json.loads(only_good.stdout)["accounts"]
    assert entry["account"] == "good"
    started = entry["last_poll"]["started_at"]
    assert isinstance(started, str) and started.endswith("Z") and len(started) == 20
    assert datetime.fromisoformat(started).tzinfo is not None
    assert popsync("-c", str(config), "status", "bad").returncode == 1

    unknown = popsync("-c", str(config), "status", "nosuch")
    assert unknown.returncode == 2 and unknown.stdout == ""
    (line,) = unknown.stderr.splitlines()
    assert "nosuch" in line


def test_global_options_after_the_command(tmp_path: Path, config: Path) -> None:
    after = popsync("sync", "--no-progress", "-q", "-c", str(config))
    assert (after.returncode, after.stdout, after.stderr) == (0, "", "")
    assert popsync("status", "-c", str(config)).returncode == 0
    # A value before the command is not clobbered by the command's own default.
    before = popsync("-c", str(config), "--log-format", "json", "check")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["message"].endswith("OK (1 account(s): acct)")
    both = popsync("-c", str(tmp_path / "missing.yaml"), "check", "-c", str(config))
    assert both.returncode == 0, both.stderr  # the later one wins, as usual


def test_json_log_format_covers_sync_summary_and_errors(
    server: POP3TestServer, config: Path
) -> None:
    ok = popsync("--log-format", "json", "-c", str(config), "sync", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    (summary,) = (json.loads(line) for line in ok.stdout.splitlines())
    assert summary["account"] == "acct" and summary["result"] == "ok"
    assert (summary["listed"], summary["new"], summary["fetched"]) == (3, 3, 3)
    assert summary["deleted"] == summary["skipped"] == summary["remapped"] == 0
    assert summary["bytes"] > 0 and isinstance(summary["seconds"], float)
    server.faults = Faults(errors={"UIDL": b"-ERR [SYS/TEMP] later"})
    bad = popsync("sync", "--no-progress", "--log-format", "json", "-c", str(config))
    assert bad.returncode == 1 and bad.stdout == ""
    (error,) = (json.loads(line) for line in bad.stderr.splitlines())
    assert (error["level"], error["account"], error["result"]) == ("error", "acct", "error")
    assert "FAILED" in error["message"]
    status = popsync("-c", str(config), "--log-format", "json", "status")
    assert status.returncode == 1
    (line,) = (json.loads(line) for line in status.stdout.splitlines())
    assert line["account"] == "acct" and "last poll" in line["message"]


def test_lines_to_the_journal_carry_their_syslog_priority(
    tmp_path: Path, server: POP3TestServer, config: Path
) -> None:
    server.faults = Faults(errors={"UIDL": b"-ERR [SYS/TEMP] later"})
    read_end, write_end = os.pipe()
    info = os.fstat(write_end)
    journal = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    with os.fdopen(read_end, encoding="utf-8") as pipe:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "popsync", "-c", str(config), "sync", "--no-progress"],
                stdout=subprocess.DEVNULL,
                stderr=write_end,
                env={**os.environ, **journal},
                cwd=ROOT,
                timeout=60,
                check=False,
            )
        finally:
            os.close(write_end)
        stderr = pipe.read()
    assert proc.returncode == 1
    (line,) = stderr.splitlines()
    assert line.startswith("<3>popsync: acct: FAILED"), line
    # Another stream (a terminal, a pipe to cron) gets no prefix.
    plain = popsync("-c", str(config), "sync", "--no-progress", env=journal)
    assert plain.stderr.startswith("popsync: acct: FAILED"), plain.stderr


def test_help_explains_account_log_format_and_exit_statuses() -> None:
    top = popsync("--help")
    assert "--log-format" in top.stdout and "JSON object per" in top.stdout
    assert "Exit status" in top.stdout
    for command in ("sync", "status", "check"):
        text = popsync(command, "--help").stdout
        assert "Exit status: 0" in text, command
        assert "--log-format" in text and "-q" in text, command
    sync = popsync("sync", "--help").stdout
    assert "ACCOUNT" in sync and "account's name" in sync
