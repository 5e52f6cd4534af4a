"""A private, real Dovecot POP3 server for interop tests and benchmarks.

Contract
--------
:class:`Dovecot` runs Debian's ``dovecot-pop3d`` (``/usr/sbin/dovecot``) in the
foreground as a child process, with *everything* it touches under one scratch
directory chosen by the caller: its own config file, ``base_dir``,
``state_dir``, log file, the user database (one passwd-file per user, so a
user added while Dovecot runs is known at once) and the users' Maildirs.
Nothing of the system's Dovecot configuration is read or changed.

Invariants
----------
* It listens on ``127.0.0.1`` only, on two free ports picked at start:
  plain POP3 (which also offers STLS when a certificate is given) and
  implicit TLS (pop3s, only with a certificate).
* CAPA always offers ``TOP``, ``UIDL``, ``USER``, ``PIPELINING`` and
  ``SASL PLAIN LOGIN``; plaintext authentication is allowed on the plain port
  (tests exercise that path on purpose).
* Failed logins do not slow later ones: Dovecot's per-IP auth penalty (2 s
  and doubling) is off.  A failed login itself still takes up to 0.5 s, as
  Dovecot answers failures in batches twice a second.
* The UIDL format is pinned (:data:`UIDL_FORMAT`), so a server upgrade cannot
  silently change the unique-ids tests rely on.
* After :meth:`Dovecot.stop` (or leaving the ``with`` block, or interpreter
  exit) no process of this instance is left: the master runs in its own
  process group, is sent SIGTERM, then the whole group SIGKILL.  The master
  also gets SIGTERM from the kernel if the process (strictly: the thread)
  that started it dies first, so a SIGKILLed test run leaves nothing behind.
* Mail durability on the *server* side is not under test: ``mail_fsync =
  never`` keeps the server fast; it is the client's durability we test.

Users and file ownership
------------------------
Run as a normal user, every Dovecot process and every mail file belongs to
that user.  Run as root (CI does), Dovecot refuses to serve mail as root (its
``pop3`` process is built with "disallow root"), so mail is served as the
unprivileged ``nobody`` account: the Maildirs and the message files added here
are owned by ``nobody``.  Because a root scratch directory usually sits under
a ``0700`` parent (``/tmp/pytest-of-root``) that ``nobody`` cannot enter, the
mail process chroots into ``<workdir>/mail`` (Dovecot's ``home=/chroot/./home``
form) before it drops root, and the auth process runs as root to read the
passwd-file.  Login processes still run as ``dovenull`` inside Dovecot's own
``login`` chroot.

Delivery
--------
:meth:`Dovecot.add_message` follows the Maildir protocol: write into ``tmp/``,
then rename into ``new/``.  File names carry ``,S=<size>,W=<size with CRLF>``
like Dovecot's own deliveries, so LIST needs no file reads, and a strictly
increasing timestamp, so Dovecot's UID (and UIDL) order is delivery order and
:meth:`Dovecot.stored_messages` returns messages in that same order.

Extending
---------
A subclass serves more (``tests/servers/dovecot_delivery.py`` adds LMTP, IMAP
and dovecot-lda) through :meth:`Dovecot._protocols`,
:meth:`Dovecot._listeners`, :meth:`Dovecot._readiness_probes` and
:meth:`Dovecot._extra_config`; a user's userdb extra fields (``add_user``'s
*userdb_fields*) override settings for that user alone.

This module imports no pytest: the benchmarks use it too.  It is not
thread-safe; drive one instance from one thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import grp
import os
import pwd
import re
import secrets
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

__all__ = [
    "DOVECOT_BINARY",
    "DOVECOT_LIBEXEC",
    "HOST",
    "UIDL_FORMAT",
    "Dovecot",
    "DovecotError",
    "Listener",
    "Mailbox",
    "greets",
    "read_maildir",
]

#: The Debian package's master binary.
DOVECOT_BINARY = Path("/usr/sbin/dovecot")
#: Where Debian keeps the per-protocol executables the master starts.
DOVECOT_LIBEXEC = Path("/usr/lib/dovecot")
#: The only address the test server ever listens on.
HOST = "127.0.0.1"
#: Dovecot's default, pinned: 8 hex digits of the IMAP UID, then of UIDVALIDITY.
UIDL_FORMAT = "%08Xu%08Xv"

#: Account that serves mail when we run as root (Dovecot refuses root for mail).
_ROOT_MAIL_ACCOUNT = "nobody"
#: Dovecot's own unprivileged accounts, created by the Debian package.
_ROOT_INTERNAL_USER = "dovecot"
_ROOT_LOGIN_USER = "dovenull"

#: Bounded start: how long to wait for both ports to greet, and how often to
#: retry when a freshly picked port was taken by someone else in the meantime.
_DEFAULT_START_TIMEOUT = 20.0
_PORT_ATTEMPTS = 5
_STOP_TIMEOUT = 10.0
_PROBE_TIMEOUT = 2.0
_LOG_TAIL_LINES = 40

#: User names become passwd-file keys and directory names; passwords a
#: passwd-file field.  Keep both to what cannot break either format.
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BAD_PASSWORD_CHARS = frozenset(":\r\n\0")
#: Userdb extra fields: a setting name, and a value without blanks (the
#: passwd-file separates fields with spaces).
_FIELD_RE = re.compile(r"[a-z][a-z0-9_]*")
_FIELD_VALUE_RE = re.compile(r"[^\s]+")
#: Characters that would need quoting in dovecot.conf; the scratch paths must not
#: contain them (pytest's tmp paths never do).
_SAFE_PATH_RE = re.compile(r"[A-Za-z0-9/._+-]+")
#: ``<seconds>.M<microseconds>P...``: the delivery stamp in our file names.
_STAMP_RE = re.compile(r"(\d+)\.M(\d+)P")

_PR_SET_PDEATHSIG = 1


class DovecotError(RuntimeError):
    """The test Dovecot could not be set up, started, or used as asked.

    This is a test-harness failure, not a popsync error, so it does not derive
    from :class:`popsync.errors.PopsyncError`.
    """


@dataclass(frozen=True, slots=True)
class _Account:
    """The Unix account that owns the mail, and the accounts Dovecot runs as."""

    mail_uid: int
    mail_gid: int
    internal_user: str
    internal_group: str
    login_user: str
    as_root: bool


class Listener(NamedTuple):
    """A TCP listener: its name in ``dovecot.conf`` and how it greets."""

    name: str
    greeting: bytes
    implicit_tls: bool


def _pick_accounts() -> _Account:
    """Choose who serves the mail, depending on whether we run as root.

    Raises:
        DovecotError: as root, when ``nobody`` or Dovecot's own accounts are missing.
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        group = _group_name(os.getegid())
        return _Account(os.geteuid(), os.getegid(), me.pw_name, group, me.pw_name, as_root=False)
    try:
        mail = pwd.getpwnam(_ROOT_MAIL_ACCOUNT)
        internal = pwd.getpwnam(_ROOT_INTERNAL_USER)
        pwd.getpwnam(_ROOT_LOGIN_USER)
    except KeyError as exc:
        raise DovecotError(f"account missing for running Dovecot as root: {exc}") from exc
    return _Account(
        mail.pw_uid,
        mail.pw_gid,
        _ROOT_INTERNAL_USER,
        _group_name(internal.pw_gid),
        _ROOT_LOGIN_USER,
        as_root=True,
    )


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _free_ports(count: int) -> list[int]:
    """Ask the kernel for *count* distinct free loopback ports.

    The sockets are held open together so the ports differ, then closed; the
    short race until Dovecot binds them is handled by retrying the start.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _virtual_size(data: bytes) -> int:
    """Size as POP3 counts it (RFC 1939 §11): every bare LF becomes CRLF."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def _stamp_key(name: str) -> tuple[int, int, str]:
    """Sort key for a Maildir file name: our delivery stamp, then the name."""
    match = _STAMP_RE.match(name)
    if match is None:
        return (2**63, 0, name)
    return (int(match.group(1)), int(match.group(2)), name)


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGTERM the child when we die.

    Resolved before ``fork`` so the child only makes one system call.  Linux
    only; elsewhere returns None and the context manager is the only guard.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or not hasattr(os, "sched_getaffinity"):
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return set_pdeathsig


