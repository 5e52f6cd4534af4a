"""The Dovecot fixture really is a POP3 server: checked with the stdlib ``poplib``.

These tests talk to the real Dovecot over real loopback sockets, plain, STLS and
implicit TLS, and check what it stores on disk.  They also check the harness's
own promises: loopback only, no processes left behind, clear start errors, and
the skip-or-fail policy when Dovecot is missing.
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dovecot_fixtures import require_dovecot
from tests.helpers import wait_until
from tests.servers.dovecot import HOST, Dovecot, DovecotError, Mailbox
from tests.servers.dovecot_delivery import (
    LDA_EX_NOPERM,
    LDA_EX_NOUSER,
    LDA_EX_TEMPFAIL,
    DeliveryDovecot,
    DeliveryMailbox,
    reachable_workdir,
    remove_workdir,
    strip_lmtp_headers,
)

pytestmark = pytest.mark.dovecot

REPO = Path(__file__).resolve().parent.parent

#: Messages with the awkward parts a POP3 path must carry: dot-stuffing, 8-bit
#: bytes, a NUL, a long line, an empty body.
MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nhello\n",
    b"Subject: dots\n\n.leading dot\n..two dots\n.\nafter a lone dot\n",
    b"Subject: 8bit\nContent-Type: text/plain; charset=utf-8\n\ncaf\xc3\xa9 \xff\xfe\x00 end\n",
    b"Subject: long\n\n" + b"x" * 1500 + b"\n" + b"y" * 900 + b"\n",
    b"Subject: empty body\n\n",
]


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def login(mailbox: Mailbox) -> poplib.POP3:
    client = poplib.POP3(mailbox.host, mailbox.pop3_port, timeout=10)
    client.user(mailbox.user)
    client.pass_(mailbox.password)
    return client


def retr_bytes(client: poplib.POP3, which: int) -> bytes:
    """RETR as wire bytes after dot-unstuffing (poplib strips the CRLFs)."""
    _, lines, _ = client.retr(which)
    return b"".join(line + b"\r\n" for line in lines)


def uidls(client: poplib.POP3) -> list[bytes]:
    _, lines, _ = client.uidl()
    return [line.split(b" ", 1)[1] for line in lines]


def tls_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def wait_for_log(server: Dovecot, needle: str, count: int, timeout: float = 10.0) -> None:
    """Wait until *needle* occurs *count* times in Dovecot's log."""
    wait_until(
        lambda: server.log_file.read_text("utf-8", "replace").count(needle) >= count,
        timeout=timeout,
        what=lambda: f"{needle!r} in the log:\n{server.log_tail()}",
    )


