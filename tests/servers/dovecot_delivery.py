"""A private, real Dovecot that also takes mail in: LMTP, IMAP and dovecot-lda.

Contract
--------
:class:`DeliveryDovecot` is a :class:`~tests.servers.dovecot.Dovecot` (same
scratch layout, users, POP3 listeners, process handling and stop guarantees)
that also serves:

* **LMTP** (RFC 2033) on the unix socket :attr:`DeliveryDovecot.lmtp_socket`
  (``<workdir>/lmtp``, mode 0666; :attr:`~DeliveryDovecot.lmtp_address` is
  ``unix:<path>``) and on a free loopback TCP port
  (:attr:`~DeliveryDovecot.lmtp_tcp_address`, ``127.0.0.1:<port>``).  LHLO
  offers ``8BITMIME CHUNKING ENHANCEDSTATUSCODES PIPELINING``.
  ``RCPT TO:<user>`` and ``RCPT TO:<user@any.domain>`` both reach the test
  user ``user``; an unknown user gets ``550 5.1.1 <x> User doesn't exist: x``
  at RCPT.
* **IMAP** (RFC 3501) on free loopback ports: plain on
  :attr:`~DeliveryDovecot.imap_port` (LOGIN and AUTHENTICATE allowed without
  TLS; STARTTLS offered when a certificate is given) and implicit TLS on
  :attr:`~DeliveryDovecot.imaps_port` (only with a certificate).  Before login
  Dovecot 2.3 offers ``IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE
  LITERAL+ AUTH=PLAIN AUTH=LOGIN`` (plus ``STARTTLS``); after login also
  ``UIDPLUS`` (APPEND answers ``[APPENDUID <validity> <uid>]``),
  ``MULTIAPPEND``, ``CATENATE``, ``BINARY``, ``MOVE``, ``QUOTA``, ``NAMESPACE``
  and more; not ``LITERAL-``.  APPEND to a mailbox that does not exist answers
  ``NO [TRYCREATE]``.
* **dovecot-lda**, Dovecot's MDA (:meth:`DeliveryDovecot.lda_command`): it
  reads one message on stdin and saves it into the same Maildirs, through
  this server's config and auth socket (so the server must be running).

What Dovecot stores
-------------------
Mail is stored with LF line ends (CRLF becomes LF), otherwise as given.

* IMAP APPEND stores the literal exactly (a missing final newline stays
  missing).
* LMTP prepends ``Return-Path: <MAIL FROM address>`` always (Dovecot 2.3 has
  no setting to turn it off) and keeps a ``Return-Path`` the message already
  had.  With ``trace_headers=True`` it also prepends, as a production Dovecot
  does, ``Delivered-To: <RCPT TO address>`` (only when the transaction had one
  recipient; ``lmtp_hdr_delivery_address``) and a folded ``Received: from
  <LHLO name> by <host> with LMTP id ... (envelope-from <...>) for <rcpt>;
  <date>`` (``lmtp_add_received_header``).  Both are off by default here.
  :func:`strip_lmtp_headers` (or :meth:`DeliveryMailbox.lmtp_messages`)
  removes exactly what was prepended.  DATA always ends in CRLF, so a message
  without a final newline gains one.
* dovecot-lda prepends nothing (not even with ``-f``), keeps a missing final
  newline, but drops a first line starting ``From `` (it takes it for an mbox
  separator); ``From `` lines later in the body are kept.

Quotas and refusals
-------------------
Every user has a Maildir++ quota (the ``quota`` plugin), unlimited unless
:meth:`DeliveryDovecot.add_user` is given ``quota_bytes``.  A message that
would take the mailbox over it is refused:

* LMTP answers that recipient, after DATA, ``552 5.2.2 <rcpt> Quota exceeded
  (mailbox for user is full)``, or ``452 4.2.2 ...`` for a user added with
  ``quota_tempfail=True`` (the per-user ``quota_full_tempfail`` setting).
* IMAP APPEND answers ``NO [OVERQUOTA] Quota exceeded (mailbox for user is
  full)``.
* dovecot-lda, run with ``-e`` (always, here: without it Dovecot would try to
  send a bounce through ``sendmail``), writes ``Quota exceeded (mailbox for
  user is full)`` to stderr and exits 77 (EX_NOPERM), or 75 (EX_TEMPFAIL) for
  a ``quota_tempfail`` user; an unknown user exits 67 (EX_NOUSER) with no
  output.

Running as root
---------------
As root, mail belongs to ``nobody`` (see :mod:`tests.servers.dovecot`).  POP3
and IMAP chroot into the mail root before dropping root, but LMTP and
dovecot-lda only change their (effective) uid, so ``nobody`` itself must be
able to reach the Maildirs: every directory above ``<workdir>`` must be
searchable by others.  pytest's ``/tmp/pytest-of-root`` is mode 0700, so
:func:`reachable_workdir` makes a scratch directory directly under the system
temporary directory instead; the constructor checks this and says so.  Run as
a normal user, everything runs as that user and any *workdir* will do.

This module imports no pytest.  It is not thread-safe.
"""

