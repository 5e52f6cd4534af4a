"""SIGKILL a real ``popsync sync`` at every step of a poll (docs/design.md §4), then re-run it.

After each crash, and after the clean re-run:
* I1 no loss: every message the server no longer holds is in the Maildir;
* I2 exactly once: after the re-run every message is in ``new/`` or ``cur/``
  exactly once, byte-identical to the server's copy;
* nothing is left in ``tmp/`` after the re-run, and the server ends empty
  (delete mode) because every copy became durable.

The crash points are the ``failpoint()`` calls in popsync/sync.py, switched
on by ``POPSYNC_FAILPOINT`` (see popsync/failpoints.py).
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from popsync.failpoints import POINTS
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import maildir_contents, run_sync, stored_form, write_config
from tests.mbox_helpers import mbox_config, mbox_contents, read_mbox

pytestmark = [pytest.mark.crash, pytest.mark.timeout(120)]

MESSAGES = list(generate_messages(150, 2500, seed=11))


def assert_no_loss(store: MailStore, maildir: Path) -> None:
    on_server = {stored_form(m.data) for m in store.messages()}
    delivered = maildir_contents(maildir)
    for data in MESSAGES:
        form = stored_form(data)
        assert form in on_server or form in delivered, "a message was lost"


# Every step once, and a few at a later batch so the crash lands mid-session
# with earlier batches committed and their DELEs in flight.
CRASHES = [*POINTS, "mid_body:70", "after_link:2", "after_dir_fsync:2", "after_commit:2"]


# On a PostgreSQL ledger, in delete mode: the steps on either side of each
# ledger commit (an uncommitted transaction dies with its connection), and
# one later batch.
PG_CRASHES = [
    "after_begin_fetch",
    "after_dir_fsync",
    "after_commit",
    "after_dele",
    "after_quit",
    "after_commit:2",
]


@pytest.mark.parametrize(
    ("failpoint", "mode", "backend"),
    [
        *((f, m, "sqlite") for m in ("delete", "mirror") for f in CRASHES),
        *(
            pytest.param(f, "delete", "postgresql", marks=pytest.mark.postgresql)
            for f in PG_CRASHES
        ),
    ],
)
def test_sigkill_then_rerun_exactly_once(
    tmp_path: Path, failpoint: str, mode: str, backend: str, request: pytest.FixtureRequest
) -> None:
    ledger_url = None if backend == "sqlite" else str(request.getfixturevalue("postgres_url"))
    store = MailStore(MESSAGES)
    with POP3TestServer(store) as srv:
        account = {"name": "crashy", "port": srv.port}
        if mode == "delete":
            account["delete_after_days"] = 0
        config = write_config(tmp_path, [account], ledger_url=ledger_url)
        maildir = tmp_path / "Maildir" / "crashy"

        crashed = run_sync(config, failpoint)
        assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)
        srv.wait_for_sessions(1, timeout=10)
        assert_no_loss(store, maildir)
        already = len(maildir_contents(maildir))

        clean = run_sync(config, None)
        assert clean.returncode == 0, clean.stderr
        # What reached the Maildir before the crash is recovered, not fetched again.
        fetched = int(re.search(r" (\d+) fetched", clean.stdout).group(1))  # type: ignore[union-attr]
        assert fetched == len(MESSAGES) - already
        contents = maildir_contents(maildir)
        assert set(contents) == {stored_form(m) for m in MESSAGES}
        duplicates = [n for n in contents.values() if n > 1]
        assert not duplicates, f"{len(duplicates)} message(s) delivered twice"
        assert not any((maildir / "tmp").iterdir())
        assert len(store) == (0 if mode == "delete" else len(MESSAGES))

        # and a third run has nothing to do
        third = run_sync(config, None)
        assert third.returncode == 0 and " 0 fetched" in third.stdout


# -- the mbox target: the same promise, exactly once --------------------------------

MBOX_CRASHES = [
    "after_begin_fetch",
    "mid_body",
    "after_intent",  # the offsets noted, the mbox locked, nothing written
    "mbox_mid_append",  # half of an entry written
    "mbox_appended",  # appended and fsynced, still locked, ledger not committed
    "after_dir_fsync",
    "after_commit",
    "after_dele",
    "after_quit",
    "after_intent:2",
    "mbox_mid_append:2",
    "mbox_appended:2",
]


@pytest.mark.parametrize("failpoint", MBOX_CRASHES)
@pytest.mark.parametrize("mode", ["delete", "mirror"])
def test_sigkill_then_rerun_exactly_once_into_an_mbox(
    tmp_path: Path, failpoint: str, mode: str
) -> None:
    store = MailStore(MESSAGES)
    mbox = tmp_path / "inbox"
    expected = {stored_form(m) for m in MESSAGES}
    with POP3TestServer(store) as srv:
        account: dict[str, object] = {"name": "crashy", "port": srv.port, "mbox": str(mbox)}
        if mode == "delete":
            account["delete_after_days"] = 0
        config = mbox_config(tmp_path, [account])

        crashed = run_sync(config, failpoint)
        assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)
        srv.wait_for_sessions(1, timeout=10)
        on_server = {stored_form(m.data) for m in store.messages()}
        readable = set(read_mbox(mbox))  # a reader's view, partial entry and all
        assert expected <= on_server | readable, "a message was lost"
        if failpoint.startswith("mbox_mid_append"):
            assert not mbox.read_bytes().endswith(b"\n\n"), "the crash left no partial entry"
        if failpoint.startswith(("after_intent", "mbox_")):
            assert (tmp_path / "inbox.lock").exists()  # left by the dead process
        already = len(expected & readable)

        clean = run_sync(config, None)
        assert clean.returncode == 0, clean.stderr
        fetched = int(re.search(r" (\d+) fetched", clean.stdout).group(1))  # type: ignore[union-attr]
        assert fetched == len(MESSAGES) - already
        contents = mbox_contents(mbox)  # strict: every entry whole
        assert set(contents) == expected
        duplicates = [n for n in contents.values() if n > 1]
        assert not duplicates, f"{len(duplicates)} message(s) delivered twice"
        assert not (tmp_path / "inbox.lock").exists()
        assert len(store) == (0 if mode == "delete" else len(MESSAGES))

        third = run_sync(config, None)
        assert third.returncode == 0 and " 0 fetched" in third.stdout
