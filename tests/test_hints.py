"""Where users go wrong, popsync says what to change.

A TLS mode that does not match the port (implicit TLS on a plain POP3 port,
STLS on a port that expects TLS at once, RFC 8314 §3.1) and a certificate
from a CA the system does not know each fail with one line that names the
fix, and as permanent errors: retrying cannot help, so the daemon must not.

Real conditions: the project's POP3 test server on loopback, plain or with
implicit TLS from the test CA, and the ``popsync`` CLI as a real process.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from popsync.transport import PROBE_WAIT
from tests.helpers import maildir_contents, run_sync, write_config

pytestmark = pytest.mark.timeout(60)

#: The account's ``timeout`` where "fails fast" must mean well before it.
LONG_TIMEOUT = 30


@pytest.fixture
def plain() -> Iterator[POP3TestServer]:
    with POP3TestServer(MailStore(generate_messages(2, 300, seed=1))) as srv:
        yield srv


@pytest.fixture
def implicit(server_ssl_context: ssl.SSLContext) -> Iterator[POP3TestServer]:
    store = MailStore(generate_messages(2, 300, seed=1))
    with POP3TestServer(store, tls="implicit", ssl_context=server_ssl_context) as srv:
        yield srv


def sync(tmp_path: Path, **account: Any) -> tuple[list[str], float]:
    """``popsync sync`` of one account "a"; its stderr lines and wall time."""
    cfg = write_config(tmp_path, [{"name": "a", "delete_after_days": 0, **account}])
    started = time.monotonic()
    done = run_sync(cfg)
    seconds = time.monotonic() - started
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    return done.stderr.splitlines(), seconds


def test_implicit_tls_on_a_plain_port_says_so_and_is_permanent(
    tmp_path: Path, plain: POP3TestServer, ca_file: Path
) -> None:
    lines, _ = sync(tmp_path, port=plain.port, tls="implicit", ca_file=str(ca_file))
    p = plain.port
    assert lines == [
        f"popsync: a: FAILED (needs attention): 127.0.0.1:{p}: port {p} speaks plain POP3: "
        "use tls: starttls, or port 995"
    ]
    assert len(plain.store) == 2


def test_starttls_on_an_implicit_tls_port_fails_fast_and_is_permanent(
    tmp_path: Path, implicit: POP3TestServer, ca_file: Path
) -> None:
    lines, seconds = sync(
        tmp_path, port=implicit.port, tls="starttls", ca_file=str(ca_file), timeout=LONG_TIMEOUT
    )
    p = implicit.port
    assert lines == [
        f"popsync: a: FAILED (needs attention): 127.0.0.1:{p}: port {p} expects TLS at once: "
        "use tls: implicit"
    ]
    assert seconds < 2 * PROBE_WAIT + 3, f"took {seconds:.1f} s"  # + interpreter start-up


def test_a_slow_plain_greeting_still_works_after_the_probe(tmp_path: Path) -> None:
    # The greeting comes after the probe window (min(timeout, 5 s) = 2 s):
    # the probe, on a second connection, finds no TLS, and the first
    # connection goes on to take the greeting (which the probe's own wait
    # gave time to come: a timeout is never shortened by the probe).
    messages = list(generate_messages(2, 300, seed=2))
    store = MailStore(messages)
    with POP3TestServer(store, faults=Faults(stall={"GREETING": 2.5})) as srv:
        maildir = tmp_path / "Maildir" / "a"
        cfg = write_config(tmp_path, [{"name": "a", "port": srv.port, "timeout": 2}])
        done = run_sync(cfg)
    assert done.returncode == 0, done.stderr
    assert sum(maildir_contents(maildir).values()) == 2


def test_a_certificate_from_an_unknown_ca_mentions_ca_file(
    tmp_path: Path, implicit: POP3TestServer
) -> None:
    lines, _ = sync(tmp_path, port=implicit.port, tls="implicit")  # no ca_file
    (line,) = lines
    assert line.startswith("popsync: a: FAILED (needs attention): ")
    assert "certificate not trusted: " in line
    assert line.endswith("; if this server uses its own CA, give it with ca_file: PATH")
    assert len(implicit.store) == 2


# --------------------------------------------------------------------------
# The Maildir: a missing parent is a typo until the account says create: true


def test_a_maildir_whose_parent_is_missing_is_an_error_unless_create_is_true(
    tmp_path: Path, plain: POP3TestServer
) -> None:
    maildir = tmp_path / "Mial" / "home"  # the typo: "Mial" does not exist
    lines, _ = sync(tmp_path, port=plain.port, maildir=str(maildir))
    assert lines == [
        f"popsync: a: FAILED (needs attention): Maildir {maildir}: parent directory "
        f"{maildir.parent} does not exist; create it, or set create: true"
    ]
    assert not maildir.parent.exists()
    assert len(plain.store) == 2

    cfg = write_config(tmp_path, [{"name": "a", "port": plain.port, "maildir": str(maildir)}])
    assert run_sync(cfg).returncode == 1  # the same without create: true ...
    cfg = write_config(
        tmp_path, [{"name": "a", "port": plain.port, "maildir": str(maildir), "create": True}]
    )
    done = run_sync(cfg)  # ... and with it, the Maildir and its parents are made
    assert done.returncode == 0, done.stderr
    assert sum(maildir_contents(maildir).values()) == 2


def test_a_maildir_in_an_existing_directory_is_still_created(
    tmp_path: Path, plain: POP3TestServer
) -> None:
    maildir = tmp_path / "home"  # tmp_path exists: only the Maildir is new
    cfg = write_config(tmp_path, [{"name": "a", "port": plain.port, "maildir": str(maildir)}])
    done = run_sync(cfg)
    assert done.returncode == 0, done.stderr
    assert sum(maildir_contents(maildir).values()) == 2


def test_a_maildir_under_a_file_is_a_permanent_error(tmp_path: Path, plain: POP3TestServer) -> None:
    (tmp_path / "Mail").write_text("not a directory\n")
    maildir = tmp_path / "Mail" / "home"
    for create in (False, True):
        lines, _ = sync(tmp_path, port=plain.port, maildir=str(maildir), create=create)
        (line,) = lines
        assert line.startswith("popsync: a: FAILED (needs attention): "), line
        assert str(tmp_path / "Mail") in line and "not a directory" in line
    assert len(plain.store) == 2
