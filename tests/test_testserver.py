"""Tests of the scriptable POP3 test server (popsync.testing.server).

The server is driven the way a client would drive it: through CPython's
``poplib`` (always with a verifying TLS context) and through a raw socket
client that sends exact bytes and reads exact bytes back.  Expected wire
forms are written out by hand, never produced by the server's own helpers.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import poplib
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popsync.testing.mailstore import top_of
from popsync.testing.samples import generate_messages, sample_messages
from popsync.testing.server import (
    Faults,
    MailStore,
    Phase,
    POP3TestServer,
    SessionState,
    to_crlf,
    to_wire,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(15)

MSG_A = b"From: a@example.org\nSubject: one\n\nfirst body\n"
MSG_B = b"From: b@example.org\nSubject: two\n\nsecond body\nmore\n"
MSG_C = b"From: c@example.org\nSubject: three\n\nthird\n"


class Raw:
    """A minimal line client on a real socket, for exact bytes in and out."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0) -> None:
        self.sock: socket.socket = socket.create_connection(address, timeout=timeout)
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def line(self) -> bytes:
        """One line including its CRLF; b'' at EOF."""
        while b"\n" not in self.buf:
            if not self._fill():
                rest, self.buf = self.buf, b""
                return rest
        head, _, self.buf = self.buf.partition(b"\n")
        return head + b"\n"

    def multi(self) -> list[bytes]:
        """The raw lines of a multi-line body, up to and excluding the '.' line."""
        lines = []
        while (ln := self.line()) != b".\r\n":
            assert ln, "EOF inside a multi-line response"
            lines.append(ln)
        return lines

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                break
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def until_eof(self, cap: int = 1 << 24) -> bytes:
        while len(self.buf) < cap and self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, command: bytes) -> bytes:
        self.send(command + b"\r\n")
        return self.line()

    def login(self, user: bytes = b"user", password: bytes = b"pass") -> None:
        assert self.cmd(b"USER " + user).startswith(b"+OK")
        assert self.cmd(b"PASS " + password).startswith(b"+OK")

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buf
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def close(self) -> None:
        self.sock.close()


def connect(srv: POP3TestServer) -> Raw:
    raw = Raw(srv.address)
    greeting = raw.line()
    assert greeting.startswith(b"+OK ")
    return raw


