"""Pytest fixtures for interop tests against a real Dovecot.

Registered from ``tests/conftest.py`` with ``pytest_plugins``.

POP3 (the server popsync fetches from):

* ``dovecot`` (session): one private Dovecot on 127.0.0.1 with TLS from the
  test CA (``cert_files``): plain POP3 with STLS on ``pop3_port``, implicit TLS
  on ``pop3s_port``.  It starts with no users.
* ``dovecot_mailbox`` (function): a fresh user with a random password and an
  empty Maildir on that server, so no test sees another's mail.

Delivery targets (where popsync delivers to), see
``tests/servers/dovecot_delivery.py`` for exactly what each stores and refuses:

* ``dovecot_delivery`` (session): a second private Dovecot that also serves
  LMTP (unix socket and loopback TCP), IMAP (plain with STARTTLS, and implicit
  TLS, certificates from the test CA) and dovecot-lda.  For users of your own,
  e.g. over quota: ``dovecot_delivery.new_mailbox(quota_bytes=1)`` (LMTP 552,
  APPEND ``NO [OVERQUOTA]``, dovecot-lda exit 77), with ``quota_tempfail=True``
  (LMTP 452, dovecot-lda exit 75).
* ``dovecot_lmtp``, ``dovecot_imap``, ``dovecot_lda`` (function): each a fresh
  :class:`~tests.servers.dovecot_delivery.DeliveryMailbox` on that server.
  Configure ``lmtp: <lmtp_address>`` with ``lmtp_recipient: <recipient>``;
  ``imap:`` with ``host``, ``imap_port``/``imaps_port``, ``user``,
  ``password``; ``mda: <lda_command_line>``.  Read back with
  ``lmtp_messages()`` (LMTP's ``Return-Path`` removed) or
  ``stored_messages(mailbox)``; ``imap_login()`` gives an ``imaplib`` client.

Every test that uses any of these fixtures gets the ``dovecot`` marker, so
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
from tests.servers.dovecot_delivery import (
    DeliveryDovecot,
    DeliveryMailbox,
    reachable_workdir,
    remove_workdir,
)

_FIXTURES = frozenset(
    {
        "dovecot",
        "dovecot_mailbox",
        "dovecot_delivery",
        "dovecot_lmtp",
        "dovecot_imap",
        "dovecot_lda",
    }
)


def require_dovecot(binary: Path = DOVECOT_BINARY, *, delivery: bool = False) -> None:
    """Skip the calling test if Dovecot is missing -- or fail it when ``CI`` is set.

    With *delivery*, LMTP, IMAP and dovecot-lda are required too.
    """
    server = DeliveryDovecot if delivery else Dovecot
    ok, reason = server.available(binary)
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


@pytest.fixture(scope="session")
def dovecot_delivery(
    tmp_path_factory: pytest.TempPathFactory, cert_files: tuple[Path, Path]
) -> Iterator[DeliveryDovecot]:
    """A running private Dovecot with LMTP, IMAP (+TLS) and dovecot-lda; no users."""
    require_dovecot(delivery=True)
    chain, key = cert_files
    # As root, mail is handled as `nobody`, which must reach the Maildirs
    # without a chroot; pytest's own temporary root is private (0700).
    as_root = os.geteuid() == 0
    workdir = reachable_workdir() if as_root else tmp_path_factory.mktemp("dovecot-delivery")
    try:
        with DeliveryDovecot(workdir, users={}, cert_file=chain, key_file=key) as server:
            yield server
    finally:
        if as_root:
            remove_workdir(workdir)


def _fresh_mailbox(server: DeliveryDovecot, prefix: str) -> Iterator[DeliveryMailbox]:
    if not server.running:
        pytest.fail("the shared delivery Dovecot has died:\n" + server.log_tail(), pytrace=False)
    mailbox = server.new_mailbox(prefix)
    yield mailbox
    mailbox.clear()


@pytest.fixture
def dovecot_lmtp(dovecot_delivery: DeliveryDovecot) -> Iterator[DeliveryMailbox]:
    """A new, empty mailbox to deliver to over LMTP (``lmtp_address``, ``recipient``)."""
    yield from _fresh_mailbox(dovecot_delivery, "lmtp")


@pytest.fixture
def dovecot_imap(dovecot_delivery: DeliveryDovecot) -> Iterator[DeliveryMailbox]:
    """A new, empty mailbox to APPEND to (``imap_port``/``imaps_port``, ``user``, ``password``)."""
    yield from _fresh_mailbox(dovecot_delivery, "imap")


@pytest.fixture
def dovecot_lda(dovecot_delivery: DeliveryDovecot) -> Iterator[DeliveryMailbox]:
    """A new, empty mailbox to deliver to with dovecot-lda (``lda_command``)."""
    yield from _fresh_mailbox(dovecot_delivery, "lda")