from __future__ import annotations

import functools
import imaplib
import os
import re
import secrets
import shlex
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.servers.dovecot import (
    DOVECOT_BINARY,
    DOVECOT_LIBEXEC,
    HOST,
    Dovecot,
    DovecotError,
    Listener,
    Mailbox,
    read_maildir,
)

__all__ = [
    "LDA_BINARY",
    "LDA_EX_NOPERM",
    "LDA_EX_NOUSER",
    "LDA_EX_TEMPFAIL",
    "DeliveryDovecot",
    "DeliveryMailbox",
    "reachable_workdir",
    "remove_workdir",
    "strip_lmtp_headers",
]

#: Dovecot's MDA, as Debian installs it (package dovecot-core).
LDA_BINARY = DOVECOT_LIBEXEC / "dovecot-lda"
#: dovecot-lda's exit statuses (sysexits.h).
LDA_EX_NOUSER = 67
LDA_EX_TEMPFAIL = 75
LDA_EX_NOPERM = 77

#: A Maildir++ folder name (``.<name>`` under the Maildir): letters, digits, ``._-``.
_FOLDER_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_PROBE_TIMEOUT = 2.0
_CLIENT_TIMEOUT = 10.0


def reachable_workdir(prefix: str = "popsync-dovecot-") -> Path:
    """A new scratch directory that the mail account can reach when we run as root.

    Made directly under the system temporary directory (``/tmp``, mode 1777)
    with mode 0711: others may pass through, not list it.  The caller removes
    it (:func:`remove_workdir`).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


def remove_workdir(path: Path) -> None:
    """Remove a scratch directory made by :func:`reachable_workdir`, mail and all."""
    shutil.rmtree(path, ignore_errors=True)


def _unreachable_ancestor(path: Path) -> Path | None:
    """The first directory above and including *path* that others cannot search."""
    for directory in [*reversed(path.parents), path]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            return directory
    return None


class DeliveryDovecot(Dovecot):
    """A :class:`Dovecot` that also serves LMTP, IMAP and dovecot-lda.

    Args:
        workdir: scratch directory, as for :class:`Dovecot`; when running as
            root, every directory above it must be searchable by others
            (use :func:`reachable_workdir`).
        users: initial users and passwords (default ``alice``/``secret``).
        cert_file: PEM chain; enables STLS/pop3s and STARTTLS/imaps.
        key_file: PEM key for *cert_file*.
        trace_headers: LMTP also prepends ``Delivered-To`` and ``Received``.
        binary: the Dovecot master binary.
        start_timeout: seconds :meth:`start` waits for every listener.

    Raises:
        DovecotError: as for :class:`Dovecot`, or running as root with a
            *workdir* the mail account cannot reach.
    """

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, str] | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        *,
        trace_headers: bool = False,
        binary: Path = DOVECOT_BINARY,
        start_timeout: float = 20.0,
    ) -> None:
        self.trace_headers = trace_headers
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            blocked = _unreachable_ancestor(workdir)
            if blocked is not None:
                raise DovecotError(
                    f"{blocked} is not searchable by others, so LMTP and dovecot-lda "
                    f"(running as the mail account) cannot reach {workdir}; "
                    "use reachable_workdir()"
                )
        super().__init__(
            workdir,
            users,
            cert_file,
            key_file,
            binary=binary,
            start_timeout=start_timeout,
        )
        self.lmtp_socket = self.workdir / "lmtp"

    # ------------------------------------------------------------------ info

    @staticmethod
    def available(binary: Path = DOVECOT_BINARY) -> tuple[bool, str]:
        """Whether Dovecot with POP3, LMTP, IMAP and dovecot-lda is installed."""
        ok, reason = Dovecot.available(binary)
        if not ok:
            return ok, reason
        hint = "install the Debian packages dovecot-lmtpd and dovecot-imapd (scripts/test.sh does)"
        for part in ("lmtp", "imap", "imap-login", "dovecot-lda"):
            if not (DOVECOT_LIBEXEC / part).exists():
                return False, f"{DOVECOT_LIBEXEC / part} missing; {hint}"
        return True, ""

    @property
    def lmtp_address(self) -> str:
        """The LMTP address as popsync's ``lmtp:`` key takes it: ``unix:<socket>``."""
        return f"unix:{self.lmtp_socket}"

    @property
    def lmtp_tcp_address(self) -> str:
        """LMTP over TCP on loopback, as popsync's ``lmtp:`` key takes it: ``host:port``.

        Raises:
            DovecotError: the server was never started.
        """
        return f"{HOST}:{self._port('lmtp')}"

    @property
    def imap_port(self) -> int:
        """The plain IMAP port (STARTTLS offered there when :attr:`tls`).

        Raises:
            DovecotError: the server was never started.
        """
        return self._port("imap")

    @property
    def imaps_port(self) -> int:
        """The implicit-TLS IMAP port.

        Raises:
            DovecotError: the server was never started, or has no certificate.
        """
        return self._port("imaps")

    def lda_command(self, user: str, *, sender: str | None = None) -> list[str]:
        """The argv that delivers a message read on stdin to *user* with dovecot-lda.

        ``-e`` makes a refusal an exit status (and a line on stderr) instead of
        a bounce sent through ``sendmail``.  *sender* (``-f``) sets the envelope
        sender; Dovecot adds no header for it.  *user* need not exist: an
        unknown user makes dovecot-lda exit 67.
        """
        argv = [str(LDA_BINARY), "-c", str(self.config_file), "-e", "-d", user]
        if sender is not None:
            argv += ["-f", sender]
        return argv

    # ----------------------------------------------------------------- users

    def add_user(
        self,
        user: str,
        password: str,
        *,
        userdb_fields: Mapping[str, str] | None = None,
        quota_bytes: int | None = None,
        quota_tempfail: bool = False,
    ) -> None:
        """Add a user, optionally with a storage quota of *quota_bytes*.

        Over that quota, LMTP and dovecot-lda refuse permanently, or
        temporarily with *quota_tempfail*; IMAP APPEND answers ``NO [OVERQUOTA]``.

        Raises:
            DovecotError: as :meth:`Dovecot.add_user`, or *quota_bytes* below 1
                (Dovecot reads 0 as "no limit").
        """
        fields = dict(userdb_fields or {})
        if quota_bytes is not None:
            if quota_bytes < 1:
                raise DovecotError(f"quota_bytes must be at least 1, not {quota_bytes}")
            fields["quota_rule"] = f"*:storage={quota_bytes}B"
        if quota_tempfail:
            fields["quota_full_tempfail"] = "yes"
        super().add_user(user, password, userdb_fields=fields)

    def new_mailbox(
        self,
        prefix: str = "user",
        *,
        quota_bytes: int | None = None,
        quota_tempfail: bool = False,
    ) -> DeliveryMailbox:
        """Add a user with a unique name and a random password; return its handle."""
        user = self._unique_user(prefix)
        self.add_user(
            user,
            secrets.token_urlsafe(12),
            quota_bytes=quota_bytes,
            quota_tempfail=quota_tempfail,
        )
        return DeliveryMailbox(self, user)

    # ------------------------------------------------------------------ mail

    def folder(self, user: str, mailbox: str = "INBOX") -> Path:
        """The Maildir++ directory of *mailbox*: the Maildir, or ``.<name>`` in it.

        Raises:
            DovecotError: unknown user, or a mailbox name this helper does not map.
        """
        maildir = self.maildir(user)
        if mailbox.upper() == "INBOX":
            return maildir
        if not _FOLDER_RE.fullmatch(mailbox):
            raise DovecotError(f"mailbox name not mapped by the test helper: {mailbox!r}")
        return maildir / f".{mailbox}"

    def stored_messages(self, user: str, mailbox: str = "INBOX") -> list[bytes]:
        """Messages in *mailbox* of *user* (``new/`` and ``cur/``), byte for byte,
        in delivery order; a mailbox never created is empty.

        Raises:
            DovecotError: unknown user.
        """
        return read_maildir(self.folder(user, mailbox))

    def create_folder(self, user: str, mailbox: str) -> None:
        """Create the (empty) mailbox *mailbox* for *user*, as IMAP CREATE would.

        Raises:
            DovecotError: unknown user, or a name :meth:`folder` does not map.
        """
        folder = self.folder(user, mailbox)
        for path in (folder, folder / "tmp", folder / "new", folder / "cur"):
            path.mkdir(mode=0o700, exist_ok=True)
            self._own(path)

    def imap_login(self, user: str, ssl_context: ssl.SSLContext | None = None) -> imaplib.IMAP4:
        """An IMAP client logged in as *user*: implicit TLS with *ssl_context*, else plain.

        Raises:
            DovecotError: unknown user.
            imaplib.IMAP4.error: the login failed.
        """
        password = self.users.get(user)
        if password is None:
            raise DovecotError(f"no such test user: {user!r}")
        client: imaplib.IMAP4
        if ssl_context is None:
            client = imaplib.IMAP4(HOST, self.imap_port, timeout=_CLIENT_TIMEOUT)
        else:
            client = imaplib.IMAP4_SSL(
                HOST, self.imaps_port, ssl_context=ssl_context, timeout=_CLIENT_TIMEOUT
            )
        try:
            client.login(user, password)
        except BaseException:
            client.shutdown()
            raise
        return client

    # ---------------------------------------------------------------- config

    def _protocols(self) -> tuple[str, ...]:
        return (*super()._protocols(), "lmtp", "imap")

    def _listeners(self) -> tuple[Listener, ...]:
        ours = [
            Listener("lmtp", b"220 ", implicit_tls=False),
            Listener("imap", b"* OK", implicit_tls=False),
        ]
        if self.tls:
            ours.append(Listener("imaps", b"* OK", implicit_tls=True))
        return (*super()._listeners(), *ours)

    def _readiness_probes(self) -> list[tuple[str, Callable[[], bool]]]:
        lmtp = (f"LMTP on {self.lmtp_socket}", functools.partial(_lmtp_greets, self.lmtp_socket))
        return [*super()._readiness_probes(), lmtp]

    def _extra_config(self) -> str:
        as_root = os.geteuid() == 0
        login_chroot = "" if as_root else "  chroot =\n"
        imaps = (
            "  inet_listener imaps {\n"
            f"    address = {HOST}\n"
            f"    port = {self.imaps_port}\n"
            "    ssl = yes\n"
            "  }\n"
            if self.tls
            else ""
        )
        trace = "yes" if self.trace_headers else "no"
        delivery_address = "final" if self.trace_headers else "none"
        return f"""
# --- tests/servers/dovecot_delivery.py: LMTP, IMAP, dovecot-lda, quota.
# "user@domain" and "user" are the same test user.
auth_username_format = %n
mail_plugins = $mail_plugins quota
plugin {{
  # Maildir++ quota; a user's limit comes from the userdb field quota_rule.
  quota = maildir:User quota
}}
lmtp_add_received_header = {trace}
lmtp_hdr_delivery_address = {delivery_address}
service lmtp {{
  unix_listener {self.lmtp_socket} {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = {HOST}
    port = {self._port("lmtp")}
  }}
}}
protocol imap {{
  mail_plugins = $mail_plugins imap_quota
  mail_max_userip_connections = 100
}}
service imap-login {{
{login_chroot}\
  inet_listener imap {{
    address = {HOST}
    port = {self.imap_port}
  }}
{imaps}\
  service_count = 0
  process_min_avail = 1
}}
"""


