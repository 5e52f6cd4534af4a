"""The IMAP target: the wire rules on a scripted transport, the rest against a
real Dovecot IMAP server (plain, STARTTLS and implicit TLS, with a quota).

What is checked: a message reads back byte-identical (CRLF->LF) whatever it
holds; a copy APPENDed before a crash is found again by its intent, and one
never APPENDed is not; a quota refusal refuses that message only; TLS is
verified and the password is never sent in clear without consent; a reply
the server makes too long is cut off; memory stays flat for a 200 MB
message.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from popsync.deliver.base import Pending, Receipt, Refusal
from popsync.deliver.imap import (
    LINE_CAP,
    LITERAL_CAP,
    FromWire,
    ImapAuthError,
    ImapDraft,
    ImapSession,
    ImapTarget,
    Intent,
    Wire,
    mailbox_name,
    open_imap_target,
    to_wire,
)
from popsync.errors import DeliveryError, SecurityError
from popsync.options import TlsMode
from popsync.transport import make_ssl_context
from tests.fakes import FakeTransport
from tests.helpers import run_sync
from tests.servers.dovecot_delivery import DeliveryDovecot, DeliveryMailbox

# Stored form (LF line ends): dot-stuffed-looking lines, "From " lines, 8-bit
# bytes, a NUL, a bare CR, a 20,000-character line and no final line end.
TRICKY = (
    b"From: a@example.org\nSubject: tricky\nMessage-ID: <tricky@example.org>\n\n"
    b".\n..leading dots\nFrom the start\n>From quoted\n"
    b"8-bit: \xe9\xff\x80 nul:\x00 bare CR:\r.\n" + b"x" * 20_000 + b"\nno final newline"
)
NO_MESSAGE_ID = b"From: a@example.org\nSubject: plain\n\nbody\n"


@dataclass(frozen=True)
class Spec:
    """The fields of the config's ``imap:`` mapping the target reads."""

    host: str
    port: int
    tls: TlsMode
    username: str
    password: str = field(repr=False)
    ca_file: Path | None = None
    allow_plaintext: bool = False
    mailbox: str = "INBOX"

    def secret(self) -> str:
        return self.password

    def ssl_context(self) -> ssl.SSLContext:
        return make_ssl_context(self.ca_file)


def draft_of(target: ImapTarget, name: str, data: bytes, piece: int = 65536) -> ImapDraft:
    draft = target.begin(name, name.encode())
    for start in range(0, len(data), piece):
        draft.write(data[start : start + piece])
    target.end(draft)
    return draft


def deliver(target: ImapTarget, messages: dict[str, bytes]) -> dict[str, Receipt | Refusal]:
    """begin/write/end, the intents, then one commit, as the Fetcher does."""
    drafts = [draft_of(target, name, data) for name, data in messages.items()]
    for draft in drafts:
        target.intent(draft)
    return dict(zip(messages, target.commit(drafts), strict=True))


# -- values -------------------------------------------------------------------------------


def test_intent_text_round_trips() -> None:
    intent = Intent("Entwürfe 2", 7, 42, 100, 103, "ab" * 32, "-", "<x@y>")
    assert Intent.parse(intent.text()) == intent
    assert Intent.parse("12 34") is None
    assert Intent.parse(intent.text().replace("imap1", "imap9")) is None


def test_mailbox_names_are_quoted_modified_utf7() -> None:
    """RFC 3501 §5.1.3: non-ASCII in base64 of UTF-16, "&" as "&-"."""
    assert mailbox_name("INBOX") == b'"INBOX"'
    assert mailbox_name("Entwürfe") == b'"Entw&APw-rfe"'
    assert mailbox_name("A&B") == b'"A&-B"'
    assert mailbox_name('say "hi"\\') == b'"say \\"hi\\"\\\\"'
    assert mailbox_name("tab\there") == b'"tab&AAk-here"'  # controls too: never raw


@pytest.mark.parametrize("data", [TRICKY, b"\r\r\n\r", b"\n\n", b"\r"])
def test_crlf_comes_back_to_lf_at_every_split(data: bytes) -> None:
    wire = to_wire(data)
    for cut in range(len(wire) + 1) if len(wire) < 100 else (1, 80, 81, 82, len(wire) - 1):
        back = FromWire()
        assert back.feed(wire[:cut]) + back.feed(wire[cut:]) + back.end() == data


