"""A private, throw-away PostgreSQL cluster for tests: Debian's binaries, a temp dir, a free port.

:class:`PostgresCluster` runs ``initdb`` into a scratch directory and starts
``postgres`` itself (not through ``pg_ctl`` or the Debian cluster wrappers),
as a child process, so a test run owns it completely and its death is seen.
It listens on ``127.0.0.1`` on a free port and on a unix socket in the scratch
directory, with ``trust`` authentication for the one role ``popsync`` (a
superuser), and with durability switched off (``fsync=off``): the tests check
popsync's logic against a real server, not PostgreSQL's crash safety.

PostgreSQL refuses to run as root. When the tests run as root (CI, containers),
``initdb`` and ``postgres`` run as the ``postgres`` account (Debian's package
creates it), or ``nobody`` without one; the scratch directory is handed to that
account.

pytest-postgresql would do much the same, but it runs ``pg_ctl`` as the
current user (so not as root, which is how CI runs) and brings mirakuru and
port-for along; this module is a few hundred lines in the shape of the Dovecot
harness beside it.

Each test gets its own empty database (:meth:`PostgresCluster.new_database`),
which takes a few tens of milliseconds; dropping it afterwards keeps the
session's disk use flat.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

__all__ = [
    "HOST",
    "ROLE",
    "PostgresCluster",
    "PostgresError",
    "find_bindir",
]

HOST: Final = "127.0.0.1"

#: The superuser role the cluster is created with (``initdb -U``).
ROLE: Final = "popsync"

#: Where Debian installs each major version's server binaries.
_DEBIAN_ROOT: Final = Path("/usr/lib/postgresql")

_NEEDED: Final = ("initdb", "postgres")

# Settings for a fast, disposable server (postgresql.org docs, "Non-Durable
# Settings"); enough connections for several popsync processes at once.
_SETTINGS: Final = {
    "listen_addresses": HOST,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
}

_START_TIMEOUT: Final = 30.0
_STOP_TIMEOUT: Final = 30.0
_START_TRIES: Final = 3
_LOG_TAIL: Final = 4000


class PostgresError(RuntimeError):
    """The cluster could not be created, started or used."""


def find_bindir() -> Path | None:
    """The directory with ``initdb`` and ``postgres``: the newest Debian version, else PATH."""
    candidates: list[Path] = []
    if _DEBIAN_ROOT.is_dir():
        versions = [p for p in _DEBIAN_ROOT.iterdir() if p.name.isdigit()]
        versions.sort(key=lambda p: int(p.name), reverse=True)
        candidates += [p / "bin" for p in versions]
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _NEEDED):
            return bindir
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresError("running as root, and neither a 'postgres' nor a 'nobody' account exists")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """A private PostgreSQL server; use as a context manager (start, then stop and remove).

    Args:
        bindir: directory with ``initdb`` and ``postgres`` (default: :func:`find_bindir`).

    Raises:
        PostgresError: the binaries are missing, ``initdb`` failed, or the
            server did not accept connections within its start timeout.
    """

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise PostgresError(
                "PostgreSQL server binaries (initdb, postgres) not found; install the Debian "
                "package postgresql (scripts/test.sh does)"
            )
        self.bindir = found
        self._account = _run_as()
        self.workdir = Path(tempfile.mkdtemp(prefix="popsync-pg-"))
        self.datadir = self.workdir / "data"
        self.socket_dir = self.workdir / "run"
        self.log_file = self.workdir / "postgres.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # --- life cycle ---------------------------------------------------------

    def __enter__(self) -> PostgresCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """``initdb`` (once), then start the server on a free port and wait until it answers."""
        if not self.datadir.exists():
            self._initdb()
        for _ in range(_START_TRIES):
            self.port = _free_port()
            if self._start_once():
                return
            # Most likely another process took the port between our probe
            # and the server's bind: try another one.
        raise PostgresError(f"PostgreSQL did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back, disconnect everyone, checkpoint); SIGKILL if stuck."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the server and remove its scratch directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return self.log_file.read_text(errors="replace")[-_LOG_TAIL:]
        except OSError as exc:
            return f"(no log: {exc})"

    # --- databases ----------------------------------------------------------

    def url(self, database: str, *, driver: str = "psycopg") -> str:
        """A SQLAlchemy URL for *database* over TCP on the loopback address."""
        return f"postgresql+{driver}://{ROLE}@{HOST}:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[object, ...]]:
        """Run one statement in autocommit mode; the rows it returned (if any)."""
        import psycopg

        with psycopg.connect(
            host=HOST,
            port=self.port,
            user=ROLE,
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            cur = conn.execute(sql.encode())
            return list(cur.fetchall()) if cur.description else []

    def new_database(self, prefix: str = "t") -> str:
        """Create a new, empty database; its name (lower case, safe to put in SQL unquoted)."""
        cleaned = re.sub(r"[^a-z0-9_]", "_", prefix.lower())[:40]
        if not cleaned[:1].isalpha():
            cleaned = "t_" + cleaned  # an unquoted name starts with a letter
        name = f"{cleaned}_{secrets.token_hex(4)}"
        self.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop *name*, disconnecting whoever is still connected to it."""
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    # --- internals ----------------------------------------------------------

    @property
    def _uid(self) -> int | None:
        return None if self._account is None else self._account.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self._account is None else self._account.pw_gid

    def _hand_over(self, path: Path) -> None:
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _initdb(self) -> None:
        self.workdir.chmod(0o711)
        self.socket_dir.mkdir(mode=0o700)
        self._hand_over(self.socket_dir)
        self.log_file.touch(mode=0o600)
        self._hand_over(self.log_file)
        # initdb creates the data directory; its parent must be writable by it.
        staging = self.workdir / "staging"
        staging.mkdir(mode=0o700)
        self._hand_over(staging)
        target = staging / "data"
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(target),
                "--username",
                ROLE,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            capture_output=True,
            timeout=120,
            cwd=staging,
            check=False,
            user=self._uid,
            group=self._gid,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"initdb failed (exit {result.returncode}):\n"
                + result.stderr.decode(errors="replace")[-_LOG_TAIL:]
            )
        target.rename(self.datadir)
        staging.rmdir()

    def _start_once(self) -> bool:
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port)]
        argv += ["-c", f"unix_socket_directories={self.socket_dir}"]
        for key, value in _SETTINGS.items():
            argv += ["-c", f"{key}={value}"]
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                user=self._uid,
                group=self._gid,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        pause = 0.01
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if self._answers():
                return True
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
        self.stop()
        raise PostgresError(
            f"PostgreSQL did not answer within {_START_TIMEOUT:.0f} s:\n" + self.log_tail()
        )

    def _answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host=HOST, port=self.port, user=ROLE, dbname="postgres", connect_timeout=2
            ) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True
