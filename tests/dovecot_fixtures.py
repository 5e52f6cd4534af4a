"""Pytest fixtures for interop tests against a real Dovecot POP3 server.

Registered from ``tests/conftest.py`` with ``pytest_plugins``.

* ``dovecot`` (session): one private Dovecot on 127.0.0.1 with TLS from the
  test CA (``cert_files``): plain POP3 with STLS on ``pop3_port``, implicit TLS
  on ``pop3s_port``.  It starts with no users.
* ``dovecot_mailbox`` (function): a fresh user with a random password and an
  empty Maildir on that server, so no test sees another's mail.

Every test that uses either fixture gets the ``dovecot`` marker, so
``-m "not dovecot"`` leaves them out.

Policy when Dovecot is not installed: skip with the reason, except when the
environment variable ``CI`` is set (non-empty): then fail, because in CI these
tests must run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.dovecot import DOVECOT_BINARY, Dovecot, Mailbox

_FIXTURES = frozenset({"dovecot", "dovecot_mailbox"})


def require_dovecot(binary: Path = DOVECOT_BINARY) -> None:
    """Skip the calling test if Dovecot is missing -- or fail it when ``CI`` is set."""
    ok, reason = Dovecot.available(binary)
    if ok:
        return
    message = f"real Dovecot not available: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so interop tests must run)", pytrace=False)
    pytest.skip(message)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.dovecot)


@pytest.fixture(scope="session")
def dovecot(
    tmp_path_factory: pytest.TempPathFactory, cert_files: tuple[Path, Path]
) -> Iterator[Dovecot]:
    """A running private Dovecot with STLS and pop3s, shared by the session."""
    require_dovecot()
    chain, key = cert_files
    server = Dovecot(tmp_path_factory.mktemp("dovecot"), users={}, cert_file=chain, key_file=key)
    with server:
        yield server


@pytest.fixture
def dovecot_mailbox(dovecot: Dovecot) -> Iterator[Mailbox]:
    """A new, empty mailbox (user + password) on the shared Dovecot."""
    if not dovecot.running:
        pytest.fail("the shared Dovecot has died:\n" + dovecot.log_tail(), pytrace=False)
    mailbox = dovecot.new_mailbox("t")
    yield mailbox
    mailbox.clear()  # keeps the session's disk use flat; the user stays unused