# -- the wire, scripted ---------------------------------------------------------------------


def scripted_session(*script: bytes) -> tuple[ImapSession, FakeTransport]:
    transport = FakeTransport(script, where="imap.test:143")
    session = ImapSession(Wire(transport, "imap target imap.test:143"), {"IMAP4REV1"})
    session.examined, session.uidvalidity, session.uidnext = "INBOX", 9, 5
    return session, transport


@pytest.mark.parametrize(
    ("script", "says"),
    [
        ((b"* OK " + b"x" * (LINE_CAP + 10),), "reply line longer than"),
        ((b"* 1 FETCH (BODY[] {%d}\r\n" % (LITERAL_CAP + 1),), "-octet literal"),
        ((b"* BYE going away\r\n",), "going away"),
        ((b"* 1 EXISTS\r\n", b""), "closed the connection"),
        ((b"A7 OK not ours\r\n",), "never sent"),
    ],
    ids=["long-line", "big-literal", "bye", "eof", "stray-tag"],
)
def test_a_bad_reply_is_a_delivery_error(script: tuple[bytes, ...], says: str) -> None:
    session, _ = scripted_session(*script)
    with pytest.raises(DeliveryError, match=says):
        session.wire.command(b"NOOP")


def test_a_refusal_before_the_continuation_costs_no_body() -> None:
    """A synchronizing literal: the server can say no before the body is sent."""
    session, transport = scripted_session(b"A1 NO [OVERQUOTA] Quota exceeded\r\n")
    target = ImapTarget(session, "INBOX")
    results = deliver(target, {"m1": b"Subject: big\n\n" + b"y" * 100_000})
    assert results == {"m1": Refusal("NO [OVERQUOTA] Quota exceeded", temporary=False)}
    assert transport.sent == b'A1 APPEND "INBOX" {100016}\r\n'


@pytest.mark.parametrize(("code", "temporary"), [("INUSE", True), ("UNAVAILABLE", True)])
def test_in_use_refuses_for_now(code: str, temporary: bool) -> None:
    session, _ = scripted_session(b"A1 NO [%s] try later\r\n" % code.encode())
    results = deliver(ImapTarget(session, "INBOX"), {"m1": b"s\n\nb\n"})
    assert results["m1"] == Refusal(f"NO [{code}] try later", temporary=temporary)


def test_the_body_is_sent_with_crlf_after_the_continuation() -> None:
    session, transport = scripted_session(
        b"+ OK\r\n", b"* 5 EXISTS\r\nA1 OK [APPENDUID 9 5] done\r\n"
    )
    results = deliver(ImapTarget(session, "INBOX"), {"m1": b"a\n\nb\r\nc"})
    assert results == {"m1": Receipt("INBOX 9 5")}
    assert transport.sent == b'A1 APPEND "INBOX" {10}\r\na\r\n\r\nb\r\r\nc\r\n'
    assert session.uidnext == 6


# -- against Dovecot -----------------------------------------------------------------------------


@pytest.fixture
def spec(dovecot_delivery: DeliveryDovecot, dovecot_imap: DeliveryMailbox, ca_file: Path) -> Spec:
    """A fresh user, reached with STARTTLS and the test CA."""
    return Spec(
        dovecot_delivery.host,
        dovecot_delivery.imap_port,
        TlsMode.STARTTLS,
        dovecot_imap.user,
        dovecot_imap.password,
        ca_file=ca_file,
    )


def stored(server: DeliveryDovecot, spec: Spec, mailbox: str = "INBOX") -> list[bytes]:
    return server.stored_messages(spec.username, mailbox)


def no_warning(text: str) -> None:
    raise AssertionError(f"unexpected warning: {text}")


def with_tls(spec: Spec, server: DeliveryDovecot, tls: TlsMode) -> Spec:
    port = server.imaps_port if tls == TlsMode.IMPLICIT else server.imap_port
    return Spec(
        spec.host,
        port,
        tls,
        spec.username,
        spec.password,
        ca_file=spec.ca_file,
        allow_plaintext=tls == TlsMode.NONE,
    )


