"""I1, checked at the moment it matters: when the server receives each DELE.

A SIGKILL test cannot see a missing fsync (only a power loss would), so this
one watches the order instead.  A spy records every ``os.fsync`` (with the
path behind the descriptor), ``os.link`` and ``os.rename``, and the test
server's command hook, at each ``DELE n``, asserts that the message the
session numbers *n*:

1. is recorded ``delivered`` in the ledger (the commit came first), and
2. its file went through fsync of ``tmp/<name>`` -> link into ``new/<name>``
   -> fsync of ``new/``, in that order, before the DELE arrived.

Any reordering of the durable-delivery steps, or a dropped fsync, fails here
in seconds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from popsync.ledger import Ledger
from popsync.sync import run_account
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from popsync.testing.server_state import SessionState
from tests.helpers import load, write_config

pytestmark = pytest.mark.timeout(120)


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _dir_path(path: Any, dir_fd: int | None) -> str:
    text = os.fsdecode(path)
    return text if dir_fd is None else os.path.join(_fd_path(dir_fd), text)


@dataclass
class Spy:
    """File-system calls in the order they returned (from any thread)."""

    events: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, path: str) -> None:
        with self.lock:
            self.events.append((kind, os.path.realpath(path)))

    def snapshot(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.events)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    recorder = Spy()
    real_fsync, real_link, real_rename = os.fsync, os.link, os.rename

    def fsync(fd: Any) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        path = _fd_path(number)
        real_fsync(fd)
        recorder.add("fsync", path)

    def link(
        src: Any,
        dst: Any,
        *,
        src_dir_fd: Any = None,
        dst_dir_fd: Any = None,
        follow_symlinks: bool = True,
    ) -> None:
        real_link(
            src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow_symlinks
        )
        recorder.add("link", _dir_path(dst, dst_dir_fd))

    def rename(src: Any, dst: Any, *, src_dir_fd: Any = None, dst_dir_fd: Any = None) -> None:
        real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        recorder.add("rename", _dir_path(dst, dst_dir_fd))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    yield recorder


def durable_in_order(events: list[tuple[str, str]], maildir: Path, name: str) -> str | None:
    """None if ``tmp/name`` was fsynced, then linked as ``new/name``, then
    ``new/`` fsynced, in that order; else what is missing."""
    root = os.path.realpath(maildir)
    steps = [
        ("fsync", os.path.join(root, "tmp", name)),
        ("link", os.path.join(root, "new", name)),
        ("fsync", os.path.join(root, "new")),
    ]
    at = 0
    for step in steps:
        try:
            at = events.index(step, at) + 1
        except ValueError:
            return f"{step[0]} {step[1]} missing or out of order"
    return None


class Watch:
    """The server hook: checks I1 at every DELE, collects violations."""

    def __init__(self, ledger: Ledger, account: str, maildir: Path | None, spy: Spy) -> None:
        assert maildir is not None, "the account delivers to no Maildir"
        self.ledger, self.account, self.maildir, self.spy = ledger, account, maildir, spy
        self.deles = 0
        self.violations: list[str] = []

    def __call__(self, state: SessionState, line: bytes) -> bytes | None:
        if not line.upper().startswith(b"DELE "):
            return None
        events = self.spy.snapshot()  # before the ledger read: nothing later counts
        try:
            uid = state.uids[int(line.split()[1]) - 1]
        except (ValueError, IndexError):
            return None
        self.deles += 1
        rows = [r for r in self.ledger.rows(self.account).values() if r.uid == uid]
        if not rows or any(r.state not in ("delivered", "deleted") for r in rows):
            states: list[str] = [r.state for r in rows] or ["no row"]
            self.violations.append(f"DELE of {uid!r} while the ledger says {states}")
            return None
        for row in rows:
            assert row.maildir_name is not None
            problem = durable_in_order(events, self.maildir, row.maildir_name)
            if problem is not None and row.delivered_at is not None and row.delivered_at > 0:
                self.violations.append(f"DELE of {uid!r}: {problem}")
        return None


def poll_with_watch(tmp_path: Path, spy: Spy, messages: list[bytes], **account: Any) -> Watch:
    store = MailStore(messages)
    with POP3TestServer(store) as server:
        cfg = load(write_config(tmp_path, [{"name": "acct", "port": server.port, **account}]))
        acct = cfg.accounts[0]
        with Ledger.open(cfg.ledger_url) as ledger:
            watch = Watch(ledger, "acct", acct.maildir, spy)
            server.on_command = watch
            report = run_account(acct, ledger, cfg.state_dir)
            assert report.ok, report.error
            if account.get("delete_after_days") not in (None, 0):
                later = time.time() + 30 * 86400
                again = run_account(acct, ledger, cfg.state_dir, now=lambda: later)
                assert again.ok, again.error
    return watch


def test_every_dele_follows_a_durable_copy_and_its_commit(tmp_path: Path, spy: Spy) -> None:
    messages = list(generate_messages(150, 3000, seed=5))  # more than one batch
    watch = poll_with_watch(tmp_path, spy, messages, delete_after_days=0)
    assert watch.deles == 150
    assert watch.violations == []


def test_later_deletion_follows_the_same_order(tmp_path: Path, spy: Spy) -> None:
    messages = list(generate_messages(20, 2000, seed=6))
    watch = poll_with_watch(tmp_path, spy, messages, delete_after_days=3)
    assert watch.deles == 20
    assert watch.violations == []
