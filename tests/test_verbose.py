"""Seeing a session: ``-v`` logs each step, ``-vv`` the dialog with every secret
redacted.  The real ``popsync`` process against the project's test server and
a real Dovecot; what must never appear is the password in any form a client
puts on the wire (PASS, APOP, SASL PLAIN/LOGIN/XOAUTH2 base64).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from popsync.pop3 import Connection, Pass, User
from popsync.pop3.auth import sasl_plain, xoauth2
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.dovecot_fixtures import require_dovecot
from tests.helpers import popsync, write_config
from tests.servers.dovecot import Mailbox

pytestmark = pytest.mark.timeout(60)

SECRET = "Zq7-not-in-logs-Pw"


def secret_forms(user: str, secret: str) -> list[str]:
    """The password and every base64 form a client may send of it."""
    b64 = base64.b64encode
    return [
        secret,
        b64(sasl_plain(user, secret)).decode(),  # SASL PLAIN: \0user\0pass
        b64(secret.encode()).decode(),  # SASL LOGIN's second answer
        b64(xoauth2(user, secret)).decode(),
    ]


def assert_no_secret(text: str, user: str, secret: str) -> None:
    for form in secret_forms(user, secret):
        assert form not in text, f"secret form {form!r} leaked"


@pytest.fixture
def server() -> Iterator[POP3TestServer]:
    store = MailStore(generate_messages(3, 800, seed=7))
    with POP3TestServer(store, password=SECRET) as srv:
        yield srv


def config_for(tmp_path: Path, port: int, **extra: object) -> Path:
    return write_config(tmp_path, [{"name": "acct", "port": port, "secret": SECRET, **extra}])


def test_default_sync_output_shows_no_steps(tmp_path: Path, server: POP3TestServer) -> None:
    run = popsync("-c", str(config_for(tmp_path, server.port)), "sync", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert len(run.stdout.splitlines()) == 1


def test_v_logs_each_step_naming_the_account(tmp_path: Path, server: POP3TestServer) -> None:
    config = config_for(tmp_path, server.port, delete_after_days=0)
    run = popsync("-v", "-c", str(config), "sync", "--no-progress")
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert all(line.startswith("popsync: INFO: acct: ") for line in lines), lines
    text = "\n".join(lines)
    for step in (
        f"connected to 127.0.0.1:{server.port} (127.0.0.1:{server.port})",
        "CAPA: ",
        "authenticating as user with PLAIN",
        "logged in",
        "UIDL: 3 message(s)",
        "plan: fetch 3 (",
        "committed a batch of 3 message(s)",
        "DELE: 3 accepted, 0 refused",
        "QUIT: +OK",
    ):
        assert step in text, step
    assert " C: " not in text  # the dialog is -vv
    assert_no_secret(run.stderr, "user", SECRET)


def test_v_logs_the_tls_version_cipher_and_stls(
    tmp_path: Path, server_ssl_context: object, ca_file: Path
) -> None:
    with POP3TestServer(
        MailStore(generate_messages(1, 300, seed=1)),
        password=SECRET,
        ssl_context=server_ssl_context,  # type: ignore[arg-type]
    ) as srv:
        config = config_for(tmp_path, srv.port, tls="starttls", ca_file=str(ca_file))
        run = popsync("-v", "-c", str(config), "sync", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "acct: STLS: TLS TLSv1.3 " in run.stderr, run.stderr


def test_vv_logs_the_dialog_with_secrets_redacted(tmp_path: Path, server: POP3TestServer) -> None:
    run = popsync("-vv", "-c", str(config_for(tmp_path, server.port)), "sync", "--no-progress")
    assert run.returncode == 0, run.stderr
    text = run.stderr
    assert "acct: S: +OK" in text
    assert "acct: C: CAPA" in text
    assert "acct: C: AUTH PLAIN <redacted>" in text
    assert "acct: C: UIDL" in text
    assert "acct: C: RETR 1" in text
    assert "octets of message body>" in text
    assert "acct: C: QUIT" in text
    assert "Subject:" not in text  # bodies are never logged
    assert_no_secret(text, "user", SECRET)


@pytest.mark.parametrize(
    ("auth", "secret"),
    [
        ("user", SECRET),
        ("apop", SECRET),
        ("plain", SECRET),
        # Too long for the AUTH line: sent as a continuation (RFC 5034 §4).
        ("plain", SECRET + "x" * 200),
        # The test server refuses XOAUTH2, after the initial response arrived.
        ("xoauth2", SECRET),
    ],
    ids=["user", "apop", "plain", "plain-continuation", "xoauth2"],
)
def test_vv_never_shows_the_password_in_any_form(tmp_path: Path, auth: str, secret: str) -> None:
    store = MailStore(generate_messages(1, 300, seed=3))
    with POP3TestServer(store, password=secret, sasl=("PLAIN",)) as srv:
        config = write_config(
            tmp_path, [{"name": "acct", "port": srv.port, "secret": secret, "auth": auth}]
        )
        run = popsync("-vv", "-c", str(config), "sync", "--no-progress")
        (record,) = srv.sessions
    secrets = secret_arguments([line for line, _ in record.commands])
    assert secrets, "no secret went on the wire: the test proves nothing"
    assert " C: " in run.stderr
    for token in secrets:
        assert token not in run.stderr
    assert_no_secret(run.stderr, "user", secret)
    if auth == "plain" and len(secret) > 100:
        assert "acct: C: AUTH PLAIN\n" in run.stderr
        assert "acct: C: <redacted SASL response>" in run.stderr


def secret_arguments(commands: list[bytes]) -> list[str]:
    """What the client sent that carries the secret: PASS's argument, APOP's
    digest, AUTH's initial response and every line answering a challenge."""
    out = []
    for line in commands:
        word, _, rest = line.decode().partition(" ")
        if word.upper() == "PASS":
            out.append(rest)
        elif word.upper() == "APOP":
            out.append(rest.split()[-1])
        elif word.upper() == "AUTH" and " " in rest:
            out.append(rest.split()[1])
        elif word.upper() not in KNOWN_COMMANDS:
            out.append(line.decode())  # a SASL continuation line
    return out