@pytest.mark.dovecot
@pytest.mark.parametrize("tls", list(TlsMode))
def test_tricky_messages_read_back_byte_identical(
    dovecot_delivery: DeliveryDovecot, spec: Spec, tls: TlsMode
) -> None:
    spec = with_tls(spec, dovecot_delivery, tls)
    attachment = b"Subject: big\nContent-Type: application/octet-stream\n\n" + (
        b"".join(b"%07d abcdefghijklmnopqrstuvwxyz0123456789\n" % i for i in range(120_000))
    )
    assert len(attachment) > 5_000_000
    messages = {"m1": TRICKY, "m2": NO_MESSAGE_ID, "m3": attachment}
    with open_imap_target(spec, account="acct", timeout=10, warn=lambda _: None) as target:
        results = deliver(target, messages)
        validity = target.session.uidvalidity
    assert results == {
        "m1": Receipt(f"INBOX {validity} 1"),
        "m2": Receipt(f"INBOX {validity} 2"),
        "m3": Receipt(f"INBOX {validity} 3"),
    }
    assert stored(dovecot_delivery, spec) == list(messages.values())


@pytest.mark.dovecot
def test_recovery_finds_what_was_appended_and_only_that(
    dovecot_delivery: DeliveryDovecot, spec: Spec
) -> None:
    """A crash after the APPENDs, before the receipts were recorded: the next
    session finds each copy by its intent; a message never sent is not found."""
    twin = b"Subject: twin\n\nsame bytes, no Message-ID\n"
    with open_imap_target(spec, account="acct", timeout=10, warn=no_warning) as target:
        drafts = {n: draft_of(target, n, d) for n, d in [("a", TRICKY), ("t1", twin)]}
        drafts |= {n: draft_of(target, n, d) for n, d in [("t2", twin), ("lost", NO_MESSAGE_ID)]}
        intents = {n: target.intent(d) for n, d in drafts.items()}
        sent = target.commit([drafts["a"], drafts["t1"]])  # t2 and lost: crash before
    assert all(isinstance(r, Receipt) for r in sent)
    with open_imap_target(spec, account="acct", timeout=10, warn=no_warning) as target:
        pending = [Pending(n, intents[n]) for n in ("a", "t1", "t2", "lost")]
        held = target.recover([*pending, Pending("fresh", None)])
        validity = target.session.uidvalidity
    assert [h.asked for h in held] == ["a", "t1"]
    a, t1 = held
    assert (a.size, a.wire_size, a.receipt) == (len(TRICKY), len(to_wire(TRICKY)), sent[0].text)
    assert a.header_section == TRICKY[: TRICKY.index(b"\n\n") + 2]
    assert t1.receipt == f"INBOX {validity} 2"
    assert stored(dovecot_delivery, spec) == [TRICKY, twin]


@pytest.mark.dovecot
def test_a_missing_mailbox_is_created(dovecot_delivery: DeliveryDovecot, spec: Spec) -> None:
    spec = Spec(**{**spec.__dict__, "mailbox": "Migrated"})
    with open_imap_target(spec, account="acct", timeout=10, warn=no_warning) as target:
        results = deliver(target, {"m1": NO_MESSAGE_ID})
    assert isinstance(results["m1"], Receipt) and results["m1"].text.startswith("Migrated ")
    assert stored(dovecot_delivery, spec, "Migrated") == [NO_MESSAGE_ID]


@pytest.mark.dovecot
def test_over_quota_refuses_that_message_for_good(
    dovecot_delivery: DeliveryDovecot, spec: Spec
) -> None:
    box = dovecot_delivery.new_mailbox("quota", quota_bytes=2000)
    spec = Spec(**{**spec.__dict__, "username": box.user, "password": box.password})
    big = b"Subject: big\n\n" + b"z" * 5000 + b"\n"
    with open_imap_target(spec, account="acct", timeout=10, warn=no_warning) as target:
        results = deliver(target, {"big": big, "small": NO_MESSAGE_ID})
    refusal = results["big"]
    assert isinstance(refusal, Refusal) and not refusal.temporary
    assert refusal.text.startswith("NO [OVERQUOTA]")
    assert isinstance(results["small"], Receipt)
    assert stored(dovecot_delivery, spec) == [NO_MESSAGE_ID]