def _lmtp_greets(path: Path) -> bool:
    """Whether the LMTP socket at *path* accepts a connection and greets ``220``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_PROBE_TIMEOUT)
            sock.connect(str(path))
            return sock.recv(512).startswith(b"220 ")
    except OSError:
        return False


def strip_lmtp_headers(stored: bytes, *, trace_headers: bool = False) -> bytes:
    """*stored* (a message as Dovecot's LMTP saved it) without what LMTP prepended.

    That is exactly one ``Return-Path:`` line, and with *trace_headers* also a
    ``Delivered-To:`` line (Dovecot adds it only when the transaction had one
    recipient) and a folded ``Received: ... with LMTP`` field.  Fields the
    message itself started with (its own ``Return-Path`` say) are kept.

    Raises:
        DovecotError: *stored* does not start with those fields.
    """
    rest = _strip_field(stored, b"Return-Path: <")
    if trace_headers:
        if rest.startswith(b"Delivered-To: "):
            rest = _strip_field(rest, b"Delivered-To: ")
        received_end = _field_end(rest)
        if not rest.startswith(b"Received: ") or b" with LMTP\n" not in rest[:received_end]:
            raise DovecotError(f"no LMTP Received field where expected: {rest[:200]!r}")
        rest = rest[received_end:]
    return rest


def _strip_field(data: bytes, start: bytes) -> bytes:
    if not data.startswith(start):
        raise DovecotError(f"expected a field starting {start!r}: {data[:200]!r}")
    return data[_field_end(data) :]


def _field_end(data: bytes) -> int:
    """Offset just past the header field that starts *data*, continuation lines included."""
    end = data.find(b"\n") + 1
    while end and data[end : end + 1] in (b" ", b"\t"):
        end = data.find(b"\n", end) + 1
    if end <= 0:
        raise DovecotError(f"unterminated header field: {data[:200]!r}")
    return end


@dataclass(frozen=True, slots=True)
class DeliveryMailbox(Mailbox):
    """One user of a :class:`DeliveryDovecot`, as handed to a single test."""

    server: DeliveryDovecot

    @property
    def recipient(self) -> str:
        """An address for RCPT TO; the bare user name works too."""
        return f"{self.user}@example.org"

    @property
    def lmtp_address(self) -> str:
        return self.server.lmtp_address

    @property
    def lmtp_tcp_address(self) -> str:
        return self.server.lmtp_tcp_address

    @property
    def imap_port(self) -> int:
        return self.server.imap_port

    @property
    def imaps_port(self) -> int:
        return self.server.imaps_port

    @property
    def lda_command(self) -> list[str]:
        """dovecot-lda's argv for this user (see :meth:`DeliveryDovecot.lda_command`)."""
        return self.server.lda_command(self.user)

    @property
    def lda_command_line(self) -> str:
        """:attr:`lda_command` as one shell-quoted line, e.g. for ``mda:``."""
        return shlex.join(self.lda_command)

    def stored_messages(self, mailbox: str = "INBOX") -> list[bytes]:
        return self.server.stored_messages(self.user, mailbox)

    def lmtp_messages(self) -> list[bytes]:
        """The INBOX as LMTP was given it: :func:`strip_lmtp_headers` on each message.

        Raises:
            DovecotError: a message lacks the fields LMTP prepends.
        """
        trace = self.server.trace_headers
        return [strip_lmtp_headers(m, trace_headers=trace) for m in self.stored_messages()]

    def create_folder(self, mailbox: str) -> None:
        self.server.create_folder(self.user, mailbox)

    def imap_login(self, ssl_context: ssl.SSLContext | None = None) -> imaplib.IMAP4:
        """A logged-in IMAP client: over implicit TLS with *ssl_context*, else plain."""
        return self.server.imap_login(self.user, ssl_context)