def group_members(pgid: int) -> list[int]:
    """Pids of live processes in process group *pgid* (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    wait_until(
        lambda: not group_members(pgid),
        timeout=timeout,
        what=lambda: f"process group {pgid} to end: {group_members(pgid)} left",
    )


# --------------------------------------------------------------- ways in


def test_capa_offers_what_popsync_needs(dovecot_mailbox: Mailbox) -> None:
    client = poplib.POP3(dovecot_mailbox.host, dovecot_mailbox.pop3_port, timeout=10)
    try:
        assert client.getwelcome().startswith(b"+OK")
        capa = client.capa()
    finally:
        client.quit()
    for name in ("PIPELINING", "UIDL", "TOP", "USER", "STLS", "RESP-CODES"):
        assert name in capa, capa
    assert {"PLAIN", "LOGIN"} <= set(capa["SASL"])


def test_plain_user_pass(dovecot_mailbox: Mailbox) -> None:
    dovecot_mailbox.add_message(MESSAGES[0])
    client = login(dovecot_mailbox)
    try:
        assert client.stat() == (1, len(crlf(MESSAGES[0])))
    finally:
        client.quit()


def test_wrong_password_is_refused_with_auth_code(dovecot_mailbox: Mailbox) -> None:
    client = poplib.POP3(dovecot_mailbox.host, dovecot_mailbox.pop3_port, timeout=10)
    try:
        client.user(dovecot_mailbox.user)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_(dovecot_mailbox.password + "x")
    finally:
        client.close()


def test_sasl_plain(dovecot_mailbox: Mailbox) -> None:
    token = base64.b64encode(f"\0{dovecot_mailbox.user}\0{dovecot_mailbox.password}".encode())
    client = poplib.POP3(dovecot_mailbox.host, dovecot_mailbox.pop3_port, timeout=10)
    try:
        # poplib has no AUTH command; its private one-line command helper will do.
        reply = client._shortcmd("AUTH PLAIN " + token.decode())  # type: ignore[attr-defined]
        assert reply.startswith(b"+OK")
        assert client.stat() == (0, 0)
    finally:
        client.quit()


def test_stls_then_login(dovecot_mailbox: Mailbox, ca_file: Path) -> None:
    client = poplib.POP3(dovecot_mailbox.host, dovecot_mailbox.pop3_port, timeout=10)
    try:
        client.stls(context=tls_context(ca_file))
        assert isinstance(client.sock, ssl.SSLSocket)
        assert "STLS" not in client.capa()  # RFC 2595 §4: not offered again
        client.user(dovecot_mailbox.user)
        client.pass_(dovecot_mailbox.password)
        assert client.stat() == (0, 0)
    finally:
        client.quit()


def test_implicit_tls(dovecot_mailbox: Mailbox, ca_file: Path) -> None:
    dovecot_mailbox.add_message(MESSAGES[1])
    client = poplib.POP3_SSL(
        dovecot_mailbox.host, dovecot_mailbox.pop3s_port, context=tls_context(ca_file), timeout=10
    )
    try:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.user(dovecot_mailbox.user)
        client.pass_(dovecot_mailbox.password)
        assert retr_bytes(client, 1) == crlf(MESSAGES[1])
    finally:
        client.quit()


def test_tls_certificate_is_really_checked(dovecot_mailbox: Mailbox) -> None:
    # The system trust store does not know the test CA, so verification must fail.
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(
            dovecot_mailbox.host,
            dovecot_mailbox.pop3s_port,
            context=ssl.create_default_context(),
            timeout=10,
        )


def listening_addresses(ports: set[int]) -> dict[int, set[str]]:
    """Port -> the local addresses listening on it, in /proc's hex
    (0100007F is 127.0.0.1, little-endian)."""
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for row in f:
                local, state = row.split()[1], row.split()[3]
                address, port_hex = local.rsplit(":", 1)
                if state == "0A" and int(port_hex, 16) in ports:  # 0A: LISTEN
                    found.setdefault(int(port_hex, 16), set()).add(address)
    return found


def test_listens_on_loopback_only(dovecot: Dovecot) -> None:
    ours = {dovecot.pop3_port, dovecot.pop3s_port}
    assert listening_addresses(ours) == {port: {"0100007F"} for port in ours}


# ------------------------------------------------------------- mail data


def test_uidl_lists_added_messages_and_retr_is_byte_exact(dovecot_mailbox: Mailbox) -> None:
    paths = dovecot_mailbox.add_messages(MESSAGES)
    assert all(path.parent.name == "new" for path in paths)
    client = login(dovecot_mailbox)
    try:
        ids = uidls(client)
        assert len(ids) == len(set(ids)) == len(MESSAGES)
        _, sizes, _ = client.list()
        assert [int(line.split()[1]) for line in sizes] == [len(crlf(m)) for m in MESSAGES]
        for number, message in enumerate(MESSAGES, start=1):
            assert retr_bytes(client, number) == crlf(message)
        _, top, _ = client.top(1, 0)
        assert top == [b"From: a@example.org", b"Subject: one", b""]
    finally:
        client.quit()
    assert dovecot_mailbox.stored_messages() == MESSAGES


def test_uidl_is_stable_across_sessions(dovecot_mailbox: Mailbox) -> None:
    dovecot_mailbox.add_messages(MESSAGES[:3])
    client = login(dovecot_mailbox)
    first = uidls(client)
    client.quit()
    dovecot_mailbox.add_message(MESSAGES[3])
    client = login(dovecot_mailbox)
    try:
        second = uidls(client)
    finally:
        client.quit()
    assert second[:3] == first
    assert second[3] not in first


def test_bulk_delivery_keeps_order(dovecot_mailbox: Mailbox) -> None:
    bodies = [b"Subject: bulk %d\n\nbody %d\n" % (i, i) for i in range(2000)]
    dovecot_mailbox.add_messages(bodies)
    client = login(dovecot_mailbox)
    try:
        assert client.stat()[0] == len(bodies)
        assert len(set(uidls(client))) == len(bodies)
        for number in (1, 2, 999, 1000, 2000):
            assert retr_bytes(client, number) == crlf(bodies[number - 1])
    finally:
        client.quit()
    assert dovecot_mailbox.stored_messages() == bodies


def test_dele_then_quit_removes(dovecot_mailbox: Mailbox) -> None:
    dovecot_mailbox.add_messages(MESSAGES[:3])
    client = login(dovecot_mailbox)
    before = uidls(client)
    client.dele(2)
    client.quit()  # RFC 1939 §6: removal happens in UPDATE, i.e. at QUIT
    assert dovecot_mailbox.stored_messages() == [MESSAGES[0], MESSAGES[2]]
    client = login(dovecot_mailbox)
    try:
        assert uidls(client) == [before[0], before[2]]
    finally:
        client.quit()


def test_dropped_connection_removes_nothing(dovecot: Dovecot, dovecot_mailbox: Mailbox) -> None:
    dovecot_mailbox.add_messages(MESSAGES[:3])
    client = login(dovecot_mailbox)
    before = uidls(client)
    client.dele(1)
    client.dele(2)
    client.close()  # no QUIT: the session must not enter UPDATE (RFC 1939 §6)
    # Wait until Dovecot has finished that session before looking.
    wait_for_log(dovecot, f"pop3({dovecot_mailbox.user})", 1)
    wait_for_log(dovecot, "Disconnected", 1)
    assert dovecot_mailbox.stored_messages() == MESSAGES[:3]
    client = login(dovecot_mailbox)
    try:
        assert uidls(client) == before
    finally:
        client.quit()


def test_clear_empties_and_uids_are_not_reused(dovecot_mailbox: Mailbox) -> None:
    dovecot_mailbox.add_messages(MESSAGES[:2])
    client = login(dovecot_mailbox)
    old = uidls(client)
    client.quit()
    dovecot_mailbox.clear()
    assert dovecot_mailbox.stored_messages() == []
    client = login(dovecot_mailbox)
    assert client.stat() == (0, 0)
    client.quit()
    dovecot_mailbox.add_messages(MESSAGES[2:4])
    client = login(dovecot_mailbox)
    try:
        assert not set(uidls(client)) & set(old)
    finally:
        client.quit()


def test_mailboxes_are_isolated(dovecot: Dovecot, dovecot_mailbox: Mailbox) -> None:
    other = dovecot.new_mailbox("iso")
    other.add_message(MESSAGES[0])
    client = login(dovecot_mailbox)
    try:
        assert client.stat() == (0, 0)
    finally:
        client.quit()
    assert other.stored_messages() == [MESSAGES[0]]


# ------------------------------------------------------- harness promises


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[Dovecot]:
    require_dovecot()
    with Dovecot(tmp_path / "dv", users={"alice": "secret"}) as server:
        yield server


def test_server_without_certificate_has_no_tls(plain_server: Dovecot) -> None:
    client = poplib.POP3(plain_server.host, plain_server.pop3_port, timeout=10)
    try:
        assert "STLS" not in client.capa()
        client.user("alice")
        client.pass_("secret")
    finally:
        client.quit()
    with pytest.raises(DovecotError, match="no pop3s"):
        _ = plain_server.pop3s_port


def test_stop_leaves_no_process(plain_server: Dovecot) -> None:
    assert plain_server._proc is not None
    pgid = plain_server._proc.pid
    client = login(Mailbox(plain_server, "alice"))  # a live pop3 child too
    assert len(group_members(pgid)) >= 3  # master, its helpers, login, pop3
    plain_server.stop()
    assert group_members(pgid) == []
    client.close()
    with pytest.raises(OSError):
        poplib.POP3(HOST, plain_server.pop3_port, timeout=2)
    plain_server.stop()  # idempotent


def test_context_manager_stops_on_error(tmp_path: Path) -> None:
    require_dovecot()
    server = Dovecot(tmp_path / "dv")
    with pytest.raises(ZeroDivisionError), server:
        assert server._proc is not None
        pgid = server._proc.pid
        _ = 1 / 0
    assert group_members(pgid) == []


def test_killed_owner_leaves_no_process(tmp_path: Path) -> None:
    require_dovecot()
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tests.servers.dovecot import Dovecot\n"
        "d = Dovecot(Path(sys.argv[1]))\n"
        "d.start()\n"
        "print(d._proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "dv")],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert owner.stdout is not None
        pgid = int(owner.stdout.readline())
        assert group_members(pgid)
        owner.send_signal(signal.SIGKILL)  # no cleanup code can run
        owner.wait(timeout=10)
        wait_group_gone(pgid)
    finally:
        owner.kill()
        owner.wait()


def test_start_failure_is_reported_with_the_log(tmp_path: Path) -> None:
    require_dovecot()
    missing = tmp_path / "missing-cert.pem"
    server = Dovecot(tmp_path / "dv", cert_file=missing, key_file=missing, start_timeout=5)
    with pytest.raises(DovecotError, match=r"missing-cert\.pem") as info:
        server.start()
    assert "exited" in str(info.value)
    assert not server.running


def test_bad_user_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DovecotError):
        Dovecot(tmp_path / "dv", users={"../evil": "x"})
    with pytest.raises(DovecotError):
        Dovecot(tmp_path / "dv", users={"bob": "pa:ss"})


def test_missing_binary_skips_locally_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    absent = tmp_path / "no-dovecot"
    ok, reason = Dovecot.available(absent)
    assert not ok
    assert "dovecot-pop3d" in reason
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not available"):
        require_dovecot(absent)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_dovecot(absent)


# ------------------------------------------------------------------- LMTP
#
# The delivery Dovecot (tests/servers/dovecot_delivery.py) takes mail in over
# LMTP, IMAP and dovecot-lda; these tests check what its docstring promises.

#: A message with the parts a delivery must carry unchanged: dot-leading lines,
#: a "From " line in the body, 8-bit bytes, a line longer than SMTP's 1000.
DELIVERED = (
    b"From: a@example.org\nSubject: carried\n\n"
    b".leading dot\n..two dots\n.\nFrom the body\n"
    b"caf\xc3\xa9 \xff\n" + b"L" * 20_000 + b"\nend\n"
)


def lmtp_transaction(address: str, rcpts: list[str], data: bytes) -> list[bytes]:
    """One LMTP transaction (RFC 2033) from *s@example.org*: every reply line, in order.

    *data* has LF line ends; it is sent dot-stuffed with CRLFs.  After DATA
    there is one reply per accepted recipient (RFC 2033 §4.2).
    """
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(address.removeprefix("unix:"))
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=10)
    replies: list[bytes] = []
    with sock, sock.makefile("rwb") as conn:

        def reply(command: bytes | None) -> bytes:
            if command is not None:
                conn.write(command + b"\r\n")
                conn.flush()
            while (line := conn.readline()).startswith((b"220-", b"250-")):
                pass
            replies.append(line.rstrip(b"\r\n"))
            return line

        reply(None)
        reply(b"LHLO client.example.org")
        reply(b"MAIL FROM:<s@example.org>")
        accepted = sum(reply(f"RCPT TO:<{r}>".encode()).startswith(b"250") for r in rcpts)
        if accepted and reply(b"DATA").startswith(b"354"):
            lines = data.removesuffix(b"\n").split(b"\n")
            conn.write(b"".join(b"." * line.startswith(b".") + line + b"\r\n" for line in lines))
            conn.write(b".\r\n")
            conn.flush()
            for _ in range(accepted):
                replies.append(conn.readline().rstrip(b"\r\n"))
        reply(b"QUIT")
    return replies


def test_lmtp_delivers_byte_exactly_over_the_unix_socket(dovecot_lmtp: DeliveryMailbox) -> None:
    assert dovecot_lmtp.lmtp_address == f"unix:{dovecot_lmtp.server.lmtp_socket}"
    replies = lmtp_transaction(dovecot_lmtp.lmtp_address, [dovecot_lmtp.recipient], DELIVERED)
    assert replies[0].startswith(b"220 ")
    assert replies[-2].startswith(b"250 2.0.0 <%s> " % dovecot_lmtp.recipient.encode())
    assert replies[-2].endswith(b" Saved")
    # Stored with LF line ends, after the one field Dovecot always prepends.
    assert dovecot_lmtp.stored_messages() == [b"Return-Path: <s@example.org>\n" + DELIVERED]
    assert dovecot_lmtp.lmtp_messages() == [DELIVERED]


def test_lmtp_over_tcp_and_to_a_bare_user_name(dovecot_lmtp: DeliveryMailbox) -> None:
    host, port = dovecot_lmtp.lmtp_tcp_address.rsplit(":", 1)
    assert host == HOST and int(port) > 0
    first = b"Subject: one\n\nbody\n"
    second = b"Return-Path: <own@example.org>\nSubject: two\n\nbody\n"
    over_tcp = lmtp_transaction(dovecot_lmtp.lmtp_tcp_address, [dovecot_lmtp.user], first)
    assert over_tcp[-2].startswith(b"250 2.0.0 <%s> " % dovecot_lmtp.user.encode())
    over_unix = lmtp_transaction(dovecot_lmtp.lmtp_address, [dovecot_lmtp.recipient], second)
    assert over_unix[-2].startswith(b"250 2.0.0 ")
    # The message's own Return-Path is kept, below the one Dovecot adds.
    assert dovecot_lmtp.lmtp_messages() == [first, second]


def test_lmtp_refuses_unknown_users_and_full_mailboxes(
    dovecot_delivery: DeliveryDovecot, dovecot_lmtp: DeliveryMailbox
) -> None:
    full = dovecot_delivery.new_mailbox("full", quota_bytes=10)
    busy = dovecot_delivery.new_mailbox("busy", quota_bytes=10, quota_tempfail=True)
    rcpts = [dovecot_lmtp.recipient, "ghost@example.org", full.recipient, busy.recipient]
    replies = lmtp_transaction(dovecot_lmtp.lmtp_address, rcpts, DELIVERED)
    assert replies[4] == b"550 5.1.1 <ghost@example.org> User doesn't exist: ghost@example.org"
    after_data = replies[-4:-1]
    assert after_data[0].startswith(b"250 2.0.0 <%s>" % dovecot_lmtp.recipient.encode())
    assert after_data[1] == (
        b"552 5.2.2 <%s> Quota exceeded (mailbox for user is full)" % full.recipient.encode()
    )
    assert after_data[2] == (
        b"452 4.2.2 <%s> Quota exceeded (mailbox for user is full)" % busy.recipient.encode()
    )
    assert dovecot_lmtp.lmtp_messages() == [DELIVERED]
    assert full.stored_messages() == busy.stored_messages() == []


def test_strip_lmtp_headers_removes_only_what_lmtp_added() -> None:
    own = b"Return-Path: <own@x>\nSubject: s\n\nb\n"
    assert strip_lmtp_headers(b"Return-Path: <s@x>\n" + own) == own
    with pytest.raises(DovecotError, match="Return-Path"):
        strip_lmtp_headers(b"Subject: s\n\nb\n")
    with pytest.raises(DovecotError, match="Received"):
        strip_lmtp_headers(b"Return-Path: <s@x>\n" + own, trace_headers=True)


@pytest.fixture
def private_delivery(tmp_path: Path) -> Iterator[DeliveryDovecot]:
    """A delivery Dovecot of the test's own, with trace headers, no TLS."""
    require_dovecot(delivery=True)
    workdir = reachable_workdir() if os.geteuid() == 0 else tmp_path / "dv"
    try:
        with DeliveryDovecot(workdir, users={"alice": "secret"}, trace_headers=True) as server:
            yield server
    finally:
        if os.geteuid() == 0:
            remove_workdir(workdir)