@pytest.mark.dovecot
@pytest.mark.parametrize("tls", [TlsMode.IMPLICIT, TlsMode.STARTTLS])
def test_a_certificate_not_trusted_is_refused(
    dovecot_delivery: DeliveryDovecot, spec: Spec, tls: TlsMode
) -> None:
    spec = Spec(**{**with_tls(spec, dovecot_delivery, tls).__dict__, "ca_file": None})
    with (
        pytest.raises(SecurityError, match="certificate not trusted") as caught,
        open_imap_target(spec, account="acct", timeout=10, warn=no_warning),
    ):
        pass
    assert spec.password not in str(caught.value)


@pytest.mark.dovecot
def test_no_password_in_clear_without_consent(
    dovecot_delivery: DeliveryDovecot, spec: Spec
) -> None:
    spec = Spec(
        **{**with_tls(spec, dovecot_delivery, TlsMode.NONE).__dict__, "allow_plaintext": False}
    )
    with (
        pytest.raises(SecurityError, match="without TLS"),
        open_imap_target(spec, account="acct", timeout=10, warn=lambda _: None),
    ):
        pass
    assert f"user={spec.username}" not in dovecot_delivery.log_tail(200)


@pytest.mark.dovecot
def test_a_wrong_password_is_one_line_without_it(
    dovecot_delivery: DeliveryDovecot, spec: Spec
) -> None:
    spec = Spec(**{**spec.__dict__, "password": "not-the-password-42"})
    with (
        pytest.raises(ImapAuthError, match=f"login as '{spec.username}' refused") as caught,
        open_imap_target(spec, account="acct", timeout=10, warn=no_warning),
    ):
        pass
    assert "not-the-password-42" not in str(caught.value)
    assert not caught.value.temporary


RSS_SCRIPT = """\
import os, resource, sys
from dataclasses import dataclass
from popsync.deliver.imap import open_imap_target
from popsync.options import TlsMode
from popsync.transport import make_ssl_context

@dataclass(frozen=True)
class Spec:
    host: str
    port: int
    username: str
    tls: TlsMode = TlsMode.NONE
    ca_file: None = None
    allow_plaintext: bool = True
    mailbox: str = "INBOX"

    def secret(self) -> str:
        return os.environ["TEST_IMAP_PASSWORD"]  # never in argv

def peak_mib() -> int:
    # This process's own peak (VmHWM): ru_maxrss would also count the parent's
    # from before exec, which in a full test run hides any growth below it.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak

host, port, user, size = sys.argv[1:5]
line = b"0123456789" * 7 + b"\\n"
with open_imap_target(Spec(host, int(port), user), account="a", timeout=60, warn=print) as target:
    draft = target.begin("big", b"big")
    draft.write(b"Subject: big\\n\\n")
    before = peak_mib()  # imports, login, one spooled chunk
    while draft.size < int(size):
        draft.write(line * 8192)
    target.end(draft)
    target.intent(draft)
    print(target.commit([draft])[0])
print(before, peak_mib())
"""


@pytest.mark.dovecot
@pytest.mark.slow
def test_a_200_mb_message_costs_little_memory(
    dovecot_delivery: DeliveryDovecot, spec: Spec
) -> None:
    size = 200 * 1024 * 1024
    port = str(dovecot_delivery.imap_port)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(RSS_SCRIPT),
            spec.host,
            port,
            spec.username,
            str(size),
        ],
        env={**os.environ, "TEST_IMAP_PASSWORD": spec.password},
        capture_output=True,
        check=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    receipt, peaks = out.stdout.decode().split("\n")[-3:-1]
    assert receipt.startswith("Receipt(text='INBOX ")
    before, after = map(int, peaks.split())
    assert after - before < 32, f"peak RSS {before} -> {after} MiB for a {size >> 20} MiB message"


# -- end to end: POP3 test server -> popsync sync -> Dovecot IMAP --------------------------------

