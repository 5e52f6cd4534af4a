"""The LMTP target against a scripted LMTP server (a socket thread in the test).

The scripted server speaks just enough RFC 2033 to store what it is sent,
and can be told to refuse a step (4xx, 5xx, 421), to answer with a flood,
to hang, or to hang up in the middle of DATA.  The target must turn each of
those into a Receipt, a Refusal or one clear DeliveryError -- and the body
must arrive byte-exact, with CRLF line ends and dot-stuffing undone.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from popsync.deliver.base import Receipt, Refusal
from popsync.deliver.lmtp import (
    MAX_LINE,
    DataEncoder,
    LmtpTarget,
    open_lmtp_target,
    parse_address,
    return_path,
)
from popsync.errors import DeliveryError
from popsync.ledger import Ledger
from popsync.sync import PollReport, run_account
from popsync.testing.mailstore import MailStore
from popsync.testing.server import POP3TestServer
from tests.helpers import RSS_PROBE_PRELUDE, load, run_sync, stored_form, write_config
from tests.servers.dovecot_delivery import DeliveryDovecot

pytestmark = pytest.mark.timeout(60)

OK_FINAL = b"250 2.0.0 <rcpt@example.org> Q1a2b3 Saved\r\n"


@dataclass
class Script:
    """How the scripted server behaves; the defaults are a well-behaved server."""

    greeting: bytes = b"220 lmtp.test LMTP ready\r\n"
    pipelining: bool = True
    #: Replies by command verb (MAIL, RCPT, DATA, RSET): the raw reply.
    replies: dict[str, bytes] = field(default_factory=dict)
    #: The reply after the final dot.
    final: bytes = OK_FINAL
    #: Close the connection after this many bytes of DATA (None: never).
    close_mid_data: int | None = None
    #: Never answer the final dot.
    hang_after_data: bool = False
    #: Pipelining check: answer MAIL only once DATA has arrived too.
    insist_on_pipelining: bool = False
    #: Keep only each message's size and SHA-256 (for very large ones).
    discard: bool = False
    #: Send the greeting one byte at a time, this many seconds apart.
    trickle: float | None = None


class ScriptedLmtp:
    """A one-connection-at-a-time LMTP server driven by a Script, on the unix
    socket *path*, or on a free TCP port of *host* when *path* is None."""

    def __init__(
        self, path: Path | None, script: Script | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.path = path
        self.script = script or Script()
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []  # as stored: dot-stuffing undone, LF line ends
        self.connections = 0
        if path is None:
            self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self.listener.bind((host, 0))
            port = self.listener.getsockname()[1]
            self.tcp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(path))
        self.listener.listen(4)
        self.release = threading.Event()  # lets a hanging server go at the end
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"unix:{self.path}" if self.path is not None else self.tcp

    def close(self) -> None:
        self.release.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn, contextlib.suppress(OSError):
                self._session(conn, conn.makefile("rb"))

    def _session(self, conn: socket.socket, rfile: Any) -> None:
        if self.script.trickle is None:
            conn.sendall(self.script.greeting)
        for i in range(len(self.script.greeting) if self.script.trickle is not None else 0):
            conn.sendall(self.script.greeting[i : i + 1])
            if self.release.wait(self.script.trickle):
                return
        while line := rfile.readline():
            self.commands.append(line.rstrip(b"\r\n"))
            if not self._answer(conn, rfile, line[:4].upper().decode("latin-1")):
                return

    def _answer(self, conn: socket.socket, rfile: Any, verb: str) -> bool:
        """Answer one command; False when the session is over."""
        s = self.script
        if verb == "LHLO":
            ext = [b"PIPELINING"] if s.pipelining else []
            conn.sendall(_multiline(250, [b"lmtp.test", *ext, b"8BITMIME", b"ENHANCEDSTATUSCODES"]))
            return True
        if verb == "QUIT":
            conn.sendall(b"221 2.0.0 Bye\r\n")
            return False
        if verb == "MAIL" and s.insist_on_pipelining:
            rcpt, data = rfile.readline(), rfile.readline()  # before any reply
            self.commands += [rcpt.rstrip(b"\r\n"), data.rstrip(b"\r\n")]
            conn.sendall(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go ahead\r\n")
            return self._data(conn, rfile)
        if verb in ("MAIL", "RCPT", "RSET"):
            reply = s.replies.get(verb, b"250 2.1.0 OK\r\n")
            conn.sendall(reply)
            return not reply.startswith(b"421")
        if verb == "DATA":
            refused = any(s.replies.get(v, b"250")[:1] != b"2" for v in ("MAIL", "RCPT"))
            default = b"503 5.5.1 No valid recipients\r\n" if refused else b"354 go ahead\r\n"
            reply = s.replies.get("DATA", default)
            conn.sendall(reply)
            return not reply.startswith(b"354") or self._data(conn, rfile)
        conn.sendall(b"500 5.5.2 what?\r\n")
        return True

    def _data(self, conn: socket.socket, rfile: Any) -> bool:
        s = self.script
        body = bytearray()
        digest, size = hashlib.sha256(), 0
        seen = 0
        while True:
            line = rfile.readline()
            seen += len(line)
            if not line or (s.close_mid_data is not None and seen > s.close_mid_data):
                return False
            if line == b".\r\n":
                break
            assert line.endswith(b"\r\n"), "a line without CRLF in DATA"
            stored = (line[1:] if line.startswith(b".") else line)[:-2] + b"\n"
            if s.discard:
                digest.update(stored)
                size += len(stored)
            else:
                body += stored
        self.messages.append(
            b"%d %s" % (size, digest.hexdigest().encode()) if s.discard else bytes(body)
        )
        if s.hang_after_data:
            self.release.wait(30)
            return False
        conn.sendall(s.final)
        return True


def _multiline(code: int, lines: list[bytes]) -> bytes:
    out = [b"%d-%s\r\n" % (code, line) for line in lines[:-1]]
    return b"".join(out) + b"%d %s\r\n" % (code, lines[-1])


@pytest.fixture
def lmtp(tmp_path: Path) -> Iterator[Callable[..., ScriptedLmtp]]:
    servers: list[ScriptedLmtp] = []

    def start(*, tcp: str | None = None, **kw: Any) -> ScriptedLmtp:
        path = tmp_path / f"lmtp{len(servers)}.sock" if tcp is None else None
        servers.append(ScriptedLmtp(path, Script(**kw), host=tcp or ""))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _no_warning(text: str) -> None:
    raise AssertionError(f"unexpected warning: {text}")


def deliver_with(target: LmtpTarget, message: bytes, name: str = "n1") -> Receipt | Refusal:
    draft = target.begin(name, b"uid-" + name.encode())
    for start in range(0, len(message), 5000):
        draft.write(message[start : start + 5000])
    target.end(draft)
    assert target.intent(draft) is None
    [result] = target.commit([draft])
    return result


def deliver(server: ScriptedLmtp, message: bytes, *, timeout: float = 10) -> Receipt | Refusal:
    with open_lmtp_target(
        server.address, "rcpt@example.org", timeout=timeout, warn=_no_warning
    ) as target:
        return deliver_with(target, message)


# Stored form: LF line ends.
TRICKY = (
    b"Return-Path: <bounce+x=y@example.org>\nSubject: tricky\n\n"
    b".\n..two\n.\r\nFrom the start\n>From\n\xe9\xff\x00\x80\n" + b"z" * 20_000 + b"\nend\n"
)


# -- the data encoding ------------------------------------------------------------------


def _unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")[:-1] if wire != b".\r\n" else []
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\n" for line in lines)


@pytest.mark.parametrize("seed", range(20))
def test_data_encoding_is_independent_of_chunking(seed: int) -> None:
    rng = random.Random(seed)
    message = TRICKY[: rng.randrange(len(TRICKY) + 1)]
    message = message if message.endswith(b"\n") or not message else message + b"\n"
    cuts = sorted(rng.sample(range(len(message) + 1), min(8, len(message) + 1)))
    pieces = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True)]
    encoder = DataEncoder()
    wire = b"".join(encoder.encode(p) for p in pieces) + encoder.end()
    assert b"\n" not in wire.replace(b"\r\n", b"")
    assert _unstuff(wire) == message


def test_data_encoding_of_edge_cases() -> None:
    def encode(*pieces: bytes) -> bytes:
        encoder = DataEncoder()
        return b"".join(encoder.encode(p) for p in pieces) + encoder.end()

    assert encode(b"") == b".\r\n"
    assert encode(b".") == b"..\r\n.\r\n"  # no final line end: one is added
    assert encode(b"a\n", b".b\n") == b"a\r\n..b\r\n.\r\n"
    assert encode(b"a\n.", b"\n") == b"a\r\n..\r\n.\r\n"
    assert encode(b"a\r\n") == b"a\r\r\n.\r\n"  # a CR the server sent stays


def test_return_path_is_the_sender() -> None:
    assert return_path(b"Return-Path: <a@b.example>\nSubject: x\n\nbody") == b"a@b.example"
    assert return_path(b"Subject: x\nreturn-path:\n  <folded@b.example>\n\n") == b"folded@b.example"
    assert return_path(b"Return-Path: <>\n\n") == b""
    assert return_path(b"Return-Path: <a b@c>\n\n") == b""
    assert return_path(b"Return-Path: <\xe9@c>\n\n") == b""
    assert return_path(b"Subject: x\n\nReturn-Path: <body@b.example>\n") == b""
    assert return_path(b"\nReturn-Path: <a@b>\n") == b""


def test_addresses() -> None:
    assert parse_address("unix:/run/lmtp") == (socket.AF_UNIX, "/run/lmtp")
    assert parse_address("localhost:24") == (socket.AF_UNSPEC, ("localhost", 24))
    assert parse_address("[::1]:2424") == (socket.AF_UNSPEC, ("::1", 2424))
    for bad in ("unix:relative", "host", "host:0", "host:x", ":24"):
        with pytest.raises(ValueError, match=r"unix:|host:port"):
            parse_address(bad)


# -- against the scripted server ------------------------------------------------------


def test_a_message_arrives_byte_exact_with_its_sender(lmtp: Callable[..., ScriptedLmtp]) -> None:
    server = lmtp()
    assert deliver(server, TRICKY) == Receipt("250 2.0.0 <rcpt@example.org> Q1a2b3 Saved")
    assert server.messages == [TRICKY]
    assert server.commands[1:4] == [
        b"MAIL FROM:<bounce+x=y@example.org> BODY=8BITMIME",
        b"RCPT TO:<rcpt@example.org>",
        b"DATA",
    ]
    assert server.commands[0].startswith(b"LHLO ") and server.commands[-1] == b"QUIT"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_host_port_addresses(lmtp: Callable[..., ScriptedLmtp], host: str) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = lmtp(tcp=host)
    assert isinstance(deliver(server, TRICKY), Receipt)
    assert server.messages == [TRICKY]


def test_one_session_serves_the_poll(lmtp: Callable[..., ScriptedLmtp]) -> None:
    server = lmtp()
    with open_lmtp_target(server.address, "r@x", timeout=10, warn=_no_warning) as target:
        assert (target.kind, target.batch, target.exactly_once) == ("lmtp", 1, False)
        assert server.connections == 0  # lazily opened
        for i in range(3):
            message = b"Subject: %d\n\nbody\n" % i
            assert isinstance(deliver_with(target, message, f"n{i}"), Receipt)
        assert target.recover([]) == []
    assert server.connections == 1
    assert [c.split()[0] for c in server.commands].count(b"LHLO") == 1
    assert server.commands[1] == b"MAIL FROM:<> BODY=8BITMIME"  # no Return-Path
    assert len(server.messages) == 3 and server.commands[-1] == b"QUIT"


def test_mail_rcpt_and_data_are_pipelined(lmtp: Callable[..., ScriptedLmtp]) -> None:
    # This server answers MAIL only after RCPT and DATA arrived: without
    # pipelining, the client would wait for it until its timeout.
    server = lmtp(insist_on_pipelining=True)
    assert isinstance(deliver(server, TRICKY, timeout=5), Receipt)
    assert server.messages == [TRICKY]


def test_without_pipelining_a_refused_mail_is_not_followed_by_rcpt(
    lmtp: Callable[..., ScriptedLmtp],
) -> None:
    server = lmtp(pipelining=False, replies={"MAIL": b"451 4.3.0 try later\r\n"})
    result = deliver(server, TRICKY)
    assert result == Refusal("MAIL FROM: 451 4.3.0 try later", temporary=True)
    verbs = [c.split(b":")[0].split()[0] for c in server.commands]
    assert verbs == [b"LHLO", b"MAIL", b"RSET", b"QUIT"]


def test_a_5xx_to_rcpt_is_permanent_and_the_session_goes_on(
    lmtp: Callable[..., ScriptedLmtp],
) -> None:
    server = lmtp(replies={"RCPT": b"550 5.1.1 <r@x> User doesn't exist\r\n"})
    with open_lmtp_target(server.address, "r@x", timeout=10, warn=_no_warning) as target:
        first = deliver_with(target, TRICKY, "n1")
        server.script.replies.clear()
        second = deliver_with(target, TRICKY, "n2")
    assert first == Refusal("RCPT TO: 550 5.1.1 <r@x> User doesn't exist", temporary=False)
    assert isinstance(second, Receipt)
    assert server.connections == 1 and b"RSET" in server.commands
    assert server.messages == [TRICKY]


@pytest.mark.parametrize(
    ("final", "temporary"),
    [(b"452 4.2.2 <r@x> Quota exceeded\r\n", True), (b"552 5.2.2 <r@x> Mailbox full\r\n", False)],
)
def test_the_reply_after_the_dot_decides(
    lmtp: Callable[..., ScriptedLmtp], final: bytes, temporary: bool
) -> None:
    server = lmtp(final=final)
    result = deliver(server, TRICKY)
    text = "after DATA: " + final.decode().strip()
    assert result == Refusal(text, temporary=temporary)


def test_a_421_refuses_for_now_and_the_next_message_reconnects(
    lmtp: Callable[..., ScriptedLmtp],
) -> None:
    server = lmtp(replies={"MAIL": b"421 4.3.2 shutting down\r\n"})
    with open_lmtp_target(server.address, "r@x", timeout=10, warn=_no_warning) as target:
        first = deliver_with(target, TRICKY, "n1")
        server.script.replies.clear()
        second = deliver_with(target, TRICKY, "n2")
    assert first == Refusal("MAIL FROM: 421 4.3.2 shutting down", temporary=True)
    assert isinstance(second, Receipt) and server.connections == 2


def test_a_multiline_final_reply_is_one_receipt(lmtp: Callable[..., ScriptedLmtp]) -> None:
    server = lmtp(final=b"250-2.0.0 first\r\n250 2.0.0 second\r\n")
    assert deliver(server, TRICKY) == Receipt("250 2.0.0 first 2.0.0 second")


def test_a_megabyte_reply_line_is_refused_early(lmtp: Callable[..., ScriptedLmtp]) -> None:
    server = lmtp(greeting=b"220 " + b"x" * (1 << 20) + b"\r\n")
    with pytest.raises(DeliveryError, match=f"reply line longer than {MAX_LINE} octets"):
        deliver(server, TRICKY)


def test_a_reply_of_too_many_lines_is_refused(lmtp: Callable[..., ScriptedLmtp]) -> None:
    server = lmtp(greeting=b"220-hi\r\n" * 5000 + b"220 ready\r\n")
    with pytest.raises(DeliveryError, match="reply of more than 100 lines"):
        deliver(server, TRICKY)


@pytest.mark.parametrize(
    ("greeting", "error"),
    [
        (b"554 5.3.2 go away\r\n", "refused the session: 554 5.3.2 go away"),
        (b"hello\r\n", "malformed reply: hello"),
    ],
)
def test_a_bad_greeting_is_one_clear_error(
    lmtp: Callable[..., ScriptedLmtp], greeting: bytes, error: str
) -> None:
    server = lmtp(greeting=greeting)
    with pytest.raises(DeliveryError, match=f"LMTP server unix:.* {error}"):
        deliver(server, TRICKY, timeout=2)


def test_a_server_that_closes_mid_data_fails_the_delivery(
    lmtp: Callable[..., ScriptedLmtp],
) -> None:
    server = lmtp(close_mid_data=10_000)
    big = b"Subject: big\n\n" + b"line of text\n" * 200_000
    with pytest.raises(DeliveryError, match=r"connection lost|closed the connection"):
        deliver(server, big)
    assert server.messages == []


def test_a_silent_server_times_out(lmtp: Callable[..., ScriptedLmtp]) -> None:
    server = lmtp(hang_after_data=True)
    with pytest.raises(DeliveryError, match=r"did not answer within 1\.5 s"):
        deliver(server, TRICKY, timeout=1.5)


def test_a_trickling_server_is_cut_off_at_the_timeout(
    lmtp: Callable[..., ScriptedLmtp],
) -> None:
    # Every byte arrives well within the timeout, the whole reply never does.
    server = lmtp(greeting=b"220 " + b"x" * 200 + b"\r\n", trickle=0.05)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"did not answer within 1 s"):
        deliver(server, TRICKY, timeout=1)
    assert time.monotonic() - started < 5


def test_no_server_is_one_clear_error(tmp_path: Path) -> None:
    with (
        open_lmtp_target(
            f"unix:{tmp_path}/none.sock", "r@x", timeout=2, warn=_no_warning
        ) as target,
        pytest.raises(DeliveryError, match=r"none\.sock: cannot connect: No such file"),
    ):
        deliver_with(target, TRICKY)


@pytest.mark.parametrize(
    ("address", "warned"),
    [
        ("192.0.2.7:24", True),
        ("mail.example.org:24", True),
        ("127.0.0.1:24", False),
        ("[::1]:24", False),
        ("localhost:24", False),
        ("unix:/run/dovecot/lmtp", False),
    ],
)
def test_lmtp_to_another_host_warns_it_is_in_clear(address: str, warned: bool) -> None:
    warnings: list[str] = []
    with open_lmtp_target(address, "r@x", timeout=2, warn=warnings.append):
        pass  # no connection is made before the first message
    expected = [f"LMTP to {address} is not encrypted: mail crosses the network in clear"]
    assert warnings == (expected if warned else [])


def test_a_bad_recipient_fails_at_open() -> None:
    with (
        pytest.raises(DeliveryError, match="not a plain address"),
        open_lmtp_target("unix:/x", "a b@c", timeout=2, warn=_no_warning),
    ):
        pass


# -- end to end: popsync polls the project's POP3 test server into LMTP ---------------


def tricky_messages() -> list[bytes]:
    """Byte-exact round trip material, as a POP3 server holds it (CRLF)."""
    rng = random.Random(7)
    blob = base64.encodebytes(rng.randbytes(5 * 1024 * 1024 // 4 * 3))
    return [
        b"Return-Path: <list-bounces@example.org>\r\nSubject: dots\r\n\r\n"
        b".\r\n..two\r\n.leading\r\n. \r\nend\r\n",
        b"Subject: from lines\r\n\r\nFrom me\r\n>From you\r\nFrom: not a header\r\n",
        b"Subject: 8bit\r\n\r\n\xe9t\xe9 \xff\x80\x00 \x1b[0m\r\n",
        b"Subject: long line\r\n\r\n" + b"y" * 20_000 + b"\r\n",
        b"Subject: no final newline\r\n\r\nlast line",
        b"Subject: attachment\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + blob.replace(b"\n", b"\r\n"),
    ]


class LmtpEnv:
    """One account polling a POP3 test server into a scripted LMTP server."""

    def __init__(self, tmp: Path, lmtp: ScriptedLmtp, messages: list[bytes], **account: Any):
        self.lmtp = lmtp
        self.store = MailStore(messages)
        self.server = POP3TestServer(self.store).start()
        kw = {
            "name": "acct",
            "port": self.server.port,
            "maildir": None,
            "lmtp": lmtp.address,
            "lmtp_recipient": "rcpt@example.org",
            "delete_after_days": 0,
        }
        self.config_path = write_config(tmp, [{**kw, **account}])
        self.config = load(self.config_path)
        self.ledger = Ledger.open(self.config.ledger_url)

    def poll(self) -> PollReport:
        return run_account(self.config.accounts[0], self.ledger, self.config.state_dir)

    def close(self) -> None:
        self.ledger.close()
        self.server.stop()


@pytest.fixture
def lmtp_env(tmp_path: Path, lmtp: Callable[..., ScriptedLmtp]) -> Iterator[Callable[..., LmtpEnv]]:
    made: list[LmtpEnv] = []

    def factory(
        messages: list[bytes], *, script: dict[str, Any] | None = None, **kw: Any
    ) -> LmtpEnv:
        made.append(LmtpEnv(tmp_path, lmtp(**(script or {})), messages, **kw))
        return made[-1]

    yield factory
    for env in made:
        env.close()


def test_run_account_delivers_byte_exact_and_deletes(lmtp_env: Callable[..., LmtpEnv]) -> None:
    messages = tricky_messages()
    env = lmtp_env(messages, timeout=60)
    report = env.poll()
    assert report.ok, report.error
    assert report.counts.fetched == len(messages) and report.counts.deleted == len(messages)
    assert sorted(env.lmtp.messages) == sorted(stored_form(m) for m in messages)
    assert env.lmtp.connections == 1 and len(env.store) == 0
    assert b"MAIL FROM:<list-bounces@example.org> BODY=8BITMIME" in env.lmtp.commands


def test_run_account_a_5xx_leaves_the_message_and_names_it(
    lmtp_env: Callable[..., LmtpEnv],
) -> None:
    env = lmtp_env(
        [b"Subject: one\r\n\r\nbody\r\n"],
        script={"replies": {"RCPT": b"550 5.1.1 <rcpt@example.org> User doesn't exist\r\n"}},
    )
    report = env.poll()
    assert not report.ok
    [uid] = env.store.uids()
    assert (
        f"unique-id {uid.decode()}: the lmtp target refused it: RCPT TO: 550 5.1.1 "
        "<rcpt@example.org> User doesn't exist" in (report.error or "")
    )
    assert env.lmtp.messages == []


def test_run_account_a_4xx_is_temporary_and_deletes_nothing(
    lmtp_env: Callable[..., LmtpEnv],
) -> None:
    env = lmtp_env(
        [b"Subject: %d\r\n\r\nbody\r\n" % i for i in range(3)],
        script={"final": b"452 4.2.2 <rcpt@example.org> Quota exceeded\r\n"},
    )
    report = env.poll()
    assert not report.ok and report.temporary is True
    assert "after DATA: 452 4.2.2" in (report.error or "")
    assert len(env.store) == 3  # the first was refused; no RETR after it was delivered


def test_run_account_a_broken_connection_records_nothing(
    lmtp_env: Callable[..., LmtpEnv],
) -> None:
    big = b"Subject: big\r\n\r\n" + b"line of text\r\n" * 100_000
    env = lmtp_env([big], script={"close_mid_data": 50_000})
    report = env.poll()
    assert not report.ok and report.temporary is True
    assert "LMTP server unix:" in (report.error or "")
    assert len(env.store) == 1 and env.lmtp.messages == []
    env.lmtp.script.close_mid_data = None  # the server is well again: fetched again
    assert env.poll().ok
    assert env.lmtp.messages == [stored_form(big)] and len(env.store) == 0


# -- crashes: SIGKILL a real popsync sync at each step, then run it again ------------

#: The crash point and the duplicates it may cost: an LMTP server cannot be
#: asked afterwards, so a kill once the final dot is sent costs one.
LMTP_CRASHES = {
    "after_begin_fetch": 0,
    "mid_body:3": 0,
    "lmtp_mid_data:3": 0,  # the server sees the connection drop: nothing stored
    "lmtp_after_dot:3": 1,
    "after_dir_fsync:3": 1,
    "after_commit:3": 0,
    "after_dele": 0,
    "after_quit": 0,
}


@pytest.mark.crash
@pytest.mark.parametrize(("failpoint", "duplicates"), LMTP_CRASHES.items())
def test_sigkill_then_rerun_loses_nothing_and_duplicates_at_most_one(
    lmtp_env: Callable[..., LmtpEnv], failpoint: str, duplicates: int
) -> None:
    messages = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(5)]
    expected = sorted(stored_form(m) for m in messages)
    env = lmtp_env(messages)

    crashed = run_sync(env.config_path, failpoint)
    assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)
    on_server = {stored_form(m.data) for m in env.store.messages()}
    assert set(expected) <= on_server | set(env.lmtp.messages), "a message was lost"

    clean = run_sync(env.config_path, None)
    assert clean.returncode == 0, clean.stderr
    got = env.lmtp.messages
    assert sorted(set(got)) == expected
    assert len(got) - len(messages) == duplicates
    assert len(env.store) == 0


# -- memory: a 200 MB message through the target, measured in a subprocess -----------

RSS_PROBE = (
    RSS_PROBE_PRELUDE
    + """
