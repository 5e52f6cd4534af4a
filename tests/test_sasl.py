"""SASL SCRAM-SHA-256, SCRAM-SHA-1 and CRAM-MD5, and how ``auth: auto`` picks.

The mechanism objects are checked first against scramp's own server side (a
tampered signature, an unproven ``+OK``, a hostile iteration count); then a
real Dovecot with those mechanisms enabled accepts or refuses popsync's
logins, its log saying which mechanism it saw.  A user whose password
Dovecot stores as SHA512-CRYPT gets SCRAM offered and refused: ``auto`` must
fall back once, say so once, and not try SCRAM again in the same process.
"""

from __future__ import annotations

import base64
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scramp import ScramMechanism

from popsync.errors import ConfigError, RemoteProtocolError, SecurityError, ServerError
from popsync.options import AuthMethod, TlsMode
from popsync.pop3 import Auth, AuthResponse
from popsync.pop3.sasl import MAX_SCRAM_ITERATIONS, CramMd5, Scram
from popsync.session import Session, SessionOptions
from popsync.transport import make_ssl_context
from tests.dovecot_fixtures import require_dovecot
from tests.fakes import FakeTransport
from tests.helpers import wait_until, write_config
from tests.servers.dovecot_sasl import SaslDovecot

PASSWORD = "Corr3ct horse!"


def secret_forms(password: str) -> list[bytes]:
    """The password as it could leak: clear, base64, and inside a PLAIN message."""
    raw = password.encode()
    return [raw, base64.b64encode(raw), base64.b64encode(b"\0user\0" + raw)[8:]]


# ------------------------------------------------ the mechanisms, no network


def scram_server(password: str, iterations: int = 4096) -> Any:
    mech = ScramMechanism("SCRAM-SHA-256")
    info = mech.make_auth_info(password, iteration_count=iterations)
    return mech.make_server(lambda _user: info)


def test_scram_round_trip_proves_both_sides() -> None:
    client, server = Scram("SCRAM-SHA-256", "user", PASSWORD), scram_server(PASSWORD)
    server.set_client_first(client.initial().decode())  # type: ignore[union-attr]
    final = client.respond(server.get_server_first().encode())
    server.set_client_final(final.decode())  # type: ignore[union-attr]
    assert client.respond(server.get_server_final().encode()) == b""
    client.succeeded(None)


def test_scram_wrong_server_signature_is_a_security_error() -> None:
    client, server = Scram("SCRAM-SHA-256", "user", PASSWORD), scram_server(PASSWORD)
    server.set_client_first(client.initial().decode())  # type: ignore[union-attr]
    final = client.respond(server.get_server_first().encode())
    server.set_client_final(final.decode())  # type: ignore[union-attr]
    forged = "v=" + base64.b64encode(b"\0" * 32).decode()
    with pytest.raises(SecurityError, match="could not prove it knows the password") as info:
        client.respond(forged.encode())
    assert not info.value.temporary


def test_scram_ok_without_the_server_signature_is_refused() -> None:
    client, server = Scram("SCRAM-SHA-256", "user", PASSWORD), scram_server(PASSWORD)
    server.set_client_first(client.initial().decode())  # type: ignore[union-attr]
    client.respond(server.get_server_first().encode())
    with pytest.raises(SecurityError, match="without proving"):
        client.succeeded(None)


def test_scram_iteration_count_is_capped() -> None:
    client = Scram("SCRAM-SHA-256", "user", PASSWORD)
    first = client.initial().decode()  # type: ignore[union-attr]
    nonce = first.split("r=", 1)[1]
    salt = base64.b64encode(b"sixteen byte slt").decode()
    hostile = f"r={nonce}srv,s={salt},i={MAX_SCRAM_ITERATIONS + 1}"
    with pytest.raises(RemoteProtocolError, match="iterations"):
        client.respond(hostile.encode())