class Dovecot:
    """One private Dovecot POP3 server rooted in *workdir*.

    Args:
        workdir: scratch directory; created if missing, owned by the caller.
        users: initial users and their passwords (default ``alice``/``secret``).
        cert_file: PEM certificate chain; enables STLS and the pop3s port.
        key_file: PEM private key for *cert_file* (both or neither).
        binary: the Dovecot master binary.
        start_timeout: seconds :meth:`start` waits for both ports to greet.

    Raises:
        DovecotError: for an invalid user name or password, only one of
            *cert_file* and *key_file*, or a *workdir* path that would need
            quoting in ``dovecot.conf``.
    """

    host: str = HOST

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, str] | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        *,
        binary: Path = DOVECOT_BINARY,
        start_timeout: float = _DEFAULT_START_TIMEOUT,
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise DovecotError("give both cert_file and key_file, or neither")
        self.workdir = Path(workdir).resolve()
        for path in (self.workdir, cert_file, key_file):
            if path is not None and not _SAFE_PATH_RE.fullmatch(str(Path(path).resolve())):
                raise DovecotError(f"path not usable in dovecot.conf (needs quoting): {path}")
        self.cert_file = None if cert_file is None else Path(cert_file).resolve()
        self.key_file = None if key_file is None else Path(key_file).resolve()
        self.binary = Path(binary)
        self.start_timeout = start_timeout
        self.config_file = self.workdir / "dovecot.conf"
        self.log_file = self.workdir / "dovecot.log"
        self._stderr_file = self.workdir / "dovecot.stderr"
        self._passwd_dir = self.workdir / "users"
        self._mail_root = self.workdir / "mail"
        self._account = _pick_accounts()
        self._users: dict[str, str] = {}
        self._userdb_fields: dict[str, dict[str, str]] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] | None = None
        self._last_stamp_us = 0
        self._seq = 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._mail_root.mkdir(exist_ok=True)
        self._passwd_dir.mkdir(mode=0o700, exist_ok=True)
        for user, password in (users if users is not None else {"alice": "secret"}).items():
            self.add_user(user, password)

    # ------------------------------------------------------------------ info

    @staticmethod
    def available(binary: Path = DOVECOT_BINARY) -> tuple[bool, str]:
        """Whether a usable Dovecot with POP3 is installed; the reason if not."""
        hint = "install the Debian package dovecot-pop3d (scripts/test.sh does)"
        if not os.access(binary, os.X_OK):
            return False, f"{binary} not found or not executable; {hint}"
        for part in ("pop3", "pop3-login"):
            if not (DOVECOT_LIBEXEC / part).exists():
                return False, f"{DOVECOT_LIBEXEC / part} missing (no POP3 support); {hint}"
        return True, ""

    @staticmethod
    def version(binary: Path = DOVECOT_BINARY) -> str:
        """``dovecot --version``, e.g. ``2.3.19.1 (9b53102964)``.

        Raises:
            DovecotError: if the binary cannot be run.
        """
        try:
            out = subprocess.run(
                [str(binary), "--version"], capture_output=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise DovecotError(f"cannot run {binary} --version: {exc}") from exc
        return out.stdout.decode("ascii", "replace").strip()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def tls(self) -> bool:
        """Whether STLS and the pop3s port are offered."""
        return self.cert_file is not None

    @property
    def pop3_port(self) -> int:
        """The plain POP3 port (STLS offered there when :attr:`tls`).

        Raises:
            DovecotError: if the server was never started.
        """
        return self._port("pop3")

    @property
    def pop3s_port(self) -> int:
        """The implicit-TLS (pop3s) port.

        Raises:
            DovecotError: if the server was never started or has no certificate.
        """
        return self._port("pop3s")

    def _port(self, name: str) -> int:
        """The port of listener *name* (one of :meth:`_listeners`).

        Raises:
            DovecotError: the server was never started, or has no such listener.
        """
        if self._ports is None:
            raise DovecotError("Dovecot is not started")
        if name not in self._ports:
            why = "" if self.tls else " (it has no certificate)"
            raise DovecotError(f"this Dovecot has no {name} port{why}")
        return self._ports[name]

    @property
    def users(self) -> dict[str, str]:
        """A copy of the user database: name -> password."""
        return dict(self._users)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last *lines* lines of Dovecot's log and of its stderr."""
        parts = []
        for path in (self.log_file, self._stderr_file):
            with contextlib.suppress(OSError):
                text = path.read_text("utf-8", "replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts) or "(Dovecot wrote no log)"

    # ------------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the config, start Dovecot and wait until its ports greet ``+OK``.

        Retries with new ports if a picked port was taken meanwhile.

        Raises:
            DovecotError: Dovecot is missing, exited, or did not greet within
                ``start_timeout``; the message holds the tail of its log.
        """
        if self.running:
            return
        ok, reason = self.available(self.binary)
        if not ok:
            raise DovecotError(reason)
        for attempt in range(_PORT_ATTEMPTS):
            names = [listener.name for listener in self._listeners()]
            self._ports = dict(zip(names, _free_ports(len(names)), strict=True))
            self._write_config()
            self._spawn()
            try:
                self._wait_ready()
            except DovecotError:
                log = self.log_tail()
                self.stop()
                self._ports = None
                if "Address already in use" in log and attempt + 1 < _PORT_ATTEMPTS:
                    continue
                raise
            atexit.register(self.stop)
            return

    def stop(self) -> None:
        """Stop Dovecot and every process it started; safe to call twice."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        if proc.poll() is None:
            # SIGTERM lets the master stop its children (shutdown_clients=yes).
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=_STOP_TIMEOUT)
        # Anything left in the master's process group (a child that outlived
        # the master) goes too.  The group id is the master's pid, so this can
        # only reach this instance's processes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._wait_group_gone(proc.pid)

    @staticmethod
    def _wait_group_gone(pgid: int) -> None:
        deadline = time.monotonic() + _STOP_TIMEOUT
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _spawn(self) -> None:
        stderr = self._stderr_file.open("wb")
        with stderr:
            self._proc = subprocess.Popen(
                [str(self.binary), "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() can sweep it
                # Only one prctl() runs between fork and exec; the callable is
                # resolved beforehand, so the usual preexec_fn hazards do not apply.
                preexec_fn=_parent_death_signal(),  # noqa: PLW1509
                cwd=self.workdir,
            )

    def _wait_ready(self) -> None:
        """Poll every listener until it greets; bounded by ``start_timeout``."""
        deadline = time.monotonic() + self.start_timeout
        pending = self._readiness_probes()
        while pending:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise DovecotError(
                    f"Dovecot exited with status {self._proc.returncode} during start\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise DovecotError(
                    f"Dovecot did not greet on {pending[0][0]} within "
                    f"{self.start_timeout:g}s\n" + self.log_tail()
                )
            _, greets = pending[0]
            if greets():
                pending.pop(0)
            else:
                time.sleep(0.05)

    # ------------------------------------------------------ extension points

    def _protocols(self) -> tuple[str, ...]:
        """The ``protocols`` Dovecot serves; a subclass adds its own."""
        return ("pop3",)

    def _listeners(self) -> tuple[Listener, ...]:
        """The TCP listeners; each gets a free port at every start."""
        plain = Listener("pop3", b"+OK", implicit_tls=False)
        return (plain, Listener("pop3s", b"+OK", implicit_tls=True)) if self.tls else (plain,)

    def _readiness_probes(self) -> list[tuple[str, Callable[[], bool]]]:
        """(what, probe) pairs: Dovecot is ready once every probe returns True."""
        probes: list[tuple[str, Callable[[], bool]]] = []
        for listener in self._listeners():
            port = self._port(listener.name)
            probe = functools.partial(greets, port, listener.implicit_tls, listener.greeting)
            probes.append((f"{listener.name} on {HOST}:{port}", probe))
        return probes

    def _extra_config(self) -> str:
        """More ``dovecot.conf`` text after the POP3 part; a subclass adds its own."""
        return ""

    # ----------------------------------------------------------------- config

    def _write_config(self) -> None:
        self.config_file.write_text(self._base_config() + self._extra_config(), "utf-8")

    def _base_config(self) -> str:
        acct = self._account
        run_dir = self.workdir / "run"
        state_dir = self.workdir / "state"
        state_dir.mkdir(exist_ok=True)
        pop3_port = self._port("pop3")
        if self.tls:
            tls = (
                "ssl = yes\n"
                f"ssl_cert = <{self.cert_file}\n"
                f"ssl_key = <{self.key_file}\n"
                "ssl_min_protocol = TLSv1.2\n"
            )
            pop3s = (
                "  inet_listener pop3s {\n"
                f"    address = {HOST}\n"
                f"    port = {self.pop3s_port}\n"
                "    ssl = yes\n"
                "  }\n"
            )
        else:
            tls, pop3s = "ssl = no\n", ""
        if acct.as_root:
            # See the module docstring: mail processes chroot into the mail
            # root, auth reads the passwd-file as root.
            privileges = (
                f"valid_chroot_dirs = {self._mail_root}\nservice auth {{\n  user = root\n}}\n"
            )
            login_chroot = anvil_chroot = ""
        else:
            # chroot() needs root; without it every service runs unchrooted as us.
            privileges = ""
            login_chroot = anvil_chroot = "  chroot =\n"
        config = f"""\
# Written by tests/servers/dovecot.py for one test server; do not edit.
protocols = {" ".join(self._protocols())}
listen = {HOST}
base_dir = {run_dir}
state_dir = {state_dir}
instance_name = popsync-test-{pop3_port}
log_path = {self.log_file}
info_log_path = {self.log_file}
debug_log_path = {self.log_file}
default_internal_user = {acct.internal_user}
default_internal_group = {acct.internal_group}
default_login_user = {acct.login_user}
first_valid_uid = {acct.mail_uid}
last_valid_uid = {acct.mail_uid}
first_valid_gid = {acct.mail_gid}
last_valid_gid = {acct.mail_gid}
{privileges}
# Tests use plaintext USER/PASS and SASL PLAIN/LOGIN on purpose.
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self._passwd_dir}/%u
}}
userdb {{
  driver = passwd-file
  args = {self._passwd_dir}/%u
}}

mail_location = maildir:~/Maildir
# Server-side durability is not what we test.
mail_fsync = never
pop3_uidl_format = {UIDL_FORMAT}
# No auth penalty (Dovecot delays logins from an IP after a failure, 2 s and
# up): tests fail logins on purpose.  Mode 0 disables this listener.
service anvil {{
{anvil_chroot}\
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol pop3 {{
  mail_max_userip_connections = 100
}}
{tls}
service pop3-login {{
{login_chroot}\
  inet_listener pop3 {{
    address = {HOST}
    port = {pop3_port}
  }}
{pop3s}\
  # One long-lived login process serves many connections (fast for benchmarks).
  service_count = 0
  process_min_avail = 1
}}
"""
        return config

    # ------------------------------------------------------------------ users

    def add_user(
        self, user: str, password: str, *, userdb_fields: Mapping[str, str] | None = None
    ) -> None:
        """Add a user and create their empty Maildir; works while Dovecot runs.

        *userdb_fields* become the user's userdb extra fields, which override
        settings for this user alone (e.g. ``{"quota_rule": "*:storage=1K"}``).

        Raises:
            DovecotError: the user exists already, or the name, password or a
                field cannot be stored in a passwd-file.
        """
        if user in self._users:
            raise DovecotError(f"test user exists already: {user!r}")
        if not _USER_RE.fullmatch(user):
            raise DovecotError(f"invalid test user name: {user!r}")
        if not password or _BAD_PASSWORD_CHARS.intersection(password):
            raise DovecotError(f"invalid password for test user {user!r}")
        fields = dict(userdb_fields or {})
        for key, value in fields.items():
            if not _FIELD_RE.fullmatch(key) or not _FIELD_VALUE_RE.fullmatch(value):
                raise DovecotError(f"invalid userdb field for test user {user!r}: {key}={value}")
        self._users[user] = password
        self._userdb_fields[user] = fields
        maildir = self.maildir(user)
        for path in (maildir.parent, maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
            path.mkdir(mode=0o700, exist_ok=True)
            self._own(path)
        self._write_passwd(user)

    def set_userdb_fields(self, user: str, userdb_fields: Mapping[str, str]) -> None:
        """Replace *user*'s userdb extra fields; later logins see the new ones
        (e.g. another ``pop3_uidl_format``: the server renumbers its mail).

        Raises:
            DovecotError: no such user, or a field cannot be stored.
        """
        if user not in self._users:
            raise DovecotError(f"no such test user: {user!r}")
        fields = dict(userdb_fields)
        for key, value in fields.items():
            if not _FIELD_RE.fullmatch(key) or not _FIELD_VALUE_RE.fullmatch(value):
                raise DovecotError(f"invalid userdb field for test user {user!r}: {key}={value}")
        self._userdb_fields[user] = fields
        self._write_passwd(user)

    def new_mailbox(self, prefix: str = "user") -> Mailbox:
        """Add a user with a unique name and a random password; return its handle."""
        user = self._unique_user(prefix)
        self.add_user(user, secrets.token_urlsafe(12))
        return Mailbox(self, user)

    def _unique_user(self, prefix: str) -> str:
        """A user name starting with *prefix* that is not taken yet."""
        while True:
            user = f"{prefix}{secrets.token_hex(4)}"
            if user not in self._users:
                return user

    def _write_passwd(self, user: str) -> None:
        """Write *user*'s passwd-file.

        One file per user (the passdb path holds ``%u``) because Dovecot
        re-checks an already open passwd-file at most once a second: a user
        added to a shared file could be unknown for up to a second, while a
        new path is read on first use.
        """
        acct = self._account
        # Root: "<chroot>/./<home>" makes the mail process chroot first.
        home = f"{self._mail_root}/./{user}" if acct.as_root else f"{self._mail_root}/{user}"
        # The last field holds extra fields; "userdb_" marks those for the userdb.
        extra = " ".join(f"userdb_{k}={v}" for k, v in self._userdb_fields[user].items())
        line = (
            f"{user}:{self._password_field(user)}:{acct.mail_uid}:{acct.mail_gid}"
            f"::{home}::{extra}\n"
        )
        # Replace atomically so Dovecot never reads a half-written file.
        path = self._passwd_dir / user
        tmp = self._passwd_dir / f".{user}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(line)
        os.replace(tmp, path)

    def _password_field(self, user: str) -> str:
        """The passwd-file password of *user*, scheme first; a subclass may
        store a hash instead (SCRAM needs one of its own schemes)."""
        return f"{{PLAIN}}{self._users[user]}"

    def _own(self, path: Path | int) -> None:
        """Give *path* (or an open fd) to the mail account when we run as root."""
        if self._account.as_root:
            if isinstance(path, int):
                os.fchown(path, self._account.mail_uid, self._account.mail_gid)
            else:
                os.chown(path, self._account.mail_uid, self._account.mail_gid)

    # ------------------------------------------------------------------- mail

    def maildir(self, user: str) -> Path:
        """The user's Maildir (holding ``tmp/``, ``new/``, ``cur/``).

        Raises:
            DovecotError: unknown user.
        """
        if user not in self._users:
            raise DovecotError(f"no such test user: {user!r}")
        return self._mail_root / user / "Maildir"

    def add_message(self, user: str, data: bytes) -> Path:
        """Deliver one message (LF line endings) to *user*; return its path in ``new/``.

        Raises:
            DovecotError: unknown user.
        """
        return self.add_messages(user, [data])[0]

    def add_messages(self, user: str, messages: Iterable[bytes]) -> list[Path]:
        """Deliver many messages in order; fast enough for tens of thousands.

        Raises:
            DovecotError: unknown user.
        """
        maildir = self.maildir(user)
        tmp_dir, new_dir = maildir / "tmp", maildir / "new"
        pid = os.getpid()
        paths = []
        for data in messages:
            # A strictly increasing (seconds, microseconds) stamp: Dovecot
            # assigns UIDs to new files sorted by it, so UIDL order is
            # delivery order.
            stamp = max(time.time_ns() // 1000, self._last_stamp_us + 1)
            self._last_stamp_us = stamp
            self._seq += 1
            sec, usec = divmod(stamp, 1_000_000)
            name = f"{sec}.M{usec}P{pid}Q{self._seq}.popsync,S={len(data)},W={_virtual_size(data)}"
            tmp_path = tmp_dir / name
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                self._own(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            new_path = new_dir / name
            os.rename(tmp_path, new_path)
            paths.append(new_path)
        return paths

    def clear(self, user: str) -> None:
        """Remove every message of *user*.

        Dovecot's own index and uidlist stay, so UIDs are never reused.

        Raises:
            DovecotError: unknown user.
        """
        maildir = self.maildir(user)
        for sub in ("new", "cur", "tmp"):
            for entry in os.scandir(maildir / sub):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)

    def stored_messages(self, user: str) -> list[bytes]:
        """The messages Dovecot holds for *user* (``new/`` and ``cur/``), in
        delivery order, byte for byte as stored.

        Raises:
            DovecotError: unknown user.
        """
        return read_maildir(self.maildir(user))


def read_maildir(folder: Path) -> list[bytes]:
    """The messages in ``new/`` and ``cur/`` of a Maildir *folder*, byte for
    byte, in delivery order (by the time stamp that starts each file name).
    A folder that does not exist (yet) is empty."""
    files = []
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            files += [e for e in os.scandir(folder / sub) if e.is_file(follow_symlinks=False)]
    files.sort(key=lambda entry: _stamp_key(entry.name))
    return [Path(entry.path).read_bytes() for entry in files]


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in process group *pgid*.

    Zombies are ignored: Dovecot's ``log`` child dies after the master and is
    reaped by init, which may take a while, yet it holds nothing.
    """
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "stat"), encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def greets(port: int, implicit_tls: bool, greeting: bytes) -> bool:
    """Whether *port* accepts a connection and sends a reply starting *greeting*.

    A readiness probe only: over TLS it does not check the certificate (the
    tests do that with their own CA) and it sends no credentials.
    """
    try:
        with socket.create_connection((HOST, port), timeout=_PROBE_TIMEOUT) as raw:
            if not implicit_tls:
                return raw.recv(512).startswith(greeting)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
                return tls.recv(512).startswith(greeting)
    except (OSError, ssl.SSLError):
        return False


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One user of a :class:`Dovecot`, as handed to a single test."""

    server: Dovecot
    user: str

    @property
    def password(self) -> str:
        return self.server.users[self.user]

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def pop3_port(self) -> int:
        return self.server.pop3_port

    @property
    def pop3s_port(self) -> int:
        return self.server.pop3s_port

    @property
    def maildir(self) -> Path:
        return self.server.maildir(self.user)

    def add_message(self, data: bytes) -> Path:
        return self.server.add_message(self.user, data)

    def add_messages(self, messages: Iterable[bytes]) -> list[Path]:
        return self.server.add_messages(self.user, messages)

    def clear(self) -> None:
        self.server.clear(self.user)

    def stored_messages(self) -> list[bytes]:
        return self.server.stored_messages(self.user)