from popsync.deliver.lmtp import open_lmtp_target

size, address = int(sys.argv[1]), sys.argv[2]
piece = (b"." + b"A" * 998 + b"\\n") * 64
with open_lmtp_target(address, "r@x", timeout=60, warn=print) as target:
    draft = target.begin("n1", b"big-1")
    written = 0
    while written < size:
        draft.write(piece)
        written += len(piece)
    target.end(draft)
    before = peak_kib()
    [result] = target.commit([draft])
    sha = draft.sha256_hex
after = peak_kib()
print(type(result).__name__, written, sha, before, after)
"""
)


@pytest.mark.slow
def test_a_200_mb_message_keeps_memory_bounded(lmtp: Callable[..., ScriptedLmtp]) -> None:
    server = lmtp(discard=True)
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(200 * 1024 * 1024), server.address],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    kind, written, sha, before, after = probe.stdout.split()
    assert kind == "Receipt"
    assert server.messages == [f"{written} {sha}".encode()]  # every line dot-stuffed, intact
    peak_kib = int(after)
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB"
    assert peak_kib - int(before) < 8 * 1024, "delivery grew the peak RSS"


# -- against Dovecot's LMTP ------------------------------------------------------------


def without_return_path(stored: bytes, sender: bytes) -> bytes:
    """*stored* without the ``Return-Path:`` line Dovecot's LMTP always prepends."""
    added = b"Return-Path: <" + sender + b">\n"
    assert stored.startswith(added), stored[:200]
    return stored[len(added) :]