KNOWN_COMMANDS = {"CAPA", "STLS", "USER", "AUTH", "UTF8", "STAT", "UIDL", "LIST", "RETR"}
KNOWN_COMMANDS |= {"TOP", "DELE", "NOOP", "RSET", "QUIT"}


def test_json_log_carries_the_steps_as_fields(tmp_path: Path, server: POP3TestServer) -> None:
    config = config_for(tmp_path, server.port)
    run = popsync("-vv", "--log-format", "json", "-c", str(config), "sync", "--no-progress")
    assert run.returncode == 0, run.stderr
    entries = [json.loads(line) for line in run.stderr.splitlines()]
    assert all(e["account"] == "acct" for e in entries)
    events = {e["event"]: e for e in entries if "event" in e}
    assert events["connect"]["port"] == server.port
    assert events["connect"]["address"] == f"127.0.0.1:{server.port}"
    assert events["auth"]["mechanism"] == "PLAIN"
    assert events["uidl"]["count"] == 3
    assert events["plan"]["new"] == 3
    dialog = [e for e in entries if e.get("event") == "dialog"]
    sent = [e["line"] for e in dialog if e["direction"] == "C"]
    assert sent[:2] == ["CAPA", "AUTH PLAIN <redacted>"]
    assert_no_secret(run.stderr, "user", SECRET)


def test_hostile_server_lines_are_escaped_and_capped(tmp_path: Path) -> None:
    evil = b"-ERR \x1b[2J\x1b]0;owned\x07 " + b"A" * 1000 + b"\r\n"
    with POP3TestServer(
        MailStore(generate_messages(1, 300, seed=3)),
        password=SECRET,
        faults=Faults(errors={"CAPA": evil}),
    ) as srv:
        config = config_for(tmp_path, srv.port)
        run = popsync("-vv", "-c", str(config), "sync", "--no-progress")
    assert "\x1b" not in run.stderr and "\x07" not in run.stderr
    line = next(x for x in run.stderr.splitlines() if "owned" in x)
    assert "\\x1b[2J" in line and line.endswith("...")
    assert len(line) < 300


def test_the_core_traces_commands_with_secrets_redacted() -> None:
    seen: list[tuple[str, str]] = []
    conn = Connection(tracer=lambda d, t: seen.append((d, t)))
    conn.receive_data(b"+OK hi\r\n")
    conn.next_event()
    conn.send(User("me"))
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    conn.send(Pass("hunter2 with spaces"))
    assert seen == [("S", "+OK hi"), ("C", "USER me"), ("S", "+OK"), ("C", "PASS <redacted>")]


@pytest.mark.dovecot
@pytest.mark.parametrize("auth", ["user", "plain", "login", "xoauth2"])
def test_vv_against_dovecot_never_shows_the_password(
    tmp_path: Path, dovecot_mailbox: Mailbox, ca_file: Path, auth: str
) -> None:
    require_dovecot()
    mailbox = dovecot_mailbox
    mailbox.add_message(b"Subject: one\n\nbody\n")
    config = write_config(
        tmp_path,
        [
            {
                "name": "dove",
                "host": mailbox.host,
                "port": mailbox.pop3s_port,
                "tls": "implicit",
                "ca_file": str(ca_file),
                "username": mailbox.user,
                "secret": mailbox.password,
                "auth": auth,
            }
        ],
    )
    run = popsync("-vv", "-c", str(config), "sync", "--no-progress")
    if auth == "xoauth2":  # Dovecot here offers PLAIN and LOGIN only
        assert run.returncode == 1
        assert "dove: C: AUTH XOAUTH2 <redacted>" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert "dove: C: RETR 1" in run.stderr
    if auth == "login":
        assert run.stderr.count("dove: C: <redacted SASL response>") == 2
    assert "dove: TLS TLSv1.3 " in run.stderr
    assert_no_secret(run.stderr, mailbox.user, mailbox.password)


def test_the_daemon_logs_its_polls_but_a_sessions_steps_only_with_v() -> None:
    # `popsync run` shows one line per poll at INFO by default (see cli.main).
    from popsync.logs import STEPS_LOGGER, setup_logging

    loggers = [logging.getLogger(n) for n in ("popsync", STEPS_LOGGER, "popsync.report")]
    saved = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    try:
        setup_logging(verbosity=1, steps_verbosity=0)
        assert logging.getLogger("popsync.daemon").isEnabledFor(logging.INFO)
        assert not logging.getLogger(STEPS_LOGGER).isEnabledFor(logging.INFO)
        setup_logging(verbosity=2, steps_verbosity=1)
        assert logging.getLogger(STEPS_LOGGER).isEnabledFor(logging.INFO)
        assert not logging.getLogger(STEPS_LOGGER).isEnabledFor(logging.DEBUG)
    finally:
        for lg, (level, handlers, propagate) in zip(loggers, saved, strict=True):
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate = propagate