def test_lmtp_trace_headers_as_production_dovecot_adds_them(
    private_delivery: DeliveryDovecot,
) -> None:
    alice = DeliveryMailbox(private_delivery, "alice")
    bob = private_delivery.new_mailbox("bob")
    lmtp_transaction(private_delivery.lmtp_address, ["alice@example.org"], DELIVERED)
    lmtp_transaction(private_delivery.lmtp_address, ["alice", bob.user], DELIVERED)
    single, double = alice.stored_messages()
    assert single.startswith(
        b"Return-Path: <s@example.org>\nDelivered-To: alice@example.org\n"
        b"Received: from client.example.org\n\tby "
    )
    assert b"\n\tfor <alice@example.org>; " in single.split(b"\nFrom: ", 1)[0]
    # With two recipients there is no Delivered-To (it would disclose the other).
    assert double.startswith(b"Return-Path: <s@example.org>\nReceived: from client.example.org\n")
    assert alice.lmtp_messages() == [DELIVERED, DELIVERED]
    assert bob.lmtp_messages() == [DELIVERED]


# ------------------------------------------------------------------- IMAP


def imap_ok(reply: tuple[str, list[Any]]) -> list[bytes]:
    status, data = reply
    assert status == "OK", reply
    return [item for item in data if isinstance(item, bytes)]


