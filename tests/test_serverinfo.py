"""``popsync serverinfo ACCOUNT``: the real process against the project's test
server (implicit TLS with the test CA) and a real Dovecot.  It shows what the
server says, logs in for STAT, and changes nothing: no RETR, no DELE, no
ledger, no Maildir.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import popsync, write_config
from tests.servers.dovecot import Mailbox

pytestmark = pytest.mark.timeout(60)


def expected_fingerprint(cert: trustme.LeafCert) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def sent_commands(server: POP3TestServer) -> set[str]:
    return {line.split(b" ")[0].decode().upper() for s in server.sessions for line, _ in s.commands}


def untouched(tmp_path: Path) -> None:
    """Neither the ledger nor the Maildir was created."""
    assert not (tmp_path / "state").exists()
    assert list((tmp_path / "Maildir").iterdir()) == []


@pytest.fixture
def tls_server(server_ssl_context: ssl.SSLContext) -> POP3TestServer:
    return POP3TestServer(
        MailStore(generate_messages(3, 800, seed=5)),
        tls="implicit",
        ssl_context=server_ssl_context,
        login_delay=900,
        expire="30",
    )


def tls_config(tmp_path: Path, port: int, ca_file: Path, **extra: object) -> Path:
    account = {"name": "acct", "port": port, "tls": "implicit", "ca_file": str(ca_file), **extra}
    return write_config(tmp_path, [account])


def test_serverinfo_shows_tls_certificate_capa_and_stat(
    tmp_path: Path, tls_server: POP3TestServer, ca_file: Path, server_cert: trustme.LeafCert
) -> None:
    with tls_server as srv:
        run = popsync("-c", str(tls_config(tmp_path, srv.port, ca_file)), "serverinfo", "acct")
        commands = sent_commands(srv)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    out = run.stdout
    assert "greeting: popsync test server ready <" in out
    assert "TLS: TLSv1.3, cipher TLS_" in out
    assert "  subject: " in out and "  issuer: " in out and "organizationName=trustme" in out
    assert f"  fingerprint: {expected_fingerprint(server_cert)}\n" in out
    assert "  valid: 20" in out
    assert "\n  UIDL\n" in out and "\n  SASL PLAIN\n" in out
    assert "SASL mechanisms: PLAIN\n" in out
    assert "LOGIN-DELAY: 900 s; EXPIRE: 30\n" in out
    assert "messages: 3 (" in out
    assert commands.isdisjoint({"RETR", "DELE", "TOP"}), commands
    assert "STAT" in commands and "QUIT" in commands
    untouched(tmp_path)


def test_serverinfo_json(
    tmp_path: Path, tls_server: POP3TestServer, ca_file: Path, server_cert: trustme.LeafCert
) -> None:
    with tls_server as srv:
        config = tls_config(tmp_path, srv.port, ca_file)
        run = popsync("-c", str(config), "serverinfo", "--json", "acct")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["tls"]["version"] == "TLSv1.3"
    assert doc["certificate"]["fingerprint"] == expected_fingerprint(server_cert)
    assert doc["messages"] == 3 and doc["size"] > 0
    assert doc["login_delay"] == 900 and doc["expire"] == "30"
    assert doc["error"] is None and doc["logged_in"] is True


def test_failed_login_still_shows_what_came_before_and_exits_1(
    tmp_path: Path, tls_server: POP3TestServer, ca_file: Path
) -> None:
    with tls_server as srv:
        config = tls_config(tmp_path, srv.port, ca_file, secret="wrong")
        run = popsync("-c", str(config), "serverinfo", "acct")
        commands = sent_commands(srv)
    assert run.returncode == 1
    assert "greeting: " in run.stdout and "fingerprint: sha256:" in run.stdout
    assert "messages:" not in run.stdout
    (line,) = run.stderr.splitlines()
    assert line.startswith("popsync: acct: ") and "AUTH" in line, line
    assert "wrong" not in run.stderr
    assert commands.isdisjoint({"RETR", "DELE", "TOP", "STAT"}), commands
    untouched(tmp_path)


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_an_untrusted_certificate_still_shows_its_fingerprint(
    tmp_path: Path,
    server_ssl_context: ssl.SSLContext,
    server_cert: trustme.LeafCert,
    tls: str,
) -> None:
    server = POP3TestServer(
        MailStore(generate_messages(1, 300, seed=5)),
        tls="implicit" if tls == "implicit" else "none",
        ssl_context=server_ssl_context,
    )
    with server as srv:  # no ca_file: the test CA is unknown to the system
        config = write_config(tmp_path, [{"name": "acct", "port": srv.port, "tls": tls}])
        run = popsync("-c", str(config), "serverinfo", "acct")
        commands = sent_commands(srv)
    assert run.returncode == 1
    assert f"fingerprint {expected_fingerprint(server_cert)}" in run.stdout, run.stdout
    (line,) = run.stderr.splitlines()
    assert "not trusted" in line and "ca_file" in line, line
    assert commands <= {"CAPA", "STLS"}, commands  # no credential was sent


def test_nothing_listening_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = popsync(
        "-c", str(write_config(tmp_path, [{"name": "acct", "port": port}])), "serverinfo", "acct"
    )
    assert run.returncode == 1
    (line,) = run.stderr.splitlines()
    assert line.startswith("popsync: acct: ") and f"127.0.0.1:{port}" in line, line
    assert run.stdout.startswith("account: acct (")


def test_unknown_account_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "acct", "port": 1}])
    run = popsync("-c", str(config), "serverinfo", "nosuch")
    assert run.returncode == 2
    (line,) = run.stderr.splitlines()
    assert "nosuch" in line and run.stdout == ""


@pytest.mark.dovecot
def test_serverinfo_against_dovecot_over_starttls(
    tmp_path: Path, dovecot_mailbox: Mailbox, ca_file: Path, server_cert: trustme.LeafCert
) -> None:
    mailbox = dovecot_mailbox
    mailbox.add_messages([b"Subject: one\n\nbody\n", b"Subject: two\n\nbody two\n"])
    config = write_config(
        tmp_path,
        [
            {
                "name": "dove",
                "host": mailbox.host,
                "port": mailbox.pop3_port,
                "tls": "starttls",
                "ca_file": str(ca_file),
                "username": mailbox.user,
                "secret": mailbox.password,
            }
        ],
    )
    run = popsync("-c", str(config), "serverinfo", "dove")
    assert run.returncode == 0, run.stderr
    assert "Dovecot" in run.stdout  # its greeting
    assert f"fingerprint: {expected_fingerprint(server_cert)}" in run.stdout
    assert "SASL mechanisms: LOGIN PLAIN" in run.stdout
    assert "messages: 2 (" in run.stdout
    assert len(mailbox.stored_messages()) == 2
    untouched(tmp_path)
