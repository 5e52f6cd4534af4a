"""The mbox target: mboxrd format, Dovecot/mutt locking, exactly once across crashes.

Real files, real lock holders (child processes), and end to end through
``run_account`` against the project's POP3 test server.  Messages are read
back by two independent readers: CPython's ``mailbox.mbox`` (which does not
unquote mboxrd, so the helpers do) and a strict splitter that also checks
every separator follows a blank line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popsync.config import load_config
from popsync.deliver.base import Pending, Receipt, Refusal
from popsync.deliver.mbox import Entry, MboxDraft, MboxTarget, open_mbox_target
from popsync.deliver.mboxrd import NO_SENDER, Quoter, envelope_sender, quote, unquote
from popsync.errors import DeliveryError
from popsync.ledger import Ledger
from popsync.sync import run_account
from popsync.testing.mailstore import MailStore, to_crlf
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import stored_form
from tests.mbox_helpers import mbox_config, mbox_contents, read_mbox, split_mbox

pytestmark = pytest.mark.timeout(120)

_REFERENCE = re.compile(rb"(?m)^(>*From )")

TRICKY = [
    b"From the start\n",
    b">From quoted\n>>From twice\n>>>>>>From many\n",
    b"Subject: x\n\nFrom a\nFrom\nFrom:\nFro\n>Fro\n>>\n>\nFromage\n",
    b"no newline at the end From ",
    b"ends on From",
    b"ends on >>>Fro",
    b"\n\nFrom \n\n>From \n",
    b"",
    b">" * 5000 + b"From x\n" + b">" * 10 + b"\n",
]


def quote_in_chunks(data: bytes, cuts: Sequence[int]) -> bytes:
    quoter = Quoter()
    out, last = [], 0
    for cut in [*sorted(cuts), len(data)]:
        out.append(quoter.feed(data[last:cut]))
        last = cut
    return b"".join(out) + quoter.flush()


# -- the format ------------------------------------------------------------------


@pytest.mark.parametrize("data", TRICKY)
def test_quoting_is_the_same_whole_byte_by_byte_and_in_pieces(data: bytes) -> None:
    expected = _REFERENCE.sub(rb">\1", data)
    assert quote(data) == expected
    assert quote_in_chunks(data, range(1, len(data))) == expected
    rng = random.Random(len(data))
    for _ in range(20):
        cuts = rng.sample(range(len(data) + 1), min(len(data), 3))
        assert quote_in_chunks(data, cuts) == expected
    assert unquote(expected) == data


@given(
    st.lists(st.sampled_from([b"From ", b">", b"F", b"rom", b"x", b"\n", b" ", b"\xff"])).map(
        b"".join
    ),
    st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_quoting_streams_and_round_trips(data: bytes, cuts: list[int]) -> None:
    quoted = quote_in_chunks(data, [c for c in cuts if c <= len(data)])
    assert quoted == _REFERENCE.sub(rb">\1", data)
    assert unquote(quoted) == data
    # no line of the quoted form can be taken for a separator
    assert not re.search(rb"(?m)^From ", quoted)


@pytest.mark.parametrize(
    ("header", "sender"),
    [
        (b"Return-Path: <alice@example.org>\nSubject: x\n\n", b"alice@example.org"),
        (b"Subject: x\nreturn-path:   <bob@example.net>  \n\n", b"bob@example.net"),
        (b"Return-Path: carol@example.com\n\n", b"carol@example.com"),
        (b"Return-Path: <>\n\n", NO_SENDER),
        (b"Subject: none\n\nReturn-Path: <body@example.org>\n", NO_SENDER),
        (b"Return-Path: <a b@example.org>\n\n", NO_SENDER),
        (b"Return-Path: <\xc3\xa9@example.org>\n\n", NO_SENDER),
        (b"Return-Path: <a@b\rFrom evil>\n\n", NO_SENDER),
        (b"Return-Path: <" + b"a" * 300 + b"@example.org>\n\n", NO_SENDER),
    ],
)
def test_envelope_sender_is_safe_for_the_separator(header: bytes, sender: bytes) -> None:
    assert envelope_sender(header) == sender


# -- delivering directly -------------------------------------------------------------


def deliver(target: MboxTarget, messages: Sequence[bytes], chunk: int = 4096) -> list[Any]:
    """Hand *messages* to *target* as the Fetcher does: one batch."""
    drafts = []
    for i, data in enumerate(messages):
        draft = target.begin(f"m{i}-{time.monotonic_ns()}", b"uid%d" % i)
        for at in range(0, len(data), chunk):
            draft.write(data[at : at + chunk])
        target.end(draft)
        drafts.append(draft)
    intents = [target.intent(d) for d in drafts]
    results = target.commit(drafts)
    return list(zip(intents, results, strict=True))


def with_newline(data: bytes) -> bytes:
    return data if not data or data.endswith(b"\n") else data + b"\n"


def attachment(size: int) -> bytes:
    """A message with a base64 attachment of about *size* bytes."""
    body = base64.encodebytes(random.Random(5).randbytes(size * 3 // 4))
    return (
        b"From: a@example.org\nSubject: big\nContent-Type: application/octet-stream\n"
        b"Content-Transfer-Encoding: base64\n\n" + body
    )


ROUND_TRIP = [
    b"From: a@example.org\nSubject: dots\n\n.\n..\n.leading dot\n...\n",
    b"From: a@example.org\nSubject: from lines\n\nFrom here\n>From there\n>>From far\nFrom\n",
    b"From: a@example.org\nSubject: 8-bit\n\ncaf\xc3\xa9 \xff\xfe\x00\x01 bytes\n",
    b"From: a@example.org\nSubject: long\n\n" + b"x" * 20_000 + b"\n",
    b"From: a@example.org\nSubject: no newline\n\nlast line without one",
    b"Return-Path: <sender@example.org>\nSubject: sender\n\nbody\n",
    b"Subject: lone\r in a line\n\nand a CR at the end\r\n",
]


def test_round_trip_is_byte_exact(tmp_path: Path) -> None:
    path = tmp_path / "inbox"
    messages = [*ROUND_TRIP, attachment(5 * 1024 * 1024)]
    with open_mbox_target(path, warn=pytest.fail) as target:
        results = deliver(target, messages, chunk=65536)
    assert all(isinstance(r, Receipt) for _, r in results)
    expected = [with_newline(m) for m in messages]
    assert read_mbox(path) == expected
    data = path.read_bytes()
    entries = split_mbox(data)
    assert [body for _, body in entries] == expected
    senders = [line.split()[1] for line, _ in entries]
    assert senders[5] == b"sender@example.org"
    assert set(senders) - {b"sender@example.org"} == {b"MAILER-DAEMON"}
    # each receipt is "offset length" of its entry, separator to blank line
    for _, receipt in results:
        offset, length = map(int, receipt.text.split())
        assert (
            data[offset : offset + 5] == b"From "
            and data[offset + length - 2 : offset + length] == b"\n\n"
        )
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not (tmp_path / "inbox.lock").exists()


def test_appends_after_mail_other_programs_wrote(tmp_path: Path) -> None:
    import mailbox

    path = tmp_path / "inbox"
    box = mailbox.mbox(str(path))
    box.add(b"Subject: by python\n\nbody\n")  # python ends an mbox with one newline
    box.close()
    with open_mbox_target(path, warn=pytest.fail) as target:
        deliver(target, [b"Subject: one\n\n1\n"])
    with path.open("ab") as f:
        f.write(b"From x Fri Nov 27 17:00:00 2026\nSubject: no blank line after\n\ncut")
    with open_mbox_target(path, warn=pytest.fail) as target:
        deliver(target, [b"Subject: two\n\n2\n"])
    assert read_mbox(path) == [
        b"Subject: by python\n\nbody\n",
        b"Subject: one\n\n1\n",
        b"Subject: no blank line after\n\ncut\n",
        b"Subject: two\n\n2\n",
    ]
    assert len(split_mbox(path.read_bytes())) == 4


def test_a_batch_shares_one_lock_and_the_intents_name_the_offsets(tmp_path: Path) -> None:
    path = tmp_path / "inbox"
    path.write_bytes(b"From x Fri Nov 27 17:00:00 2026\n\nold\n")  # no blank line yet
    messages = [b"Subject: %d\n\n%d\n" % (i, i) for i in range(5)]
    with open_mbox_target(path, warn=pytest.fail) as target:
        results = deliver(target, messages)
    data = path.read_bytes()
    for intent, receipt in results:
        entry = Entry.parse(intent)
        assert entry is not None
        assert receipt.text == entry.receipt
        assert data[entry.start : entry.end].startswith(b"From ")
    first = Entry.parse(results[0][0])
    assert first is not None and (first.offset, first.pad) == (
        len(b"From x Fri Nov 27 17:00:00 2026\n\nold\n"),
        1,
    )


DOVECOT_IMAP = Path("/usr/lib/dovecot/imap")
_LITERAL = re.compile(rb"\* \d+ FETCH \(BODY\[\] \{(\d+)\}\r\n")


def dovecot_fetch(mbox: Path) -> list[bytes]:
    """Every message of (a copy of) *mbox* as Dovecot's own mbox reader hands
    it out: its IMAP binary, preauthenticated over stdin, EXAMINE and FETCH.

    Dovecot will not serve mail as root, so as root the copy belongs to, and
    the binary runs as, ``nobody``.
    """
    if not DOVECOT_IMAP.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{DOVECOT_IMAP} missing (CI is set, so this test must run)")
        pytest.skip(f"{DOVECOT_IMAP} missing")
    scratch = Path(tempfile.mkdtemp(prefix="popsync-dovecot-"))
    try:
        for sub in ("mail", "run", "state"):
            (scratch / sub).mkdir()
        shutil.copyfile(mbox, scratch / "inbox")
        (scratch / "dovecot.conf").write_text(
            f"mail_location = mbox:{scratch}/mail:INBOX={scratch}/inbox:INDEX=MEMORY\n"
            f"mbox_read_locks = fcntl\nmbox_write_locks = fcntl\n"
            f"base_dir = {scratch}/run\nstate_dir = {scratch}/state\nlog_path = /dev/stderr\n"
        )
        user = pwd.getpwuid(os.geteuid())
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            scratch.chmod(0o755)
            for path in [scratch, *scratch.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        script = b"a EXAMINE INBOX\r\nb FETCH 1:* (BODY.PEEK[])\r\nc LOGOUT\r\n"
        done = subprocess.run(
            [str(DOVECOT_IMAP), "-c", str(scratch / "dovecot.conf")],
            input=script,
            env={"USER": user.pw_name, "HOME": str(scratch), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            timeout=60,
            check=False,
            user=user.pw_uid if os.geteuid() == 0 else None,
            group=user.pw_gid if os.geteuid() == 0 else None,
            extra_groups=[] if os.geteuid() == 0 else None,
        )
    finally:
        shutil.rmtree(scratch)
    out = done.stdout
    assert b"b OK" in out, (out[-500:], done.stderr[-500:])
    bodies = []
    for match in _LITERAL.finditer(out):
        start = match.end()
        bodies.append(out[start : start + int(match.group(1))])
    return bodies


@pytest.mark.dovecot
def test_dovecot_reads_every_message_back(tmp_path: Path) -> None:
    # Dovecot hands out the mboxrd quoting as stored (it does not unquote) in
    # CRLF, hides the status fields it keeps in an mbox (none here), and sends
    # a NUL as 0x80 (RFC 3501 §4.3: no NUL in a literal).
    messages = [*ROUND_TRIP[:-1], attachment(200_000), *generate_messages(20, 3000, seed=6)]
    path = tmp_path / "inbox"
    with open_mbox_target(path, warn=pytest.fail) as target:
        deliver(target, messages[:10])
    with open_mbox_target(path, warn=pytest.fail) as target:
        deliver(target, messages[10:])
    expected = [to_crlf(quote(with_newline(m))).replace(b"\0", b"\x80") for m in messages]
    assert dovecot_fetch(path) == expected


# -- locks -----------------------------------------------------------------------------


@contextlib.contextmanager
def holder(script: str) -> Iterator[subprocess.Popen[str]]:
    """A child process that runs *script*, prints ``ready`` and waits for its stdin to close."""
    code = f"import sys, fcntl, os\n{script}\nprint('ready', flush=True)\nsys.stdin.read()\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def refused_for_now(results: list[Any], *words: str) -> bool:
    return all(
        isinstance(r, Refusal) and r.temporary and all(w in r.text for w in words)
        for _, r in results
    )


def test_a_live_dotlock_holder_is_waited_for_then_refused_for_now(tmp_path: Path) -> None:
    path, lock = tmp_path / "inbox", tmp_path / "inbox.lock"
    with holder("") as proc:
        lock.write_text(f"{proc.pid}:{socket.gethostname()}")
        with open_mbox_target(path, warn=pytest.fail, lock_wait=0.3) as target:
            started = time.monotonic()
            results = deliver(target, [b"Subject: x\n\n1\n"])
            waited = time.monotonic() - started
        assert refused_for_now(results, str(lock), f"{proc.pid}:")
        assert 0.3 <= waited < 5
        assert not path.exists() and lock.read_text() == f"{proc.pid}:{socket.gethostname()}"
    # its process is gone: the lock is stale and overridden at once
    with open_mbox_target(path, warn=pytest.fail, lock_wait=0) as target:
        results = deliver(target, [b"Subject: x\n\n1\n"])
    assert isinstance(results[0][1], Receipt) and read_mbox(path) == [b"Subject: x\n\n1\n"]
    assert not lock.exists()


def test_a_refused_batch_ends_the_poll_as_temporary(tmp_path: Path) -> None:
    messages = list(generate_messages(5, 800, seed=2))
    path = tmp_path / "inbox"
    with POP3TestServer(MailStore(messages)) as srv:
        with holder("") as proc:
            (tmp_path / "inbox.lock").write_text(f"{proc.pid}:{socket.gethostname()}")
            report, ledger = poll_once(tmp_path, srv, path, delete_after_days=0, lock_wait=0.2)
            ledger.close()
            assert not report.ok and report.temporary, report
            assert "inbox.lock" in (report.error or "") + " ".join(report.warnings)
            assert len(srv.store) == 5 and not path.exists()
        report, ledger = poll_once(tmp_path, srv, path, delete_after_days=0)
        ledger.close()
    assert report.ok, report.error
    assert set(mbox_contents(path)) == {stored_form(m) for m in messages}


def test_a_stale_dotlock_is_overridden_only_if_the_mbox_did_not_change(tmp_path: Path) -> None:
    path, lock = tmp_path / "inbox", tmp_path / "inbox.lock"
    path.write_bytes(b"")
    lock.write_text("4242:some-other-host")  # cannot be checked from here
    old = time.time() - 400
    os.utime(lock, (old, old))
    # the mbox changed recently: the holder may still be at work
    with open_mbox_target(path, warn=pytest.fail, lock_wait=0.2, stale_after=300) as target:
        assert refused_for_now(deliver(target, [b"S: 1\n\n1\n"]), "some-other-host")
    os.utime(path, (old, old))
    with open_mbox_target(path, warn=pytest.fail, lock_wait=0.2, stale_after=300) as target:
        results = deliver(target, [b"S: 1\n\n1\n"])
    assert isinstance(results[0][1], Receipt) and read_mbox(path) == [b"S: 1\n\n1\n"]
    assert not lock.exists()


def test_an_fcntl_lock_is_waited_for_then_refused_for_now(tmp_path: Path) -> None:
    path = tmp_path / "inbox"
    path.write_bytes(b"")
    script = f"fd = os.open({str(path)!r}, os.O_RDWR)\nfcntl.lockf(fd, fcntl.LOCK_EX)"
    with holder(script), open_mbox_target(path, warn=pytest.fail, lock_wait=0.3) as target:
        assert refused_for_now(deliver(target, [b"S: 1\n\n1\n"]), "fcntl")
        assert not (tmp_path / "inbox.lock").exists()  # the dotlock was given back
    with open_mbox_target(path, warn=pytest.fail, lock_wait=0.3) as target:
        assert isinstance(deliver(target, [b"S: 1\n\n1\n"])[0][1], Receipt)


TRY_LOCK = """
import fcntl, os, sys
try:
    fcntl.lockf(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(1)
"""


def test_the_lock_is_held_from_the_first_intent_to_the_end_of_commit(tmp_path: Path) -> None:
    path, lock = tmp_path / "inbox", tmp_path / "inbox.lock"
    with open_mbox_target(path, warn=pytest.fail) as target:
        draft = target.begin("n", b"u")
        draft.write(b"S: x\n\nx\n")
        target.end(draft)
        assert not lock.exists()
        target.intent(draft)
        assert lock.read_text() == f"{os.getpid()}:{socket.gethostname()}"
        probe = subprocess.run(
            [sys.executable, "-c", TRY_LOCK, str(path)], check=False, capture_output=True
        )
        assert probe.returncode == 1, probe.stderr  # locked: the child could not have it
        target.commit([draft])
        assert not lock.exists()


def test_two_polls_of_one_process_take_turns(tmp_path: Path) -> None:
    # fcntl locks belong to the process and the dotlock names its pid: two
    # daemon threads delivering into one mbox must still exclude each other.
    path = tmp_path / "inbox"
    first_locked, second_done = threading.Event(), threading.Event()
    results: list[Any] = []

    def second() -> None:
        assert first_locked.wait(10)
        with open_mbox_target(path, warn=pytest.fail) as target:
            results.extend(deliver(target, [b"S: second\n\n2\n"]))
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    with open_mbox_target(path, warn=pytest.fail) as target:
        draft = target.begin("first", b"u")
        draft.write(b"S: first\n\n1\n")
        target.end(draft)
        target.intent(draft)
        first_locked.set()
        assert not second_done.wait(0.5)  # the second waits for the lock...
        target.commit([draft])
    thread.join(10)
    assert second_done.is_set() and isinstance(results[0][1], Receipt)  # ...then delivers
    assert [body for _, body in split_mbox(path.read_bytes())] == [
        b"S: first\n\n1\n",
        b"S: second\n\n2\n",
    ]


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory where no lock file can be created (root: chattr +i) but
    whose files can be written."""
    folder = tmp_path / "spool"
    folder.mkdir()
    (folder / "inbox").write_bytes(b"")
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(folder)], check=False).returncode:
            pytest.skip("as root, only an immutable directory refuses a dotlock; chattr failed")
        yield folder
        subprocess.run([chattr, "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_no_dotlock_in_an_unwritable_directory_warns_once(unwritable_dir: Path) -> None:
    path = unwritable_dir / "inbox"
    warnings: list[str] = []
    for n in range(2):
        with open_mbox_target(path, warn=warnings.append) as target:
            assert isinstance(deliver(target, [b"S: %d\n\n%d\n" % (n, n)])[0][1], Receipt)
    assert read_mbox(path) == [b"S: 0\n\n0\n", b"S: 1\n\n1\n"]
    assert len(warnings) == 1 and "fcntl only" in warnings[0] and str(path) in warnings[0]


def test_a_writer_that_ignores_the_lock_makes_the_batch_fail_whole(tmp_path: Path) -> None:
    path = tmp_path / "inbox"
    with open_mbox_target(path, warn=pytest.fail) as target:
        drafts = []
        for i in range(2):
            draft = target.begin(f"n{i}", b"u")
            draft.write(b"S: x\n\nx\n")
            target.end(draft)
            drafts.append(draft)
        for draft in drafts:
            target.intent(draft)
        with path.open("ab") as f:  # no lock taken
            f.write(b"From rogue Fri Nov 27 17:00:00 2026\n\nrogue\n\n")
        with pytest.raises(DeliveryError, match="does not lock"):
            target.commit(drafts)
    assert read_mbox(path) == [b"\nrogue\n"]
    assert not (tmp_path / "inbox.lock").exists()


def test_a_directory_or_a_fifo_at_the_path_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    directory = open_mbox_target(tmp_path / "dir", warn=pytest.fail)
    with pytest.raises(DeliveryError, match=r"^mbox .*dir: is a directory$"), directory:
        pass
    os.mkfifo(tmp_path / "fifo")  # must not hang the poll
    with (
        open_mbox_target(tmp_path / "fifo", warn=pytest.fail) as target,
        pytest.raises(DeliveryError, match=r"^mbox .*fifo: not a regular file$"),
    ):
        deliver(target, [b"S: x\n\nx\n"])
    assert not (tmp_path / "fifo.lock").exists()


# -- recovery ------------------------------------------------------------------------------


PRIOR = b"From old Fri Nov 27 17:00:00 2026\nSubject: old\n\n>From quoted\n\n"


def crashed_batch(tmp_path: Path, messages: list[bytes]) -> tuple[Path, bytes, list[Pending]]:
    """A batch delivered into an mbox that held PRIOR, and the pending rows a
    crash before the ledger commit would leave."""
    path = tmp_path / "inbox"
    path.write_bytes(PRIOR)
    with open_mbox_target(path, warn=pytest.fail) as target:
        results = deliver(target, messages, chunk=7)
    pending = [Pending(f"row{i}", intent) for i, (intent, _) in enumerate(results)]
    return path, path.read_bytes(), pending


def test_recovery_finds_a_whole_batch_and_records_what_the_fetch_would(tmp_path: Path) -> None:
    messages = [b"Return-Path: <a@b.c>\nSubject: 1\n>From x\n\nFrom body\n", b"S: 2\n\nno newline"]
    path, full, pending = crashed_batch(tmp_path, messages)
    with open_mbox_target(path, warn=pytest.fail) as target:
        held = target.recover(pending)
    assert path.read_bytes() == full
    assert [h.asked for h in held] == ["row0", "row1"]
    for h, data in zip(held, messages, strict=True):
        assert (h.size, h.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert h.wire_size == len(data) + data.count(b"\n")
    assert held[0].header_section == b"Return-Path: <a@b.c>\nSubject: 1\n>From x\n\n"
    assert held[1].header_section == b"S: 2\n\n"
    offset, length = map(int, held[1].receipt.split())
    assert full[offset:].startswith(b"From ") and offset + length == len(full)


def test_recovery_truncates_an_append_cut_anywhere(tmp_path: Path) -> None:
    messages = [b"Subject: 1\n\nFrom one\n", b"Subject: 2\n\n>From two\nno newline"]
    path, full, pending = crashed_batch(tmp_path, messages)
    ends = [e.end for p in pending if (e := Entry.parse(p.intent))]
    for cut in range(len(PRIOR), len(full) + 1):
        path.write_bytes(full[:cut])
        warnings: list[str] = []
        with open_mbox_target(path, warn=warnings.append) as target:
            held = target.recover(pending)
        whole = [end for end in ends if end <= cut]
        assert len(held) == len(whole), cut
        kept = whole[-1] if whole else len(PRIOR)
        assert path.read_bytes() == full[:kept], cut
        assert len(warnings) == (cut != kept), (cut, warnings)
        assert read_mbox(path) == [
            b"Subject: old\n\nFrom quoted\n",
            *[with_newline(m) for m in messages[: len(whole)]],
        ]


def test_recovery_finds_entries_a_reader_moved_by_expunging(tmp_path: Path) -> None:
    messages = [b"Subject: 1\n\nFrom one\n", b"Subject: 2\n\ntwo\n"]
    path, full, pending = crashed_batch(tmp_path, messages)
    path.write_bytes(full[len(PRIOR) :])  # the reader expunged the old message
    with open_mbox_target(path, warn=pytest.fail) as target:
        held = target.recover(pending)
    assert [h.asked for h in held] == ["row0", "row1"]
    data = path.read_bytes()
    assert data == full[len(PRIOR) :]
    for h, message in zip(held, messages, strict=True):
        offset, length = map(int, h.receipt.split())
        assert split_mbox(data[offset : offset + length])[0][1] == message


def test_a_partial_append_followed_by_other_mail_is_left_alone(tmp_path: Path) -> None:
    path, full, pending = crashed_batch(tmp_path, [b"Subject: 1\n\nbody\n" * 20])
    cut = len(PRIOR) + 60
    other = b"\n\nFrom other Fri Nov 27 17:00:00 2026\nSubject: other\n\nx\n\n"
    path.write_bytes(full[:cut] + other)
    warnings: list[str] = []
    with open_mbox_target(path, warn=warnings.append) as target:
        assert target.recover(pending) == []
    assert path.read_bytes() == full[:cut] + other
    assert len(warnings) == 1 and "followed by other mail" in warnings[0]


def test_another_programs_mail_at_the_noted_offset_is_not_taken_for_ours(tmp_path: Path) -> None:
    path, _, pending = crashed_batch(tmp_path, [b"Subject: 1\n\nbody\n"])
    # the crash came before anything was written; then another program delivered
    other = b"From other Fri Nov 27 17:00:00 2026\nSubject: 1\n\nbody\n\n"
    path.write_bytes(PRIOR + other)
    with open_mbox_target(path, warn=pytest.fail) as target:
        assert target.recover(pending) == []
    assert path.read_bytes() == PRIOR + other


def test_recovery_without_intents_neither_locks_nor_reads(tmp_path: Path) -> None:
    path = tmp_path / "inbox"
    path.write_bytes(PRIOR)
    with holder("") as proc:
        (tmp_path / "inbox.lock").write_text(f"{proc.pid}:{socket.gethostname()}")
        with open_mbox_target(path, warn=pytest.fail, lock_wait=0) as target:
            assert target.recover([Pending("a", None), Pending("b", "maildir-ish")]) == []
            with pytest.raises(DeliveryError, match="locked by another program"):
                target.recover([Pending("c", f"mboxrd1 {len(PRIOR)} 0 1 x 1 y 1 z 1")])


def test_close_discards_unfinished_drafts(tmp_path: Path) -> None:
    with open_mbox_target(tmp_path / "inbox", warn=pytest.fail) as target:
        draft = target.begin("n", b"u")
        draft.write(b"S: x\n")
        assert isinstance(draft, MboxDraft)
    with pytest.raises(DeliveryError, match="closed"):
        list(draft.chunks())
    assert not (tmp_path / "inbox").exists()


# -- end to end ------------------------------------------------------------------------------


def poll_once(tmp: Path, srv: POP3TestServer, path: Path, **account: Any) -> tuple[Any, Ledger]:
    from popsync.deliver import mboxlock

    wait = account.pop("lock_wait", None)
    config = load_config(
        mbox_config(tmp, [{"name": "box", "port": srv.port, "mbox": str(path), **account}])
    )
    ledger = Ledger.open(config.ledger_url)
    saved = mboxlock.LOCK_WAIT
    if wait is not None:
        mboxlock.LOCK_WAIT = wait
    try:
        return run_account(config.accounts[0], ledger, config.state_dir), ledger
    finally:
        mboxlock.LOCK_WAIT = saved


def test_sync_into_an_mbox_is_byte_exact_and_exactly_once(tmp_path: Path) -> None:
    messages = [*ROUND_TRIP, attachment(5 * 1024 * 1024), *generate_messages(120, 1500, seed=8)]
    path = tmp_path / "mail" / "inbox"
    with POP3TestServer(MailStore(messages)) as srv:
        report, ledger = poll_once(tmp_path, srv, path, delete_after_days=0)
        assert report.ok, report.error
        assert report.counts.fetched == len(messages) and len(srv.store) == 0
        assert mbox_contents(path) == {with_newline(stored_form(m)): 1 for m in messages}
        assert sorted(read_mbox(path)) == sorted(with_newline(stored_form(m)) for m in messages)
        rows = ledger.rows("box")
        assert {r.target for r in rows.values()} == {"mbox"}
        assert all(re.fullmatch(r"\d+ \d+", r.receipt or "") for r in rows.values())
        ledger.close()
        srv.store.add_many(messages[:2])  # the same messages again: new unique-ids
        again, ledger = poll_once(tmp_path, srv, path, delete_after_days=0)
        ledger.close()
    assert again.ok and again.counts.fetched == 2
    assert sum(mbox_contents(path).values()) == len(messages) + 2
