"""The Dovecot fixture really is a POP3 server: checked with the stdlib ``poplib``.

These tests talk to the real Dovecot over real loopback sockets, plain, STLS and
implicit TLS, and check what it stores on disk.  They also check the harness's
own promises: loopback only, no processes left behind, clear start errors, and
the skip-or-fail policy when Dovecot is missing.
"""

from __future__ import annotations

import base64
import os
import poplib
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dovecot_fixtures import require_dovecot
from tests.helpers import wait_until
from tests.servers.dovecot import HOST, Dovecot, DovecotError, Mailbox

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


def test_listens_on_loopback_only(dovecot: Dovecot) -> None:
    ours = {dovecot.pop3_port, dovecot.pop3s_port}
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for row in f:
                local, state = row.split()[1], row.split()[3]
                address, port_hex = local.rsplit(":", 1)
                if state == "0A" and int(port_hex, 16) in ours:  # 0A: LISTEN
                    found.setdefault(int(port_hex, 16), set()).add(address)
    # 0100007F is 127.0.0.1 in /proc's little-endian hex.
    assert found == {port: {"0100007F"} for port in ours}


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
