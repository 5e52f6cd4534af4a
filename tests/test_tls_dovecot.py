"""TLS controls against a real Dovecot: pins and client certificates.

One Dovecot asks every client for a certificate from the test CA
(``ssl_verify_client_cert``) and lets no one log in without one
(``auth_ssl_require_client_cert``); the other tests pin the certificate the
shared test CA issued, with no ``ca_file`` given.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from popsync.errors import SecurityError, ServerError
from popsync.options import TlsMode
from popsync.session import Session, SessionOptions
from popsync.testing.mailstore import MailStore
from popsync.testing.server import POP3TestServer
from popsync.tlspin import cert_fingerprint
from popsync.transport import make_ssl_context
from tests.dovecot_fixtures import require_dovecot
from tests.helpers import run_sync, wait_until, write_config
from tests.servers.dovecot_delivery import DeliveryDovecot, DeliveryMailbox
from tests.servers.dovecot_sasl import SaslDovecot

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(120)]

PASSWORD = "tls-contr0ls"


@pytest.fixture(scope="module")
def cert_dovecot(
    tmp_path_factory: pytest.TempPathFactory, cert_files: tuple[Path, Path], ca_file: Path
) -> Iterator[SaslDovecot]:
    require_dovecot()
    chain, key = cert_files
    extra = (
        f"ssl_ca = <{ca_file}\n"
        "ssl_verify_client_cert = yes\n"
        "auth_ssl_require_client_cert = yes\n"
        "ssl_require_crl = no\n"
    )
    server = SaslDovecot(
        tmp_path_factory.mktemp("dovecot-certs"),
        users={"carol": PASSWORD},
        cert_file=chain,
        key_file=key,
        extra_config=extra,
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def plain_dovecot(
    tmp_path_factory: pytest.TempPathFactory, cert_files: tuple[Path, Path]
) -> Iterator[SaslDovecot]:
    require_dovecot()
    chain, key = cert_files
    server = SaslDovecot(
        tmp_path_factory.mktemp("dovecot-pins"),
        users={"dave": PASSWORD},
        cert_file=chain,
        key_file=key,
    )
    with server:
        yield server


def login(server: SaslDovecot, user: str, tls: str, ctx: ssl.SSLContext) -> None:
    port = server.pop3s_port if tls == "implicit" else server.pop3_port
    session = Session.open(
        SessionOptions(
            host=server.host,
            port=port,
            username=user,
            tls=TlsMode(tls),
            ssl_context=ctx,
            timeout=10,
        )
    )
    try:
        session.login(PASSWORD)
        session.quit()
    finally:
        session.abort()


def client_files(ca: trustme.CA, tmp_path: Path, *, one_file: bool) -> tuple[Path, Path | None]:
    leaf = ca.issue_cert("popsync-client.example")
    cert = tmp_path / "client.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    if one_file:
        cert.write_bytes(cert.read_bytes() + leaf.private_key_pem.bytes())
        cert.chmod(0o600)
        return cert, None
    key = tmp_path / "client.key"
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
@pytest.mark.parametrize("one_file", [False, True], ids=["key-file", "cert-holds-key"])
def test_a_client_certificate_lets_us_in(
    cert_dovecot: SaslDovecot,
    tls_ca: trustme.CA,
    ca_file: Path,
    tmp_path: Path,
    tls: str,
    one_file: bool,
) -> None:
    cert, key = client_files(tls_ca, tmp_path, one_file=one_file)
    login(cert_dovecot, "carol", tls, make_ssl_context(ca_file, client_cert=cert, client_key=key))


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_without_a_client_certificate_dovecot_refuses(
    cert_dovecot: SaslDovecot, ca_file: Path, tls: str
) -> None:
    with pytest.raises(ServerError, match="didn't present valid SSL certificate") as info:
        login(cert_dovecot, "carol", tls, make_ssl_context(ca_file))
    assert not info.value.temporary  # "-ERR [AUTH] ...": the user must act
    assert PASSWORD not in str(info.value)


def test_a_certificate_from_another_ca_is_refused(
    cert_dovecot: SaslDovecot, ca_file: Path, tmp_path: Path
) -> None:
    cert, key = client_files(trustme.CA(), tmp_path, one_file=False)
    with pytest.raises(ServerError, match="didn't present valid SSL certificate") as info:
        login(
            cert_dovecot,
            "carol",
            "implicit",
            make_ssl_context(ca_file, client_cert=cert, client_key=key),
        )
    assert not info.value.temporary


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_dovecot_pinned_without_a_ca(
    plain_dovecot: SaslDovecot, server_cert: trustme.LeafCert, tls: str
) -> None:
    der = ssl.PEM_cert_to_DER_cert(server_cert.cert_chain_pems[0].bytes().decode())
    login(plain_dovecot, "dave", tls, make_ssl_context(pins=(cert_fingerprint(der),)))


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_dovecot_with_the_wrong_pin_is_refused_before_login(
    plain_dovecot: SaslDovecot, ca_file: Path, tls: str
) -> None:
    wrong = "sha256:" + ":".join(["5A"] * 32)
    before = unauthenticated(plain_dovecot)
    with pytest.raises(SecurityError, match="does not match tls_fingerprint") as info:
        login(plain_dovecot, "dave", tls, make_ssl_context(pins=(wrong,)))
    assert not info.value.temporary
    assert wrong in str(info.value)
    # Dovecot saw the connection end without a login attempt.
    wait_until(lambda: unauthenticated(plain_dovecot) > before or None, timeout=10)


def unauthenticated(server: SaslDovecot) -> int:
    log = server.log_file.read_text("utf-8", "replace")
    return log.count("(no auth attempts")


# ------------------------------------------------------------ the IMAP target


@pytest.mark.parametrize("pin_ok", [True, False], ids=["pin", "wrong-pin"])
def test_the_imap_target_takes_a_pin_too(
    dovecot_delivery: DeliveryDovecot,
    dovecot_imap: DeliveryMailbox,
    server_cert: trustme.LeafCert,
    tmp_path: Path,
    pin_ok: bool,
) -> None:
    der = ssl.PEM_cert_to_DER_cert(server_cert.cert_chain_pems[0].bytes().decode())
    pin = cert_fingerprint(der) if pin_ok else "sha256:" + "77" * 32
    imap = {
        "host": dovecot_delivery.host,
        "port": dovecot_delivery.imaps_port,
        "tls": "implicit",
        "username": dovecot_imap.user,
        "password": dovecot_imap.password,
        "tls_fingerprint": pin,
    }
    store = MailStore([b"Subject: pinned\r\n\r\nbody\r\n"])
    with POP3TestServer(store) as pop3:
        config = write_config(
            tmp_path, [{"name": "mig", "port": pop3.port, "maildir": None, "imap": imap}]
        )
        lines = config.read_text().splitlines(keepends=True)
        config.write_text("".join(line for line in lines if "maildir: null" not in line))
        done = run_sync(config)
    stored = dovecot_delivery.stored_messages(dovecot_imap.user, "INBOX")
    if pin_ok:
        assert done.returncode == 0, done.stderr
        assert len(stored) == 1
    else:
        assert done.returncode == 1
        assert "does not match tls_fingerprint" in done.stderr
        assert "Traceback" not in done.stderr
        assert stored == []