def test_imap_capabilities(dovecot_imap: DeliveryMailbox) -> None:
    client = imaplib.IMAP4(dovecot_imap.host, dovecot_imap.imap_port, timeout=10)
    try:
        before = set(client.capabilities)
        assert {"IMAP4REV1", "STARTTLS", "LITERAL+", "SASL-IR", "AUTH=PLAIN"} <= before
        assert "LOGINDISABLED" not in before  # plaintext LOGIN is allowed on purpose
        client.login(dovecot_imap.user, dovecot_imap.password)
        after = set(imap_ok(client.capability())[0].decode().upper().split())
    finally:
        client.logout()
    assert {"UIDPLUS", "MULTIAPPEND", "QUOTA", "NAMESPACE", "MOVE"} <= after
    assert "LITERAL-" not in after


def test_imap_append_is_byte_exact_and_searchable(dovecot_imap: DeliveryMailbox) -> None:
    no_newline = b"Subject: tail\n\nno final newline"
    client = dovecot_imap.imap_login()
    try:
        uids = []
        for data in (DELIVERED, no_newline):
            # imaplib sends the literal with CRLF line ends, as IMAP requires.
            (line,) = imap_ok(client.append("INBOX", None, None, data))
            match = re.match(rb"\[APPENDUID (\d+) (\d+)\]", line)
            assert match, line
            uids.append(match.group(2))
        client.select("INBOX", readonly=True)
        assert imap_ok(client.uid("SEARCH", "HEADER", "Subject", "carried")) == [uids[0]]
        bodies = [fetch_body(client, uid) for uid in uids]
    finally:
        client.logout()
    assert bodies == [crlf(DELIVERED), crlf(no_newline)]
    assert dovecot_imap.stored_messages() == [DELIVERED, no_newline]