def test_cram_md5_answer_is_rfc_2195() -> None:
    # The worked example of RFC 2195 §2.
    answer = CramMd5("tim", "tanstaaftanstaaf").respond(
        b"<1896.697170952@postoffice.reston.mci.net>"
    )
    assert answer == b"tim b913a602c7eda7a495b4e6e7334d3890"


# ---------------------------------------------- session choice, scripted server

GREETING = b"+OK ready\r\n"
CAPA = b"+OK\r\nSASL SCRAM-SHA-256 PLAIN\r\nUSER\r\n.\r\n"


def options(**kw: Any) -> SessionOptions:
    base: dict[str, Any] = {
        "host": "pop.test",
        "port": 110,
        "username": "user",
        "tls": TlsMode.NONE,
        "allow_plaintext": True,
    }
    return SessionOptions(**{**base, **kw})


@pytest.mark.parametrize("code", [b"[SYS/TEMP] ", b"[IN-USE] "])
def test_a_scram_refusal_about_the_mailbox_does_not_fall_back(code: bytes) -> None:
    t = FakeTransport([GREETING, CAPA, b"-ERR " + code + b"try later\r\n"])
    session = Session.start(t, options(port=1000 + len(code)))
    with pytest.raises(ServerError):
        session.login(PASSWORD)
    assert [w.split()[:2] for w in t.writes[1:]] == [[b"AUTH", b"SCRAM-SHA-256"]]


def test_a_password_saslprep_refuses_skips_scram_in_auto() -> None:
    # RFC 4013 §2.3 prohibits ASCII control characters; PLAIN carries them.
    password = "pa\x07ss"
    capa = b"+OK\r\nSASL SCRAM-SHA-256 PLAIN\r\n.\r\n"
    t = FakeTransport([GREETING, capa, b"+OK welcome\r\n"])
    Session.start(t, options(port=2001)).login(password)
    assert [w.split()[:2] for w in t.writes[1:]] == [[b"AUTH", b"PLAIN"]]

    t = FakeTransport([GREETING, capa])
    session = Session.start(t, options(port=2002, auth=AuthMethod.SCRAM_SHA_256))
    with pytest.raises(ConfigError, match="cannot be used with SCRAM-SHA-256") as info:
        session.login(password)
    assert password not in str(info.value)
    assert t.writes == [b"CAPA\r\n"]  # nothing was sent


class ScramFake(FakeTransport):
    """A scripted server that speaks SCRAM-SHA-256 through scramp's server
    side, honestly or not: *mode* ``honest`` (server-final as a challenge),
    ``in-ok`` (server-final in the ``+OK``), ``forged`` (a wrong signature)
    or ``no-proof`` (``+OK`` without any)."""

    def __init__(self, mode: str) -> None:
        super().__init__([GREETING, b"+OK\r\nSASL SCRAM-SHA-256\r\n.\r\n"])
        mech = ScramMechanism("SCRAM-SHA-256")
        info = mech.make_auth_info(PASSWORD, iteration_count=4096)
        self.server = mech.make_server(lambda _user: info)
        self.mode = mode
        self.step = 0

    def send(self, data: bytes) -> None:
        super().send(data)
        line = data.rstrip(b"\r\n")
        if line == b"CAPA":
            return
        self.step += 1
        if self.step == 1:  # AUTH SCRAM-SHA-256 client-first
            self.server.set_client_first(base64.b64decode(line.split()[2]).decode())
            self.reply(b"+ ", self.server.get_server_first())
        elif self.step == 2:  # client-final
            self.server.set_client_final(base64.b64decode(line).decode())
            final = self.server.get_server_final()
            if self.mode == "honest":
                self.reply(b"+ ", final)
            elif self.mode == "in-ok":
                self.reply(b"+OK ", final)
            elif self.mode == "forged":
                self.reply(b"+ ", "v=" + base64.b64encode(b"\1" * 32).decode())
            else:
                self.script.append(b"+OK welcome\r\n")
        elif self.step == 3:  # the empty answer to server-final
            assert line == b""
            self.script.append(b"+OK welcome\r\n")

    def reply(self, head: bytes, message: str) -> None:
        self.script.append(head + base64.b64encode(message.encode()) + b"\r\n")