@pytest.fixture
def client_ctx(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


@pytest.fixture
def store() -> MailStore:
    s = MailStore()
    s.add(MSG_A, b"uid-a")
    s.add(MSG_B, b"uid-b")
    s.add(MSG_C, b"uid-c")
    return s


@pytest.fixture
def srv(store: MailStore) -> Iterator[POP3TestServer]:
    with POP3TestServer(store) as server:
        yield server


def crlf_len(data: bytes) -> int:
    """RFC 1939 §11 size, computed independently of the server's helpers."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return sum(len(ln.removesuffix(b"\r")) + 2 for ln in lines)


# -- login paths --------------------------------------------------------------


def test_user_pass_login_and_listings(srv: POP3TestServer, store: MailStore) -> None:
    client = poplib.POP3(srv.host, srv.port, timeout=5)
    assert client.user("user").startswith(b"+OK")
    assert client.pass_("pass").startswith(b"+OK")
    sizes = [crlf_len(m) for m in (MSG_A, MSG_B, MSG_C)]
    assert client.stat() == (3, sum(sizes))
    assert client.list()[1] == [b"%d %d" % (i + 1, s) for i, s in enumerate(sizes)]
    # typeshed gives list() one return type; with a message number it is the +OK line.
    assert client.list(2) == b"+OK 2 %d" % sizes[1]  # type: ignore[comparison-overlap]
    assert client.uidl()[1] == [b"1 uid-a", b"2 uid-b", b"3 uid-c"]
    assert client.uidl(3) == b"+OK 3 uid-c"
    assert client.noop() == b"+OK"
    client.quit()
    record = srv.wait_for_sessions(1)[0]
    assert record.authenticated and record.quit_received
    assert record.sent_in_clear(b"PASS pass")
    assert record.credentials_in_clear
    assert record.deleted == [] and len(store) == 3


def test_wrong_password_gets_auth_code_and_stays_in_authorization(srv: POP3TestServer) -> None:
    raw = connect(srv)
    assert raw.cmd(b"USER user") == b"+OK send PASS\r\n"
    assert raw.cmd(b"PASS nope") == b"-ERR [AUTH] invalid credentials\r\n"
    assert raw.cmd(b"STAT").startswith(b"-ERR")
    assert raw.cmd(b"PASS pass").startswith(b"-ERR")  # USER must come again
    raw.login()
    assert raw.cmd(b"STAT").startswith(b"+OK 3 ")
    raw.close()


def test_password_may_contain_spaces(store: MailStore) -> None:
    with POP3TestServer(store, password="two words ") as server:
        raw = connect(server)
        raw.login(password=b"two words ")
        raw.close()


def test_auth_resp_code_switch_removes_auth_code(store: MailStore) -> None:
    with POP3TestServer(store, auth_resp_code=False) as server:
        raw = connect(server)
        raw.cmd(b"USER user")
        assert raw.cmd(b"PASS bad") == b"-ERR invalid credentials\r\n"
        assert b"AUTH-RESP-CODE" not in b"".join([raw.cmd(b"CAPA"), *raw.multi()])
        raw.close()


def test_apop_login(srv: POP3TestServer) -> None:
    client = poplib.POP3(srv.host, srv.port, timeout=5)
    assert re.search(rb"<[^<>@]+@[^<>]+>$", client.getwelcome())
    assert client.apop("user", "pass").startswith(b"+OK")
    assert client.stat()[0] == 3
    client.quit()


def test_apop_wrong_digest_and_disabled(store: MailStore) -> None:
    with POP3TestServer(store) as server:
        raw = Raw(server.address)
        banner = re.search(rb"<.*>", raw.line())
        assert banner is not None
        bad = hashlib.md5(banner.group(0) + b"wrong").hexdigest().encode()
        assert raw.cmd(b"APOP user " + bad).startswith(b"-ERR [AUTH]")
        good = hashlib.md5(banner.group(0) + b"pass").hexdigest().encode()
        assert raw.cmd(b"APOP user " + good).startswith(b"+OK")
        raw.close()
    with POP3TestServer(store, apop=False) as server:
        raw = Raw(server.address)
        assert b"<" not in raw.line()
        assert raw.cmd(b"APOP user 0123").startswith(b"-ERR")
        raw.close()


def plain(user: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    return base64.b64encode(authzid + b"\0" + user + b"\0" + password)


def test_auth_plain_with_initial_response(srv: POP3TestServer) -> None:
    raw = connect(srv)
    assert raw.cmd(b"AUTH PLAIN " + plain(b"user", b"bad")).startswith(b"-ERR [AUTH]")
    assert raw.cmd(b"AUTH PLAIN " + plain(b"user", b"pass", b"user")).startswith(b"+OK")
    assert raw.cmd(b"STAT").startswith(b"+OK 3 ")
    raw.close()


def test_auth_plain_with_continuation_and_cancel(srv: POP3TestServer) -> None:
    raw = connect(srv)
    assert raw.cmd(b"AUTH PLAIN") == b"+ \r\n"
    assert raw.cmd(b"*").startswith(b"-ERR")
    assert raw.cmd(b"AUTH PLAIN") == b"+ \r\n"
    assert raw.cmd(b"not base64!").startswith(b"-ERR")
    assert raw.cmd(b"AUTH XOAUTH2 abc").startswith(b"-ERR")
    assert raw.cmd(b"AUTH PLAIN") == b"+ \r\n"
    assert raw.cmd(plain(b"user", b"pass")).startswith(b"+OK")
    assert raw.cmd(b"STAT").startswith(b"+OK 3 ")
    raw.close()
    record = srv.wait_for_sessions(1)[0]
    assert record.credentials_in_clear
    assert record.sent_in_clear(plain(b"user", b"pass"))


def test_capability_switches(store: MailStore) -> None:
    with POP3TestServer(
        store,
        pipelining=False,
        sasl=(),
        top=False,
        uidl=False,
        resp_codes=False,
        login_delay=300,
        expire="NEVER",
        user=False,
    ) as server:
        client = poplib.POP3(server.host, server.port, timeout=5)
        caps = client.capa()
        assert "PIPELINING" not in caps and "SASL" not in caps and "TOP" not in caps
        assert "UIDL" not in caps and "RESP-CODES" not in caps and "USER" not in caps
        assert caps["LOGIN-DELAY"] == ["300"] and caps["EXPIRE"] == ["NEVER"]
        with pytest.raises(poplib.error_proto):
            client.user("user")
        client.close()
    with POP3TestServer(store) as server:
        caps = poplib.POP3(server.host, server.port, timeout=5).capa()
        for name in ("TOP", "USER", "SASL", "RESP-CODES", "PIPELINING", "UIDL", "CAPA"):
            assert name in caps
        assert caps["SASL"] == ["PLAIN"] and "STLS" not in caps


def test_top_and_unknown_and_wrong_state(srv: POP3TestServer) -> None:
    raw = connect(srv)
    assert raw.cmd(b"RETR 1").startswith(b"-ERR")  # not logged in yet
    assert raw.cmd(b"NOOP").startswith(b"-ERR")
    assert raw.cmd(b"XYZZY").startswith(b"-ERR")
    raw.login()
    assert raw.cmd(b"TOP 2 1").startswith(b"+OK")
    assert raw.multi() == [
        b"From: b@example.org\r\n",
        b"Subject: two\r\n",
        b"\r\n",
        b"second body\r\n",
    ]
    assert raw.cmd(b"TOP 2 0").startswith(b"+OK")
    assert raw.multi() == [b"From: b@example.org\r\n", b"Subject: two\r\n", b"\r\n"]
    assert raw.cmd(b"TOP 2 x").startswith(b"-ERR")
    assert raw.cmd(b"USER user").startswith(b"-ERR")  # AUTHORIZATION only
    assert raw.cmd(b"RETR 99").startswith(b"-ERR")
    assert raw.cmd(b"RETR 0").startswith(b"-ERR")
    assert raw.cmd(b"RETR " + b"9" * 5000).startswith(b"-ERR")
    raw.close()


# -- the wire form ------------------------------------------------------------


def test_retr_wire_form_is_crlf_and_dot_stuffed(store: MailStore) -> None:
    store.clear()
    store.add(b".starts with a dot\nbare LF\r\nkept CRLF\n.\n..two\nbare\rCR\nno newline")
    store.add(b"")
    with POP3TestServer(store) as server:
        raw = connect(server)
        raw.login()
        expected_body = (
            b"..starts with a dot\r\nbare LF\r\nkept CRLF\r\n..\r\n...two\r\nbare\rCR\r\n"
            b"no newline\r\n.\r\n"
        )
        size = len(b".starts with a dot\r\nbare LF\r\nkept CRLF\r\n.\r\n..two\r\nbare\rCR\r\n")
        size += len(b"no newline\r\n")
        assert raw.cmd(b"LIST 1") == b"+OK 1 %d\r\n" % size
        raw.send(b"RETR 1\r\n")
        assert raw.line() == b"+OK %d octets\r\n" % size
        assert raw.exactly(len(expected_body)) == expected_body
        assert raw.cmd(b"RETR 2") == b"+OK 0 octets\r\n"
        assert raw.line() == b".\r\n"
        assert raw.cmd(b"LIST 2") == b"+OK 2 0\r\n"
        raw.close()


@given(st.binary(max_size=300))
def test_wire_form_round_trips(data: bytes) -> None:
    wire, size = to_wire(data)
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")[:-1] if wire != b".\r\n" else []
    assert all(ln != b"." for ln in lines)  # no early terminator
    unstuffed = b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    assert unstuffed == to_crlf(data)
    assert size == len(to_crlf(data))
    assert to_crlf(to_crlf(data)) == to_crlf(data)
    assert to_crlf(data).replace(b"\r\n", b"\n") == (
        data.replace(b"\r\n", b"\n") + (b"\n" if data and not data.endswith(b"\n") else b"")
    )


def test_top_of_edge_cases() -> None:
    assert top_of(b".\r\n", 3) == b".\r\n"  # empty message
    assert top_of(b"A: b\r\nC: d\r\n.\r\n", 1) == b"A: b\r\nC: d\r\n.\r\n"  # header only
    assert top_of(b"\r\nx\r\ny\r\n.\r\n", 1) == b"\r\nx\r\n.\r\n"  # no header at all
    assert top_of(b"A: b\r\n\r\n..x\r\ny\r\n.\r\n", 9) == b"A: b\r\n\r\n..x\r\ny\r\n.\r\n"


def test_sample_messages_round_trip_through_poplib() -> None:
    samples = sample_messages()
    assert 6 <= len(samples) <= 10
    assert samples == sample_messages()  # deterministic
    with POP3TestServer(MailStore(samples)) as server:
        client = poplib.POP3(server.host, server.port, timeout=5)
        client.user("user")
        client.pass_("pass")
        for number, data in enumerate(samples, start=1):
            _, lines, octets = client.retr(number)
            assert b"\n".join(lines) + b"\n" == data
            assert octets >= crlf_len(data)
        client.quit()


def test_sample_messages_cover_the_tricky_cases() -> None:
    samples = sample_messages()
    assert all(b"\r" not in m and m.endswith(b"\n") for m in samples)
    assert any(b"\n.\n" in m for m in samples)  # a line that is only '.'
    assert any(re.search(rb"\n\.[^\n.]", m) for m in samples)  # a line starting with '.'
    ids = [email.message_from_bytes(m, policy=email.policy.default)["Message-ID"] for m in samples]
    assert len(set(ids)) == len(samples) and all(ids)
    parsed = [email.message_from_bytes(m, policy=email.policy.default) for m in samples]
    eight_bit = [p for p in parsed if p["Content-Transfer-Encoding"] == "8bit"]
    assert eight_bit and "Grüße" in eight_bit[0].get_content()
    attachments = [a for p in parsed for a in p.iter_attachments() if p.is_multipart()]
    assert any(
        a.get_content_type() == "text/csv" and b"2024-03-01" in a.get_payload(decode=True)
        for a in attachments
    )
    assert any(len(m.split(b"\n\n", 1)[0]) > 2000 for m in samples)  # a long header


@pytest.mark.timeout(10)
def test_generate_messages_is_deterministic_distinct_and_sized() -> None:
    first = list(generate_messages(200, 3000, seed=5))
    assert first == list(generate_messages(200, 3000, seed=5))
    assert first != list(generate_messages(200, 3000, seed=6))
    assert len(set(first)) == 200
    assert all(2700 <= len(m) <= 3300 for m in first)
    assert sum(b"\n." in m for m in first) > 150
    for message in first[:20]:
        parsed = email.message_from_bytes(message, policy=email.policy.default)
        assert parsed["Message-ID"] and not parsed.defects
    start = time.monotonic()
    count = sum(1 for _ in generate_messages(50_000, 1000))
    assert count == 50_000 and time.monotonic() - start < 5


# -- sessions, deletions, locking ----------------------------------------------


def test_deletions_happen_only_at_quit(srv: POP3TestServer, store: MailStore) -> None:
    raw = connect(srv)
    raw.login()
    assert raw.cmd(b"DELE 1") == b"+OK message 1 deleted\r\n"
    assert raw.cmd(b"DELE 2").startswith(b"+OK")
    raw.close()  # the connection drops: no UPDATE (RFC 1939 §6)
    first = srv.wait_for_sessions(1)[0]
    assert store.uids() == [b"uid-a", b"uid-b", b"uid-c"]
    assert first.deleted == [] and not first.quit_received

    raw = connect(srv)
    raw.login()
    raw.cmd(b"DELE 2")
    assert raw.cmd(b"QUIT").startswith(b"+OK")
    assert raw.until_eof() == b""
    second = srv.wait_for_sessions(2)[1]
    assert second.deleted == [b"uid-b"] and second.quit_received
    assert store.uids() == [b"uid-a", b"uid-c"]


def test_quit_in_authorization_removes_nothing(srv: POP3TestServer, store: MailStore) -> None:
    raw = connect(srv)
    assert raw.cmd(b"QUIT") == b"+OK bye\r\n"
    assert raw.until_eof() == b""
    assert srv.wait_for_sessions(1)[0].quit_received and len(store) == 3


def test_deleted_messages_are_hidden_and_rset_restores(
    srv: POP3TestServer, store: MailStore
) -> None:
    raw = connect(srv)
    raw.login()
    raw.cmd(b"DELE 2")
    for command in (b"RETR 2", b"LIST 2", b"UIDL 2", b"TOP 2 0", b"DELE 2"):
        assert raw.cmd(command).startswith(b"-ERR"), command
    assert raw.cmd(b"STAT") == b"+OK 2 %d\r\n" % (crlf_len(MSG_A) + crlf_len(MSG_C))
    assert raw.cmd(b"LIST").startswith(b"+OK 2 messages")
    assert [ln.split()[0] for ln in raw.multi()] == [b"1", b"3"]
    assert raw.cmd(b"UIDL").startswith(b"+OK")
    assert raw.multi() == [b"1 uid-a\r\n", b"3 uid-c\r\n"]
    assert raw.cmd(b"RSET").startswith(b"+OK maildrop has 3 messages")
    assert raw.cmd(b"LIST 2").startswith(b"+OK 2 ")
    assert raw.cmd(b"QUIT").startswith(b"+OK")
    raw.close()
    assert srv.wait_for_sessions(1)[0].deleted == [] and len(store) == 3


def test_numbers_come_from_a_snapshot_at_login(srv: POP3TestServer, store: MailStore) -> None:
    raw = connect(srv)
    raw.login()
    store.add(b"Subject: late\n\nlate\n", b"uid-late")
    store.remove(b"uid-a")
    assert raw.cmd(b"STAT").startswith(b"+OK 3 ")
    assert raw.cmd(b"UIDL 1") == b"+OK 1 uid-a\r\n"
    raw.cmd(b"DELE 1")  # already gone from the store: removing it again is harmless
    raw.cmd(b"DELE 3")
    raw.cmd(b"QUIT")
    raw.close()
    assert srv.wait_for_sessions(1)[0].deleted == [b"uid-c"]
    assert store.uids() == [b"uid-b", b"uid-late"]


def test_duplicate_uids_delete_only_the_marked_copy() -> None:
    store = MailStore()
    store.add(MSG_A, b"same")
    store.add(MSG_A, b"same")
    with POP3TestServer(store) as server:
        raw = connect(server)
        raw.login()
        assert raw.cmd(b"UIDL").startswith(b"+OK")
        assert raw.multi() == [b"1 same\r\n", b"2 same\r\n"]
        raw.cmd(b"DELE 2")
        raw.cmd(b"QUIT")
        raw.close()
        assert server.wait_for_sessions(1)[0].deleted == [b"same"]
    assert store.uids() == [b"same"]


def test_exclusive_lock_refuses_second_login(srv: POP3TestServer) -> None:
    first = connect(srv)
    first.login()
    second = connect(srv)
    second.cmd(b"USER user")
    assert second.cmd(b"PASS pass") == b"-ERR [IN-USE] maildrop locked\r\n"
    assert first.cmd(b"QUIT").startswith(b"+OK")
    second.login()  # the lock is released before the QUIT reply
    second.close()
    first.close()


def test_lock_taken_by_the_test_itself_and_lock_disabled(store: MailStore) -> None:
    assert store.try_lock("someone else")
    with POP3TestServer(store) as server:
        client = poplib.POP3(server.host, server.port, timeout=5)
        client.user("user")
        with pytest.raises(poplib.error_proto, match=r"IN-USE"):
            client.pass_("pass")
        client.close()
    with POP3TestServer(store, exclusive_lock=False) as server:
        one, two = connect(server), connect(server)
        one.login()
        two.login()
        one.close()
        two.close()
    store.unlock("someone else")
    assert not store.locked


# -- pipelining and throughput ----------------------------------------------------


def test_pipelined_commands_in_one_segment_are_answered_in_order(srv: POP3TestServer) -> None:
    raw = connect(srv)
    raw.send(
        b"CAPA\r\nUSER user\r\nPASS pass\r\nSTAT\r\nLIST 1\r\nUIDL 2\r\nRETR 3\r\n"
        b"DELE 1\r\nNOOP\r\nLIST 1\r\nQUIT\r\n"
    )
    assert raw.line().startswith(b"+OK")
    capa = raw.multi()
    assert b"PIPELINING\r\n" in capa
    assert raw.line() == b"+OK send PASS\r\n"
    assert raw.line().startswith(b"+OK logged in, 3 messages")
    total = crlf_len(MSG_A) + crlf_len(MSG_B) + crlf_len(MSG_C)
    assert raw.line() == b"+OK 3 %d\r\n" % total
    assert raw.line() == b"+OK 1 %d\r\n" % crlf_len(MSG_A)
    assert raw.line() == b"+OK 2 uid-b\r\n"
    assert raw.line() == b"+OK %d octets\r\n" % crlf_len(MSG_C)
    assert b"".join(raw.multi()) == MSG_C.replace(b"\n", b"\r\n")
    assert raw.line() == b"+OK message 1 deleted\r\n"
    assert raw.line() == b"+OK\r\n"
    assert raw.line() == b"-ERR message 1 already deleted\r\n"
    assert raw.line().startswith(b"+OK bye")
    assert raw.until_eof() == b""
    raw.close()
    assert srv.wait_for_sessions(1)[0].deleted == [b"uid-a"]


@pytest.mark.timeout(20)
def test_thousands_of_pipelined_retrs_stream_fast() -> None:
    messages = list(generate_messages(1500, 4000, seed=1))
    with POP3TestServer(MailStore(messages)) as server:
        raw = connect(server)
        raw.login()
        start = time.monotonic()
        raw.send(b"".join(b"RETR %d\r\n" % n for n in range(1, 1501)))
        for message in messages:
            status = raw.line()
            assert status.startswith(b"+OK")
            body = b"".join(ln[1:] if ln.startswith(b".") else ln for ln in raw.multi())
            assert body == message.replace(b"\n", b"\r\n")
        assert time.monotonic() - start < 10
        raw.close()


def test_status_lines_stay_within_512_octets(srv: POP3TestServer) -> None:
    raw = connect(srv)
    raw.login()
    for command in (b"STAT", b"LIST 1", b"UIDL 1", b"RSET", b"NOOP", b"XYZZY", b"DELE 1"):
        assert len(raw.cmd(command)) <= 512
    raw.close()


def test_overlong_command_line_closes_the_session(srv: POP3TestServer) -> None:
    raw = connect(srv)
    raw.send(b"USER " + b"a" * 70_000)
    assert raw.line() == b"-ERR line too long\r\n"
    assert raw.until_eof() == b""
    raw.close()
    assert srv.wait_for_sessions(1)[0].finished


# -- TLS ------------------------------------------------------------------------


def test_implicit_tls(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with POP3TestServer(store, tls="implicit", ssl_context=server_ssl_context) as server:
        client = poplib.POP3_SSL(server.host, server.port, context=client_ctx, timeout=5)
        assert "STLS" not in client.capa()
        client.user("user")
        client.pass_("pass")
        assert client.retr(1)[1] == MSG_A.rstrip(b"\n").split(b"\n")
        client.quit()
        record = server.wait_for_sessions(1)[0]
    assert record.commands and all(tls for _, tls in record.commands)
    assert not record.sent_in_clear(b"PASS") and not record.credentials_in_clear


def test_implicit_tls_rejects_a_plaintext_client(
    store: MailStore, server_ssl_context: ssl.SSLContext
) -> None:
    with POP3TestServer(store, tls="implicit", ssl_context=server_ssl_context) as server:
        raw = Raw(server.address)
        raw.send(b"USER user\r\n")
        assert not raw.until_eof().startswith(b"+OK")
        raw.close()
        assert server.wait_for_sessions(1)[0].commands == []


def test_stls_then_login(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with POP3TestServer(store, ssl_context=server_ssl_context) as server:
        client = poplib.POP3(server.host, server.port, timeout=5)
        assert "STLS" in client.capa()
        assert client.stls(context=client_ctx).startswith(b"+OK")
        assert "STLS" not in client.capa()
        client.user("user")
        client.pass_("pass")
        client.quit()
        record = server.wait_for_sessions(1)[0]
    # poplib's stls() sends its own CAPA first
    assert record.command_names() == ["CAPA", "CAPA", "STLS", "CAPA", "USER", "PASS", "QUIT"]
    assert [tls for _, tls in record.commands] == [False] * 3 + [True] * 4
    assert not record.sent_in_clear(b"PASS") and not record.credentials_in_clear


def test_stls_refusals(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with POP3TestServer(store) as server:  # no context: no STLS
        raw = connect(server)
        assert raw.cmd(b"STLS").startswith(b"-ERR")
        raw.close()
    with POP3TestServer(store, ssl_context=server_ssl_context) as server:
        raw = connect(server)
        raw.login()
        assert raw.cmd(b"STLS").startswith(b"-ERR")  # only in AUTHORIZATION (RFC 2595 §4)
        raw.close()
        raw = connect(server)
        assert raw.cmd(b"STLS") == b"+OK Begin TLS\r\n"
        raw.starttls(client_ctx)
        assert raw.cmd(b"STLS").startswith(b"-ERR")  # not twice
        raw.close()
    with pytest.raises(ValueError):
        POP3TestServer(store, stls=True)
    with pytest.raises(ValueError):
        POP3TestServer(store, tls="implicit")


def test_plaintext_pipelined_after_stls_is_recorded_and_dropped(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with POP3TestServer(store, ssl_context=server_ssl_context) as server:
        raw = connect(server)
        raw.send(b"STLS\r\nUSER user\r\nPASS pass\r\n")
        assert raw.line() == b"+OK Begin TLS\r\n"
        raw.starttls(client_ctx)
        assert raw.cmd(b"STAT").startswith(b"-ERR")  # the injected login never happened
        raw.close()
        record = server.wait_for_sessions(1)[0]
    assert record.sent_in_clear(b"PASS pass")
    assert (b"STAT", True) in record.commands and not record.authenticated


def test_require_tls_for_auth(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with POP3TestServer(store, ssl_context=server_ssl_context, require_tls_for_auth=True) as server:
        raw = connect(server)
        assert raw.cmd(b"CAPA").startswith(b"+OK")
        caps = raw.multi()
        assert b"USER\r\n" not in caps and b"STLS\r\n" in caps
        assert raw.cmd(b"USER user").startswith(b"-ERR [AUTH]")
        assert raw.cmd(b"AUTH PLAIN " + plain(b"user", b"pass")).startswith(b"-ERR [AUTH]")
        assert raw.cmd(b"STLS").startswith(b"+OK")
        raw.starttls(client_ctx)
        raw.login()
        raw.close()
        record = server.wait_for_sessions(1)[0]
    assert record.authenticated and not record.credentials_in_clear
    assert record.sent_in_clear(b"AUTH PLAIN")  # refused, but it did cross in clear


# -- faults ------------------------------------------------------------------------


def test_drop_during_retr_sends_k_bytes_then_closes(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(drop_during_retr=(2, 20))) as server:
        raw = connect(server)
        raw.login()
        raw.cmd(b"DELE 1")
        assert raw.cmd(b"RETR 3").startswith(b"+OK")  # other messages are fine
        raw.multi()
        assert raw.cmd(b"RETR 2") == b"+OK %d octets\r\n" % crlf_len(MSG_B)
        assert raw.until_eof() == MSG_B.replace(b"\n", b"\r\n")[:20]
        raw.close()
        record = server.wait_for_sessions(1)[0]
    assert not record.quit_received and record.deleted == [] and len(store) == 3


def test_drop_during_retr_over_tls_has_no_close_notify(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    faults = Faults(drop_during_retr=(1, 5))
    with POP3TestServer(
        store, tls="implicit", ssl_context=server_ssl_context, faults=faults
    ) as server:
        raw = Raw(server.address)
        raw.sock = client_ctx.wrap_socket(
            raw.sock, server_hostname="127.0.0.1", suppress_ragged_eofs=False
        )
        assert raw.line().startswith(b"+OK")
        raw.login()
        raw.send(b"RETR 1\r\n")
        assert raw.line().startswith(b"+OK")
        with pytest.raises(ssl.SSLEOFError):
            raw.until_eof()
        assert raw.buf == b"From:"
        raw.close()


def test_stall_delays_only_the_named_command(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(stall={"stat": 0.5})) as server:
        raw = connect(server)
        raw.login()
        start = time.monotonic()
        assert raw.cmd(b"NOOP") == b"+OK\r\n"
        assert time.monotonic() - start < 0.4
        start = time.monotonic()
        assert raw.cmd(b"STAT").startswith(b"+OK")
        assert time.monotonic() - start >= 0.45
        raw.close()


def test_stall_of_the_greeting() -> None:
    with POP3TestServer(faults=Faults(stall={"GREETING": 0.4})) as server:
        start = time.monotonic()
        raw = connect(server)
        assert time.monotonic() - start >= 0.35
        raw.close()


@pytest.mark.parametrize(
    ("command", "line"),
    [("PASS", b"-ERR [AUTH] invalid credentials"), ("USER", b"-ERR [IN-USE] locked")],
)
def test_errors_replace_login_answers(store: MailStore, command: str, line: bytes) -> None:
    with POP3TestServer(store, faults=Faults(errors={command: line})) as server:
        client = poplib.POP3(server.host, server.port, timeout=5)
        with pytest.raises(poplib.error_proto) as excinfo:
            client.user("user")
            client.pass_("pass")
        assert excinfo.value.args[0] == line
        client.close()
        assert not server.wait_for_sessions(1)[0].authenticated


def test_errors_for_retr_and_quit(store: MailStore) -> None:
    faults = Faults(errors={"RETR": b"-ERR [SYS/TEMP] try later\r\n", "QUIT": b"-ERR no"})
    with POP3TestServer(store, faults=faults) as server:
        raw = connect(server)
        raw.login()
        assert raw.cmd(b"RETR 1") == b"-ERR [SYS/TEMP] try later\r\n"
        assert raw.cmd(b"LIST 1").startswith(b"+OK 1 ")  # the session goes on
        raw.cmd(b"DELE 1")
        assert raw.cmd(b"QUIT") == b"-ERR no\r\n"
        assert raw.until_eof() == b""
        raw.close()
        record = server.wait_for_sessions(1)[0]
    assert record.quit_received and record.deleted == [] and len(store) == 3


def test_error_greeting_hangs_up() -> None:
    with POP3TestServer(faults=Faults(errors={"GREETING": b"-ERR [SYS/TEMP] busy"})) as server:
        raw = Raw(server.address)
        assert raw.until_eof() == b"-ERR [SYS/TEMP] busy\r\n"
        raw.close()


def session_uids(server: POP3TestServer) -> list[bytes]:
    client = poplib.POP3(server.host, server.port, timeout=5)
    client.user("user")
    client.pass_("pass")
    first = [ln.split()[1] for ln in client.uidl()[1]]
    assert [ln.split()[1] for ln in client.uidl()[1]] == first  # stable within a session
    client.quit()
    return first


def test_changing_uids(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(changing_uids=True)) as server:
        one, two = session_uids(server), session_uids(server)
    assert len(set(one)) == 3 and not set(one) & set(two)
    assert not set(one) & set(store.uids())
    assert all(1 <= len(u) <= 70 and all(0x21 <= b <= 0x7E for b in u) for u in one + two)
    with POP3TestServer(store) as server:
        assert session_uids(server) == session_uids(server) == store.uids()


def test_ignore_dele(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(ignore_dele=True)) as server:
        client = poplib.POP3(server.host, server.port, timeout=5)
        client.user("user")
        client.pass_("pass")
        assert client.dele(1).startswith(b"+OK")
        assert client.quit().startswith(b"+OK")
        assert server.wait_for_sessions(1)[0].deleted == []
    assert len(store) == 3


@pytest.mark.timeout(10)
def test_endless_body_streams_until_the_client_leaves(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(endless_body=2)) as server:
        raw = connect(server)
        raw.login()
        assert raw.cmd(b"RETR 2").startswith(b"+OK")
        received = raw.exactly(3 << 20)
        assert len(received) == 3 << 20
        assert b"\r\n.\r\n" not in received
        raw.close()
        record = server.wait_for_sessions(1, timeout=5)[0]
    assert record.deleted == [] and record.error is None


def test_overlong_greeting_default_is_one_mebibyte() -> None:
    with POP3TestServer(faults=Faults(overlong_line="greeting")) as server:
        raw = Raw(server.address)
        greeting = raw.line()
        assert len(greeting) == 1 << 20 and greeting.startswith(b"+OK ")
        assert greeting.endswith(b">\r\n")  # the APOP banner survives at the end
        raw.close()
        with pytest.raises(poplib.error_proto, match="line too long"):
            poplib.POP3(server.host, server.port, timeout=5)


@pytest.mark.parametrize("place", ["uidl", "retr_status", "capa"])
def test_overlong_line_places(store: MailStore, place: str) -> None:
    faults = Faults(overlong_line=place, overlong_length=5000)  # type: ignore[arg-type]
    with POP3TestServer(store, faults=faults) as server:
        raw = connect(server)
        raw.login()
        if place == "capa":
            assert raw.cmd(b"CAPA").startswith(b"+OK")
            lines = raw.multi()
        elif place == "uidl":
            assert raw.cmd(b"UIDL").startswith(b"+OK")
            lines = raw.multi()
            assert len(raw.cmd(b"UIDL 2")) == 5000
        else:
            status = raw.cmd(b"RETR 1")
            assert len(status) == 5000 and status.startswith(b"+OK")
            lines = raw.multi()
            assert b"".join(lines) == MSG_A.replace(b"\n", b"\r\n")
            lines.append(status)
        assert [len(ln) for ln in lines if len(ln) > 512] == [5000]
        raw.close()


@pytest.mark.parametrize("command", ["UIDL", "LIST", "CAPA"])
def test_huge_listing_has_the_lines_asked_for(store: MailStore, command: str) -> None:
    # 3000 x 700 octets: more than one 1 MiB batch, and a short last one.
    faults = Faults(huge_listing=(command, 3000, 700))  # type: ignore[arg-type]
    with POP3TestServer(store, faults=faults) as server:
        raw = connect(server)
        if command != "CAPA":  # CAPA's comes before login, as a man in the middle's would
            raw.login()
        assert raw.cmd(command.encode()).startswith(b"+OK")
        lines = raw.multi()
        assert len(lines) == 3000 and {len(ln) for ln in lines} == {700}
        heads = [ln.split(b" ")[0] for ln in lines]
        if command == "CAPA":
            assert heads == [b"X-HUGE-%d" % n for n in range(1, 3001)]
        else:
            assert heads == [b"%d" % n for n in range(1, 3001)]
        if command == "UIDL":
            uids = [ln.split(b" ")[1].rstrip(b"\r\n") for ln in lines]
            assert len(set(uids)) == 3000 and re.fullmatch(rb"[\x21-\x7e]+", b"".join(uids))
        if command == "LIST":
            assert all(ln.split(b" ")[1] == b"100" for ln in lines)
        assert raw.cmd(b"NOOP" if command != "CAPA" else b"QUIT").startswith(b"+OK")
        raw.close()


def test_huge_listing_is_made_as_it_is_sent(store: MailStore) -> None:
    # Ten gigabytes: only a server that makes it lazily answers at once, and
    # it stops when the client leaves.
    faults = Faults(huge_listing=("UIDL", 10_000_000, 1000))
    with POP3TestServer(store, faults=faults) as server:
        raw = connect(server)
        raw.login()
        assert raw.cmd(b"UIDL").startswith(b"+OK")
        assert raw.line() == b"1 1-" + b"u" * (1000 - 6) + b"\r\n"
        raw.close()
        record = server.wait_for_sessions(1, timeout=10)[0]
    assert record.error is None and record.deleted == []


@pytest.mark.parametrize("bad", [("RETR", 1, 100), ("UIDL", -1, 100), ("CAPA", 1, 0)])
def test_huge_listing_validated(bad: tuple[str, int, int]) -> None:
    with pytest.raises(ValueError, match="huge_listing"):
        Faults(huge_listing=bad)  # type: ignore[arg-type]


def test_inject_after_stls(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    injected = b"+OK [injected] capability list follows\r\nUSER\r\n.\r\n"
    faults = Faults(inject_after_stls=injected)
    with POP3TestServer(store, ssl_context=server_ssl_context, faults=faults) as server:
        raw = connect(server)
        raw.send(b"STLS\r\n")
        expected = b"+OK Begin TLS\r\n" + injected
        assert raw.exactly(len(expected)) == expected
        raw.starttls(client_ctx)  # the TLS session itself works afterwards
        raw.login()
        raw.close()


def test_drop_quit_reply_applies_deletions(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(drop_quit_reply=True)) as server:
        raw = connect(server)
        raw.login()
        raw.cmd(b"DELE 3")
        raw.send(b"QUIT\r\n")
        assert raw.until_eof() == b""
        raw.close()
        record = server.wait_for_sessions(1)[0]
    assert record.quit_received and record.deleted == [b"uid-c"]
    assert store.uids() == [b"uid-a", b"uid-b"]


def test_quit_error_removes_half(store: MailStore) -> None:
    store.add(b"Subject: four\n\n4\n", b"uid-d")
    with POP3TestServer(store, faults=Faults(quit_error=True)) as server:
        raw = connect(server)
        raw.login()
        for n in (4, 2, 3, 1):
            raw.cmd(b"DELE %d" % n)
        assert raw.cmd(b"QUIT") == b"-ERR some deleted messages not removed\r\n"
        raw.close()
        assert server.wait_for_sessions(1)[0].deleted == [b"uid-a", b"uid-b"]
    assert store.uids() == [b"uid-c", b"uid-d"]


def test_unstuffed_dot_line_ends_the_message_early(store: MailStore) -> None:
    body = b"".join(b"line %d\n" % i for i in range(10))
    store.clear()
    store.add(b"Subject: x\n\n" + body, b"victim")
    with POP3TestServer(store, faults=Faults(unstuffed_dot_line=1)) as server:
        raw = connect(server)
        raw.login()
        listed = int(raw.cmd(b"LIST 1").split()[2])
        assert listed == crlf_len(b"Subject: x\n\n" + body) + 3
        assert raw.cmd(b"RETR 1").startswith(b"+OK")
        early = raw.multi()  # what a client sees as the whole message
        assert early[:2] == [b"Subject: x\r\n", b"\r\n"]
        assert 2 < len(early) < 12 and sum(map(len, early)) < listed
        rest = raw.multi()  # the tail, then the real terminator
        assert early[2:] + rest == [b"line %d\r\n" % i for i in range(10)]
        raw.close()
    # poplib reads the early terminator as the end, and the next reply is out of step
    with POP3TestServer(store, faults=Faults(unstuffed_dot_line=1)) as server:
        client = poplib.POP3(server.host, server.port, timeout=5)
        client.user("user")
        client.pass_("pass")
        assert len(client.retr(1)[1]) < 12
        with pytest.raises(poplib.error_proto):
            client.noop()
        client.close()


def test_wrong_list_size(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(wrong_list_size={2: 7})) as server:
        raw = connect(server)
        raw.login()
        assert raw.cmd(b"LIST 2") == b"+OK 2 7\r\n"
        assert raw.cmd(b"LIST").startswith(b"+OK")
        assert b"2 7\r\n" in raw.multi()
        assert raw.cmd(b"STAT") == b"+OK 3 %d\r\n" % (crlf_len(MSG_A) + 7 + crlf_len(MSG_C))
        assert raw.cmd(b"RETR 2") == b"+OK 7 octets\r\n"
        assert b"".join(raw.multi()) == MSG_B.replace(b"\n", b"\r\n")
        raw.close()


def test_no_uidl(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(no_uidl=True)) as server:
        client = poplib.POP3(server.host, server.port, timeout=5)
        assert "UIDL" not in client.capa()
        client.user("user")
        client.pass_("pass")
        with pytest.raises(poplib.error_proto):
            client.uidl()
        client.quit()


def test_faults_can_change_between_sessions(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(errors={"STAT": b"-ERR first"})) as server:
        raw = connect(server)
        server.faults = Faults()  # the open session keeps what it saw at accept
        raw.login()
        assert raw.cmd(b"STAT") == b"-ERR first\r\n"
        raw.close()
        # Closed without QUIT: the maildrop stays locked until the server
        # has seen the end of that session.
        wait_until(lambda: server.sessions[0].finished, what="the first session to end")
        raw = connect(server)
        raw.login()
        assert raw.cmd(b"STAT").startswith(b"+OK 3")
        raw.close()


def test_faults_validation() -> None:
    with pytest.raises(ValueError):
        Faults(overlong_line="somewhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Faults(drop_during_retr=(0, 10))
    with pytest.raises(ValueError):
        Faults(stall={"RETR": -1.0})
    errors = {"pass": b"-ERR x\r\n"}
    faults = Faults(errors=errors)
    errors["PASS"] = b"-ERR changed"
    assert faults.error_for("PASS") == b"-ERR x"


# -- the scripting hook ---------------------------------------------------------------


def test_on_command_hook_replaces_answers_and_can_close(store: MailStore) -> None:
    seen: list[tuple[Phase, bytes]] = []

    def hook(state: SessionState, line: bytes) -> bytes | None:
        seen.append((state.phase, line))
        if line == b"NOOP":
            return b"+OK scripted\r\n"
        if line.startswith(b"DELE"):  # a drop right in the DELE window (W5)
            state.close_requested = True
            return b""
        return None

    with POP3TestServer(store, on_command=hook) as server:
        raw = connect(server)
        raw.login()
        assert raw.cmd(b"NOOP") == b"+OK scripted\r\n"
        raw.send(b"DELE 1\r\n")
        assert raw.until_eof() == b""
        raw.close()
        record = server.wait_for_sessions(1)[0]
    assert seen[0] == (Phase.AUTHORIZATION, b"USER user")
    assert seen[2] == (Phase.TRANSACTION, b"NOOP")
    assert record.deleted == [] and len(store) == 3 and record.error is None


def test_hook_exception_is_recorded(store: MailStore) -> None:
    def hook(state: SessionState, line: bytes) -> bytes | None:
        raise RuntimeError("hook bug")

    with POP3TestServer(store, on_command=hook) as server:
        raw = connect(server)
        raw.send(b"NOOP\r\n")
        assert raw.until_eof() == b""
        raw.close()
        record = server.wait_for_sessions(1)[0]
    assert isinstance(record.error, RuntimeError)


# -- life cycle ----------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_stop_is_prompt_with_busy_sessions(
    store: MailStore, server_ssl_context: ssl.SSLContext
) -> None:
    faults = Faults(endless_body=1, stall={"STAT": 60.0})
    server = POP3TestServer(store, faults=faults, exclusive_lock=False).start()
    idle = connect(server)
    stalled = connect(server)
    stalled.login()
    stalled.send(b"STAT\r\n")
    streaming = connect(server)
    streaming.login()
    streaming.send(b"RETR 1\r\n")  # never read: the server blocks in sendall
    half_open = Raw(server.address)  # never reads its greeting

    def all_busy() -> bool:
        records = server.sessions
        return len(records) == 4 and [r.command_names()[-1:] for r in records[1:3]] == [
            ["STAT"],
            ["RETR"],
        ]

    wait_until(all_busy, what="four sessions: idle, stalled in STAT, streaming, half-open")
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 3
    assert all(r.finished for r in server.sessions) and len(server.sessions) == 4
    assert not [t for t in threading.enumerate() if t.name.startswith("pop3-test-")]
    for raw in (idle, stalled, streaming, half_open):
        raw.close()
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=1).recv(1)
    server.stop()  # idempotent
    assert len(store) == 3


def test_stop_cuts_short_the_linger_after_quit(store: MailStore) -> None:
    server = POP3TestServer(store).start()
    raw = connect(server)
    raw.login()
    assert raw.cmd(b"QUIT").startswith(b"+OK")  # the client keeps its socket open
    server.wait_for_sessions(1)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 0.5
    raw.close()


@pytest.mark.timeout(10)
def test_stop_interrupts_a_tls_handshake_in_progress(
    store: MailStore, server_ssl_context: ssl.SSLContext
) -> None:
    server = POP3TestServer(store, tls="implicit", ssl_context=server_ssl_context).start()
    raw = Raw(server.address)  # connects, never starts the handshake
    wait_until(lambda: server.sessions, what="the server to accept the connection")
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 3
    raw.close()


def test_idle_timeout_ends_the_session_without_update(store: MailStore) -> None:
    with POP3TestServer(store, idle_timeout=0.3) as server:
        raw = connect(server)
        raw.login()
        raw.cmd(b"DELE 1")
        assert raw.until_eof() == b""
        raw.close()
        assert server.wait_for_sessions(1)[0].deleted == []
    assert len(store) == 3


def test_address_before_start_and_wait_timeout() -> None:
    server = POP3TestServer()
    with pytest.raises(RuntimeError):
        _ = server.port
    with server:
        assert server.host == "127.0.0.1" and server.port > 0
        with pytest.raises(TimeoutError):
            server.wait_for_sessions(1, timeout=0.2)
    with pytest.raises(RuntimeError):
        server.start()


# -- the store --------------------------------------------------------------------------------


def test_mail_store_basics() -> None:
    store = MailStore([b"one\n", b"one\n"])
    first, second = store.uids()
    assert first != second and len(store) == 2
    assert store.add(b"x\n", b"dup") == b"dup" and store.add(b"y\n", b"dup") == b"dup"
    assert [m.data for m in store.messages()] == [b"one\n", b"one\n", b"x\n", b"y\n"]
    assert store.remove(b"dup") == 2 and store.remove(b"dup") == 0
    target = store.messages()[1]
    assert store.discard([target]) == [target] and store.uids() == [first]
    with pytest.raises(ValueError):
        store.add(b"z", b"bad\r\nuid")
    with pytest.raises(ValueError):
        store.add(b"z", b"")
    store.clear()
    assert len(store) == 0 and store.uids() == []


def test_mail_store_is_thread_safe() -> None:
    store = MailStore()

    def writer() -> None:
        for _ in range(500):
            store.add(b"m\n")

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 4000 and len(set(store.uids())) == 4000


# -- many users, and overlapping sessions ------------------------------------------


def test_many_users_each_see_their_own_maildrop_and_overlaps_are_recorded() -> None:
    boxes = {"ann": MailStore([b"Subject: a\r\n\r\nfor ann\r\n"]), "bob": MailStore()}
    with POP3TestServer(mailboxes=boxes) as srv:
        ann = poplib.POP3(srv.host, srv.port, timeout=10)
        ann.user("ann")
        ann.pass_("pass")
        assert ann.stat()[0] == 1
        bob = poplib.POP3(srv.host, srv.port, timeout=10)
        bob.user("bob")
        bob.pass_("pass")
        assert bob.stat()[0] == 0  # another user at the same time: no overlap
        again = poplib.POP3(srv.host, srv.port, timeout=10)
        again.user("ann")
        with pytest.raises(poplib.error_proto, match="IN-USE"):
            again.pass_("pass")  # ann is logged in already
        nobody = poplib.POP3(srv.host, srv.port, timeout=10)
        nobody.user("user")  # the single-user name is not a user here
        with pytest.raises(poplib.error_proto, match="AUTH"):
            nobody.pass_("pass")
        for client in (ann, bob, again, nobody):
            client.quit()
        srv.wait_for_sessions(4)
        assert [(r.number, r.user) for r in srv.overlaps()] == [(3, "ann")]
        later = poplib.POP3(srv.host, srv.port, timeout=10)  # after ann's QUIT: no overlap
        later.user("ann")
        later.pass_("pass")
        later.quit()
        srv.wait_for_sessions(5)
        assert len(srv.overlaps()) == 1