def fetch_body(client: imaplib.IMAP4, uid: bytes) -> bytes:
    """BODY[] of the message with *uid* in the selected mailbox (wire form: CRLF)."""
    status, data = client.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
    assert status == "OK" and isinstance(data[0], tuple), data
    body = data[0][1]
    assert isinstance(body, bytes), data
    return body


def test_imap_implicit_tls_and_starttls(dovecot_imap: DeliveryMailbox, ca_file: Path) -> None:
    client = dovecot_imap.imap_login(tls_context(ca_file))
    try:
        assert isinstance(client.sock, ssl.SSLSocket)
        imap_ok(client.append("INBOX", None, None, DELIVERED))
    finally:
        client.logout()
    client = imaplib.IMAP4(dovecot_imap.host, dovecot_imap.imap_port, timeout=10)
    try:
        imap_ok(client.starttls(tls_context(ca_file)))
        assert isinstance(client.sock, ssl.SSLSocket)
        client.login(dovecot_imap.user, dovecot_imap.password)
    finally:
        client.logout()
    with pytest.raises(ssl.SSLCertVerificationError):
        dovecot_imap.imap_login(ssl.create_default_context())  # the test CA is not trusted
    assert dovecot_imap.stored_messages() == [DELIVERED]


def test_imap_append_to_a_missing_mailbox_asks_to_create_it(dovecot_imap: DeliveryMailbox) -> None:
    client = dovecot_imap.imap_login()
    try:
        status, data = client.append("Archive", None, None, DELIVERED)
        assert status == "NO"
        assert data[0].startswith(b"[TRYCREATE] ")
        dovecot_imap.create_folder("Archive")
        imap_ok(client.append("Archive", None, None, DELIVERED))
    finally:
        client.logout()
    assert dovecot_imap.stored_messages("Archive") == [DELIVERED]
    assert dovecot_imap.stored_messages() == []