@pytest.mark.parametrize("mode", ["honest", "in-ok"])
def test_a_server_that_proves_itself_is_trusted(mode: str) -> None:
    t = ScramFake(mode)
    Session.start(t, options()).login(PASSWORD)
    assert not any(form in t.sent for form in secret_forms(PASSWORD))


@pytest.mark.parametrize(
    ("mode", "phrase"),
    [("forged", "could not prove it knows the password"), ("no-proof", "without proving")],
)
def test_a_server_that_cannot_prove_itself_is_refused(mode: str, phrase: str) -> None:
    t = ScramFake(mode)
    session = Session.start(t, options())
    with pytest.raises(SecurityError, match=phrase) as info:
        session.login(PASSWORD)
    assert not info.value.temporary
    assert len(t.writes) == 3  # CAPA, AUTH, client-final: nothing after


# ------------------------------------------------------------ real Dovecot


@pytest.fixture(scope="module")
def sasl_dovecot(
    tmp_path_factory: pytest.TempPathFactory, cert_files: tuple[Path, Path]
) -> Iterator[SaslDovecot]:
    require_dovecot()
    chain, key = cert_files
    server = SaslDovecot(
        tmp_path_factory.mktemp("dovecot-sasl"), users={}, cert_file=chain, key_file=key
    )
    with server:
        yield server


_users = iter(range(10_000))


def new_user(server: SaslDovecot, scheme: str) -> str:
    user = f"u{next(_users)}{scheme.lower().replace('-', '')}"
    server.add_user_with_scheme(user, PASSWORD, scheme)
    return user


def log_lines(server: SaslDovecot, *needles: str) -> list[str]:
    text = server.log_file.read_text("utf-8", "replace")
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def wait_login(server: SaslDovecot, user: str, count: int = 1) -> list[str]:
    def found() -> list[str] | None:
        lines = log_lines(server, f"Login: user=<{user}>")
        return lines if len(lines) >= count else None

    return wait_until(found, timeout=10, what=lambda: f"login of {user}:\n{server.log_tail()}")


def dovecot_session(server: SaslDovecot, ca_file: Path, user: str, auth: str) -> Session:
    return Session.open(
        SessionOptions(
            host=server.host,
            port=server.pop3s_port,
            username=user,
            tls=TlsMode.IMPLICIT,
            ssl_context=make_ssl_context(ca_file),
            auth=AuthMethod(auth),
            timeout=10,
        )
    )


def sent_lines(session: Session) -> list[bytes]:
    """Record what the session writes from now on (TLS hides it from a proxy)."""
    lines: list[bytes] = []
    transport = session.transport
    send = transport.send

    def tap(data: bytes) -> None:
        lines.extend(data.splitlines())
        send(data)

    transport.send = tap  # type: ignore[method-assign]
    return lines


@pytest.mark.dovecot
@pytest.mark.parametrize(
    ("scheme", "auth", "mechanism"),
    [
        ("SCRAM-SHA-256", "auto", "SCRAM-SHA-256"),
        ("SCRAM-SHA-256", "scram-sha-256", "SCRAM-SHA-256"),
        ("SCRAM-SHA-1", "scram-sha-1", "SCRAM-SHA-1"),
        ("PLAIN", "cram-md5", "CRAM-MD5"),
    ],
)
def test_dovecot_accepts_the_mechanism(
    sasl_dovecot: SaslDovecot, ca_file: Path, scheme: str, auth: str, mechanism: str
) -> None:
    user = new_user(sasl_dovecot, scheme)
    session = dovecot_session(sasl_dovecot, ca_file, user, auth)
    sent = sent_lines(session)
    session.login(PASSWORD)
    session.quit()
    assert sent[0].split()[:2] == [b"AUTH", mechanism.encode()]
    assert not any(form in line for line in sent for form in secret_forms(PASSWORD))
    (logged,) = wait_login(sasl_dovecot, user)
    assert f"method={mechanism}," in logged


