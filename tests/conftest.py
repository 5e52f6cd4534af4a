"""Shared fixtures: a private certificate authority for TLS tests.

Fixtures specific to one area live in that area's helper module (for
example ``tests/dovecot_fixtures.py``), registered through ``pytest_plugins``.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

pytest_plugins = ["tests.dovecot_fixtures", "tests.postgres_fixtures", "tests.bodypass_fixtures"]


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throw-away CA; its certificates are valid for 127.0.0.1, ::1 and localhost."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    return tls_ca.issue_cert("127.0.0.1", "::1", "localhost")


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA certificate as a PEM file, as a user would name it in ``ca_file``."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_ssl_context(server_cert: trustme.LeafCert) -> ssl.SSLContext:
    """Server-side TLS context for the test POP3 server."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def cert_files(
    server_cert: trustme.LeafCert, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    """(certificate chain PEM, private key PEM) files, for servers such as Dovecot."""
    d = tmp_path_factory.mktemp("cert")
    chain, key = d / "cert.pem", d / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    server_cert.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    yield chain, key