def test_imap_append_over_quota(dovecot_delivery: DeliveryDovecot) -> None:
    full = dovecot_delivery.new_mailbox("full", quota_bytes=10)
    client = full.imap_login()
    try:
        status, data = client.append("INBOX", None, None, DELIVERED)
    finally:
        client.logout()
    assert status == "NO"
    assert data[0].startswith(b"[OVERQUOTA] Quota exceeded (mailbox for user is full)")
    assert full.stored_messages() == []


def test_delivery_server_listens_on_loopback_only(dovecot_delivery: DeliveryDovecot) -> None:
    ours = {
        dovecot_delivery.pop3_port,
        dovecot_delivery.pop3s_port,
        dovecot_delivery.imap_port,
        dovecot_delivery.imaps_port,
        int(dovecot_delivery.lmtp_tcp_address.rsplit(":", 1)[1]),
    }
    assert listening_addresses(ours) == {port: {"0100007F"} for port in ours}


# -------------------------------------------------------------- dovecot-lda


def run_lda(argv: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=data, capture_output=True, timeout=30, check=False)


def test_lda_delivers_byte_exactly(dovecot_lda: DeliveryMailbox) -> None:
    no_newline = b"Subject: tail\n\nno final newline"
    crlf_input = b"Subject: crlf\r\n\r\nline\r\n"
    for data in (DELIVERED, no_newline, crlf_input):
        done = run_lda(dovecot_lda.lda_command, data)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert dovecot_lda.stored_messages() == [DELIVERED, no_newline, b"Subject: crlf\n\nline\n"]
    assert shlex.split(dovecot_lda.lda_command_line) == dovecot_lda.lda_command