@pytest.mark.dovecot
def test_dovecot_stores_what_the_target_sends_byte_exact(
    dovecot_delivery: DeliveryDovecot,
) -> None:
    box = dovecot_delivery.new_mailbox("lmtp")
    messages = [stored_form(m) for m in tricky_messages()]
    with open_lmtp_target(
        dovecot_delivery.lmtp_address, box.user, timeout=30, warn=_no_warning
    ) as target:
        results = [deliver_with(target, m, f"n{i}") for i, m in enumerate(messages)]
    assert all(isinstance(r, Receipt) and r.text.startswith("250 2.0.0") for r in results)
    stored = dovecot_delivery.stored_messages(box.user)
    senders = [return_path(m) for m in messages]
    assert [without_return_path(s, f) for s, f in zip(stored, senders, strict=True)] == messages


@pytest.mark.dovecot
def test_dovecot_through_run_account_byte_exact(
    dovecot_delivery: DeliveryDovecot, tmp_path: Path
) -> None:
    box = dovecot_delivery.new_mailbox("lmtp")
    messages = tricky_messages()
    store = MailStore(messages)
    with POP3TestServer(store) as pop3:
        account = {
            "name": "acct",
            "port": pop3.port,
            "maildir": None,
            "lmtp": dovecot_delivery.lmtp_address,
            "lmtp_recipient": f"{box.user}@example.org",
            "delete_after_days": 0,
            "timeout": 60,
        }
        config = load(write_config(tmp_path, [account]))
        ledger = Ledger.open(config.ledger_url)
        try:
            report = run_account(config.accounts[0], ledger, config.state_dir)
        finally:
            ledger.close()
    assert report.ok, report.error
    assert len(store) == 0
    stored = sorted(
        without_return_path(s, return_path(s[s.index(b"\n") + 1 :]))
        for s in dovecot_delivery.stored_messages(box.user)
    )
    assert stored == sorted(stored_form(m) for m in messages)


