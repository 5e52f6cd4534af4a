"""TLS controls: ``tls_fingerprint``, ``tls_client_cert``/``tls_client_key``
and ``tls_min_version`` -- the config's rules, then real connections to the
project's test server over implicit TLS and STLS (real Dovecot: see
tests/test_tls_dovecot.py).

A pin replaces CA verification: the server's certificate comes from a CA
the client is never told about, so only the pin can make it trusted.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from popsync.config import load_config
from popsync.errors import ConfigError
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from popsync.tlspin import cert_fingerprint, parse_pin, spki_pin
from tests.helpers import maildir_contents, run_sync, write_config

pytestmark = pytest.mark.timeout(60)


def der_of(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02X}" for b in data)


# ------------------------------------------------------------------ the pins


def test_a_certificate_pin_is_accepted_in_any_spelling() -> None:
    digest = hashlib.sha256(b"cert").digest()
    canonical = "sha256:" + colon_hex(digest)
    for spelling in (canonical, canonical.lower(), "SHA256:" + digest.hex(), f" {canonical} "):
        assert parse_pin(spelling) == canonical


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("md5:AB:CD", "must start with sha256:"),
        ("sha256:AB:CD", "32 bytes in hex"),
        ("sha256:" + "G" * 64, "32 bytes in hex"),
        ("pin-sha256:abc", "must be followed by base64"),
        ("pin-sha256:" + base64.b64encode(b"x" * 20).decode(), "must hold 32 bytes"),
    ],
)
def test_a_bad_pin_is_one_line_naming_the_key(tmp_path: Path, text: str, phrase: str) -> None:
    config = write_config(
        tmp_path, [{"name": "a", "port": 995, "tls": "implicit", "tls_fingerprint": [text]}]
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    (line,) = str(info.value).splitlines()
    assert "account 'a': tls_fingerprint: " in line and phrase in line
    assert text not in line or len(text) < 12


@pytest.mark.parametrize(
    ("account", "line_part"),
    [
        ({"tls": "none", "tls_fingerprint": "sha256:" + "AB" * 32}, "tls_fingerprint: only with"),
        (
            {"tls": "implicit", "ca_file": "ca.pem", "tls_fingerprint": "sha256:" + "AB" * 32},
            "ca_file: not with tls_fingerprint",
        ),
        ({"tls": "implicit", "tls_min_version": 1.1}, 'tls_min_version: must be "1.2" or "1.3"'),
        ({"tls": "implicit", "tls_min_version": "TLSv1.3"}, "tls_min_version: must be"),
        ({"tls": "implicit", "tls_client_key": "me.key"}, "tls_client_key: only with"),
        ({"tls": "implicit", "tls_client_cert": "nope.pem"}, "tls_client_cert: "),
    ],
)
def test_tls_control_mistakes_are_one_line(
    tmp_path: Path, account: dict[str, object], line_part: str
) -> None:
    (tmp_path / "ca.pem").write_text("x")
    key = tmp_path / "me.key"
    key.write_text("x")
    key.chmod(0o600)
    config = write_config(tmp_path, [{"name": "a", "port": 995, **account}])
    with pytest.raises(ConfigError) as info:
        load_config(config)
    (line,) = str(info.value).splitlines()
    assert "account 'a': " + line_part in line


@pytest.mark.parametrize("written", ["1.2", "1.3", '"1.2"', '"1.3"'])
def test_tls_min_version_quoted_or_not(tmp_path: Path, written: str) -> None:
    config = write_config(tmp_path, [{"name": "a", "port": 995, "tls": "implicit"}])
    text = config.read_text().replace(
        "tls: implicit", f"tls: implicit\n  tls_min_version: {written}"
    )
    config.write_text(text)
    (account,) = load_config(config).accounts
    assert account.tls_min_version == written.strip('"')


@pytest.mark.parametrize("holder", ["key", "cert"])
def test_check_refuses_a_private_key_others_can_read(tmp_path: Path, holder: str) -> None:
    cert, key = tmp_path / "me.pem", tmp_path / "me.key"
    cert.write_text("x")
    key.write_text("x")
    key.chmod(0o600)
    (key if holder == "key" else cert).chmod(0o640)
    extra = {"tls_client_cert": str(cert)}
    if holder == "key":
        extra["tls_client_key"] = str(key)
    config = write_config(tmp_path, [{"name": "a", "port": 995, "tls": "implicit", **extra}])
    done = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(config), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    named = key if holder == "key" else cert
    assert f"tls_client_{holder}: {named} is readable by group or others" in line


# --------------------------------------------- real TLS, the project's server


@pytest.fixture(scope="module")
def stranger_cert() -> trustme.LeafCert:
    """A certificate from a CA no test client trusts: only a pin can accept it."""
    return trustme.CA().issue_cert("127.0.0.1", "localhost")


@pytest.fixture
def pinned_server(stranger_cert: trustme.LeafCert) -> Iterator[POP3TestServer]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stranger_cert.configure_cert(ctx)
    with POP3TestServer(
        MailStore(generate_messages(2, 400, seed=5)), tls="implicit", ssl_context=ctx
    ) as srv:
        yield srv


@pytest.mark.parametrize("form", ["certificate", "key"])
def test_a_matching_pin_is_trusted_without_a_ca(
    tmp_path: Path, pinned_server: POP3TestServer, stranger_cert: trustme.LeafCert, form: str
) -> None:
    der = der_of(stranger_cert)
    pin = cert_fingerprint(der) if form == "certificate" else spki_pin(der)
    config = write_config(
        tmp_path,
        [
            {
                "name": "a",
                "port": pinned_server.port,
                "tls": "implicit",
                # A wrong pin first: any one of the list may match.
                "tls_fingerprint": ["sha256:" + "00" * 32, pin],
            }
        ],
    )
    done = run_sync(config)
    assert done.returncode == 0, done.stderr
    assert sum(maildir_contents(tmp_path / "Maildir" / "a").values()) == 2


def test_a_pin_mismatch_names_both_and_sends_nothing(
    tmp_path: Path, pinned_server: POP3TestServer, stranger_cert: trustme.LeafCert
) -> None:
    wrong = "sha256:" + "AB" * 32
    config = write_config(
        tmp_path,
        [{"name": "a", "port": pinned_server.port, "tls": "implicit", "tls_fingerprint": wrong}],
    )
    done = run_sync(config)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    actual = cert_fingerprint(der_of(stranger_cert))
    assert "FAILED (needs attention)" in line  # permanent: the account pauses
    assert f"TLS certificate {actual} does not match tls_fingerprint ({parse_pin(wrong)})" in line
    assert all(not record.commands for record in pinned_server.sessions)
    assert len(pinned_server.store) == 2


def test_a_pin_is_checked_after_stls_too(tmp_path: Path, stranger_cert: trustme.LeafCert) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    stranger_cert.configure_cert(ctx)
    with POP3TestServer(MailStore(generate_messages(1, 300, seed=6)), ssl_context=ctx) as srv:
        config = write_config(
            tmp_path,
            [
                {
                    "name": "a",
                    "port": srv.port,
                    "tls": "starttls",
                    "tls_fingerprint": "sha256:" + "CD" * 32,
                }
            ],
        )
        done = run_sync(config)
        commands = [line for record in srv.sessions for line, _ in record.commands]
    assert done.returncode == 1
    assert "does not match tls_fingerprint" in done.stderr
    assert commands == [b"CAPA", b"STLS"]  # nothing after the handshake


def test_tls_min_version_13_against_a_tls_12_server_is_one_clear_line(
    tmp_path: Path, server_cert: trustme.LeafCert, ca_file: Path
) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    store = MailStore(generate_messages(1, 300, seed=7))
    with POP3TestServer(store, tls="implicit", ssl_context=ctx) as srv:
        account = {"name": "a", "port": srv.port, "tls": "implicit", "ca_file": str(ca_file)}
        (tmp_path / "ok").mkdir()
        (tmp_path / "new").mkdir()
        ok = run_sync(write_config(tmp_path / "ok", [account]))
        refused = run_sync(write_config(tmp_path / "new", [{**account, "tls_min_version": "1.3"}]))
    assert ok.returncode == 0, ok.stderr
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert "FAILED (needs attention)" in line
    assert "no TLS version both sides accept" in line and "tls_min_version" in line