@pytest.mark.dovecot
@pytest.mark.parametrize("auth", ["scram-sha-256", "cram-md5"])
def test_dovecot_refuses_a_wrong_password(
    sasl_dovecot: SaslDovecot, ca_file: Path, auth: str
) -> None:
    user = new_user(sasl_dovecot, "SCRAM-SHA-256" if auth.startswith("scram") else "PLAIN")
    session = dovecot_session(sasl_dovecot, ca_file, user, auth)
    with pytest.raises(ServerError) as info:
        session.login(PASSWORD + "x")
    session.abort()
    assert not info.value.temporary


@pytest.mark.dovecot
@pytest.mark.parametrize(
    ("scheme", "refused", "used"),
    [
        ("SHA512-CRYPT", [b"SCRAM-SHA-256", b"SCRAM-SHA-1"], "PLAIN"),
        ("SCRAM-SHA-1", [b"SCRAM-SHA-256"], "SCRAM-SHA-1"),
    ],
)
def test_auto_falls_back_once_when_dovecot_cannot_do_scram(
    sasl_dovecot: SaslDovecot,
    ca_file: Path,
    caplog: pytest.LogCaptureFixture,
    scheme: str,
    refused: list[bytes],
    used: str,
) -> None:
    user = new_user(sasl_dovecot, scheme)
    caplog.set_level(logging.WARNING, "popsync.session")
    session = dovecot_session(sasl_dovecot, ca_file, user, "auto")
    sent = sent_lines(session)
    session.login(PASSWORD)
    session.quit()
    tried = [line.split()[1] for line in sent if line.startswith(b"AUTH ")]
    assert tried == [*refused, used.encode()]
    (warning,) = caplog.messages
    assert "logged in with " + used in warning and user in warning
    assert PASSWORD not in caplog.text
    (logged,) = wait_login(sasl_dovecot, user)
    assert f"method={used}," in logged

    # The next poll of this process goes straight to what worked, quietly.
    caplog.clear()
    session = dovecot_session(sasl_dovecot, ca_file, user, "auto")
    sent = sent_lines(session)
    session.login(PASSWORD)
    session.quit()
    assert [line.split()[1] for line in sent if line.startswith(b"AUTH ")] == [used.encode()]
    assert not caplog.messages


@pytest.mark.dovecot
def test_cli_sync_with_scram_leaks_no_secret(
    sasl_dovecot: SaslDovecot, ca_file: Path, tmp_path: Path
) -> None:
    user = new_user(sasl_dovecot, "SCRAM-SHA-256")
    sasl_dovecot.add_message(user, b"Subject: hi\n\nscram\n")
    config = write_config(
        tmp_path,
        [
            {
                "name": "work",
                "host": sasl_dovecot.host,
                "port": sasl_dovecot.pop3s_port,
                "tls": "implicit",
                "ca_file": str(ca_file),
                "username": user,
                "secret": PASSWORD,
                "auth": "scram-sha-256",
            }
        ],
    )
    done = subprocess.run(
        [sys.executable, "-m", "popsync", "--config", str(config), "-v", "sync"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "1 fetched" in done.stdout.decode()
    (logged,) = wait_login(sasl_dovecot, user)
    assert "method=SCRAM-SHA-256," in logged
    ledger = (tmp_path / "state" / "ledger.db").read_bytes()
    for form in secret_forms(PASSWORD):
        assert form not in done.stdout + done.stderr
        assert form not in ledger


def test_an_empty_answer_to_a_challenge_is_an_empty_line() -> None:
    # RFC 5034 §4: "=" stands for an empty *initial* response only; Dovecot
    # takes "=" as a continuation for invalid base64 (SCRAM's last step).
    assert AuthResponse(b"").to_bytes() == b"\r\n"
    assert Auth("X", b"").to_bytes() == b"AUTH X =\r\n"