def test_lda_drops_a_leading_from_line_and_adds_no_header(dovecot_lda: DeliveryMailbox) -> None:
    argv = dovecot_lda.server.lda_command(dovecot_lda.user, sender="s@example.org")
    done = run_lda(argv, b"From s@example.org  Mon Jan  1 00:00:00 2024\n" + DELIVERED)
    assert done.returncode == 0, done.stderr
    assert dovecot_lda.stored_messages() == [DELIVERED]


def test_lda_exit_statuses(dovecot_delivery: DeliveryDovecot) -> None:
    full = dovecot_delivery.new_mailbox("full", quota_bytes=10)
    busy = dovecot_delivery.new_mailbox("busy", quota_bytes=10, quota_tempfail=True)
    over = b"Quota exceeded (mailbox for user is full)\n"
    done = run_lda(full.lda_command, DELIVERED)
    assert (done.returncode, done.stderr) == (LDA_EX_NOPERM, over)
    done = run_lda(busy.lda_command, DELIVERED)
    assert (done.returncode, done.stderr) == (LDA_EX_TEMPFAIL, over)
    done = run_lda(dovecot_delivery.lda_command("ghost"), DELIVERED)
    assert (done.returncode, done.stderr) == (LDA_EX_NOUSER, b"")
    assert full.stored_messages() == busy.stored_messages() == []


# -------------------------------------------------------- delivery harness


def test_delivery_server_stop_leaves_no_process(private_delivery: DeliveryDovecot) -> None:
    assert private_delivery._proc is not None
    pgid = private_delivery._proc.pid
    lmtp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lmtp.connect(str(private_delivery.lmtp_socket))  # a live lmtp child
    imap = private_delivery.imap_login("alice")  # and a live imap child
    assert len(group_members(pgid)) >= 4
    private_delivery.stop()
    assert group_members(pgid) == []
    lmtp.close()
    imap.shutdown()
    with pytest.raises(OSError):
        socket.create_connection((HOST, private_delivery.imap_port), timeout=2)


def test_delivery_server_as_root_needs_a_reachable_workdir(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands mail to another account")
    # pytest's temporary root is private (0700), so nobody cannot enter it.
    with pytest.raises(DovecotError, match="not searchable by others"):
        DeliveryDovecot(tmp_path / "dv")


def test_bad_quotas_and_userdb_fields_are_refused(tmp_path: Path) -> None:
    workdir = reachable_workdir()
    try:
        server = DeliveryDovecot(workdir, users={})
        with pytest.raises(DovecotError, match="at least 1"):
            server.add_user("bob", "pw", quota_bytes=0)
        with pytest.raises(DovecotError, match="userdb field"):
            server.add_user("bob", "pw", userdb_fields={"quota_rule": "a b"})
    finally:
        remove_workdir(workdir)