@pytest.mark.dovecot
def test_dovecot_unknown_user_is_a_permanent_refusal(dovecot_delivery: DeliveryDovecot) -> None:
    with open_lmtp_target(
        dovecot_delivery.lmtp_address, "nobody-here", timeout=30, warn=_no_warning
    ) as target:
        result = deliver_with(target, TRICKY)
    assert isinstance(result, Refusal) and not result.temporary
    assert result.text.startswith("RCPT TO: 550 5.1.1"), result.text


@pytest.mark.dovecot
@pytest.mark.parametrize(("tempfail", "reply"), [(False, "552 5.2.2"), (True, "452 4.2.2")])
def test_dovecot_over_quota_is_refused(
    dovecot_delivery: DeliveryDovecot, tempfail: bool, reply: str
) -> None:
    box = dovecot_delivery.new_mailbox("quota", quota_bytes=1000, quota_tempfail=tempfail)
    with open_lmtp_target(
        dovecot_delivery.lmtp_address, box.user, timeout=30, warn=_no_warning
    ) as target:
        small = deliver_with(target, b"Subject: fits\n\nsmall\n", "n1")
        big = deliver_with(target, b"Subject: too big\n\n" + b"x" * 5000 + b"\n", "n2")
    assert isinstance(small, Receipt)
    assert isinstance(big, Refusal) and big.temporary is tempfail
    assert big.text.startswith(f"after DATA: {reply}") and "Quota exceeded" in big.text
    assert len(dovecot_delivery.stored_messages(box.user)) == 1