# Through a POP3 server: dot-stuffed lines, "From " lines, 8-bit bytes, a
# 20,000-character line, no final line end, a 5 MB attachment, and enough
# plain messages for several batches.
E2E_TRICKY = [
    b"Subject: dots\r\nMessage-ID: <dots@x>\r\n\r\n.\r\n..two\r\n.three.\r\n",
    b"Subject: from\r\n\r\nFrom the start\r\n>From quoted\r\nFrom: x\r\n",
    b"Subject: 8bit\r\n\r\n\xe9\xff\x80\xc3\xa9 done\r\n",
    b"Subject: long\r\n\r\n" + b"L" * 20_000 + b"\r\n",
    b"Subject: no end\r\n\r\nno final newline",
    b"Subject: att\r\nContent-Type: application/octet-stream\r\n\r\n"
    + b"".join(b"%07d abcdefghijklmnopqrstuvwxyz0123456789\r\n" % i for i in range(120_000)),
]


def e2e_messages() -> list[bytes]:
    from popsync.testing.samples import generate_messages

    return E2E_TRICKY + list(generate_messages(34, 1500, seed=21))


def imap_config(tmp_path: Path, pop3_port: int, spec: Spec, **pop3: object) -> Path:
    from tests.helpers import write_config

    secret = tmp_path / "imap.pass"
    secret.write_text(spec.password + "\n")
    secret.chmod(0o600)
    imap = {
        "host": spec.host,
        "port": spec.port,
        "tls": str(spec.tls),
        "username": spec.username,
        "password_file": str(secret),
        "mailbox": spec.mailbox,
    }
    if spec.ca_file is not None:
        imap["ca_file"] = str(spec.ca_file)
    if spec.allow_plaintext:
        imap["allow_plaintext"] = True
    account = {"name": "mig", "port": pop3_port, "maildir": None, "imap": imap, **pop3}
    return write_config(tmp_path, [account])


def counted(messages: list[bytes]) -> dict[bytes, int]:
    from collections import Counter

    return dict(Counter(messages))


@pytest.mark.dovecot
def test_sync_into_imap_is_byte_exact(
    dovecot_delivery: DeliveryDovecot, spec: Spec, tmp_path: Path
) -> None:
    from popsync.testing.mailstore import MailStore
    from popsync.testing.server import POP3TestServer
    from tests.helpers import stored_form

    messages = e2e_messages()
    store = MailStore(messages)
    with POP3TestServer(store) as pop3:
        config = imap_config(tmp_path, pop3.port, spec, delete_after_days=0)
        first = run_sync(config)
        assert first.returncode == 0, first.stderr
        assert f" {len(messages)} fetched" in first.stdout
        assert len(store) == 0
    assert stored(dovecot_delivery, spec) == [stored_form(m) for m in messages]
    assert spec.password not in first.stdout + first.stderr


# Every step of an IMAP delivery, and a few in a later batch (BATCH is 16).
IMAP_CRASHES = [
    "after_begin_fetch",
    "mid_body",
    "after_intent",
    "imap_mid_append",
    "imap_after_append",
    "imap_after_append:20",
    "after_dir_fsync",
    "after_commit",
    "after_commit:2",
    "after_dele",
    "after_quit",
]


@pytest.mark.dovecot
@pytest.mark.crash
@pytest.mark.parametrize("failpoint", IMAP_CRASHES)
def test_sigkill_then_rerun_delivers_exactly_once(
    dovecot_delivery: DeliveryDovecot, spec: Spec, tmp_path: Path, failpoint: str
) -> None:
    """Killed at *failpoint*, then run again: every message is in the mailbox
    exactly once, and the POP3 server deleted only what the mailbox holds."""
    from popsync.testing.mailstore import MailStore
    from popsync.testing.server import POP3TestServer
    from tests.helpers import stored_form

    messages = e2e_messages()
    wanted = counted([stored_form(m) for m in messages])
    store = MailStore(messages)
    with POP3TestServer(store) as pop3:
        config = imap_config(tmp_path, pop3.port, spec, delete_after_days=0)
        crashed = run_sync(config, failpoint)
        assert crashed.returncode == -9, (crashed.returncode, crashed.stderr)
        pop3.wait_for_sessions(1, timeout=10)
        held = counted(stored(dovecot_delivery, spec))
        on_server = {stored_form(m.data) for m in store.messages()}
        assert all(n == 1 for n in held.values()), "a message was appended twice"
        assert all(form in on_server or form in held for form in wanted), "a message was lost"

        clean = run_sync(config)
        assert clean.returncode == 0, clean.stderr
        assert counted(stored(dovecot_delivery, spec)) == wanted
        assert len(store) == 0
        third = run_sync(config)
        assert third.returncode == 0 and " 0 fetched" in third.stdout


def test_without_uidplus_the_receipt_comes_from_a_search() -> None:
    """No APPENDUID: the new copy is found as recovery finds one (UID from the
    UIDNEXT noted, size, hash) and its UID becomes the receipt."""
    body = b"a\n\nb\n"  # 8 octets with CRLF
    session, transport = scripted_session(
        b"+ go\r\n",
        b"A1 OK done\r\n",
        b"* 6 EXISTS\r\nA2 OK\r\n",
        b"* SEARCH 3 7\r\nA3 OK\r\n",  # 3: "5:*" matching a lower UID is skipped
        b'* 6 FETCH (UID 7 RFC822.SIZE 8 INTERNALDATE "27-Nov-2026 17:00:00 +0000")\r\nA4 OK\r\n',
        b"* 6 FETCH (UID 7 BODY[]<0> {8}\r\n" + to_wire(body) + b")\r\nA5 OK\r\n",
    )
    results = deliver(ImapTarget(session, "INBOX"), {"m1": body})
    assert results == {"m1": Receipt("INBOX 9 7")}
    assert b"A3 UID SEARCH UID 5:* LARGER 7 SMALLER 9\r\n" in transport.writes
    assert session.uidnext == 8


@pytest.mark.timeout(10)
def test_a_server_that_never_finishes_a_reply_is_cut_off() -> None:
    """Untagged lines dribbled forever: the command ends at its timeout."""
    import socket
    import threading
    import time

    from popsync.transport import Transport

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def dribble() -> None:
        conn, _ = listener.accept()
        with conn:
            while not stop.is_set():
                try:
                    conn.sendall(b"* OK still here\r\n")
                except OSError:
                    return
                stop.wait(0.01)

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    transport = Transport.connect("127.0.0.1", listener.getsockname()[1], timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryError, match="timed out"):
            Wire(transport, "imap target test").command(b"NOOP")
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        transport.close()
        listener.close()
        thread.join(5)


@pytest.mark.dovecot
def test_sync_with_an_untrusted_imap_certificate_is_one_line_and_deletes_nothing(
    dovecot_delivery: DeliveryDovecot, spec: Spec, tmp_path: Path
) -> None:
    from popsync.testing.mailstore import MailStore
    from popsync.testing.server import POP3TestServer

    spec = Spec(**{**with_tls(spec, dovecot_delivery, TlsMode.IMPLICIT).__dict__, "ca_file": None})
    messages = e2e_messages()[:3]
    store = MailStore(messages)
    with POP3TestServer(store) as pop3:
        result = run_sync(imap_config(tmp_path, pop3.port, spec, delete_after_days=0))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "certificate not trusted" in line]
    assert len(errors) == 1 and "mig" in errors[0], result.stderr
    assert len(store) == len(messages)
    assert stored(dovecot_delivery, spec) == []


@pytest.mark.dovecot
def test_sync_over_quota_leaves_that_message_on_the_server(
    dovecot_delivery: DeliveryDovecot, tmp_path: Path, ca_file: Path
) -> None:
    from popsync.testing.mailstore import MailStore
    from popsync.testing.server import POP3TestServer
    from tests.helpers import stored_form

    box = dovecot_delivery.new_mailbox("quota", quota_bytes=20_000)
    spec = Spec(
        dovecot_delivery.host, dovecot_delivery.imaps_port, TlsMode.IMPLICIT, box.user, box.password
    )
    spec = Spec(**{**spec.__dict__, "ca_file": ca_file})
    small = [b"Subject: s%d\r\n\r\nsmall\r\n" % i for i in range(3)]
    big = b"Subject: big\r\n\r\n" + b"B" * 50_000 + b"\r\n"
    store = MailStore([small[0], big, *small[1:]])
    with POP3TestServer(store) as pop3:
        result = run_sync(imap_config(tmp_path, pop3.port, spec, delete_after_days=0))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "OVERQUOTA" in result.stdout + result.stderr
    assert [m.data for m in store.messages()] == [big]
    assert stored(dovecot_delivery, spec) == [stored_form(m) for m in small]
