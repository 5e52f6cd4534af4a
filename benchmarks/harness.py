"""Shared pieces of the benchmark: what a client is told, how it is timed, how
its output is checked.

Contract
--------
* :func:`run_measured` runs one client as a child process in its own process
  group and reaps it with ``os.wait4``, so the CPU time and peak RSS reported
  are exactly that child's (and of the descendants it waited for, e.g.
  fetchmail's MDA or getmail's delivery children) -- never the benchmark's
  own, the proxy's or Dovecot's.  Every run has a timeout: a watchdog thread
  SIGKILLs the whole group when it expires.
* :func:`verify_maildir` compares a Maildir (``new/`` and ``cur/``) with the
  stored form of what the server holds, as a multiset of SHA-256 digests:
  missing, unexpected and duplicated messages are all failures, and so is
  a single changed byte.
* :func:`warm_server` RETRs every message once, untimed, so that Dovecot's
  first-session work (building its index, moving ``new/`` to ``cur/`` and
  setting ``\\Seen`` at QUIT) is never charged to whichever client runs first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from popsync.testing.mailstore import to_crlf

HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how a client connects: the server (or the proxy in front of it)."""

    host: str
    port: int
    tls: str  # "implicit" or "plain"
    user: str
    password: str
    ca_file: Path


@dataclass(frozen=True, slots=True)
class Job:
    """One client invocation: its server, its own directories, its mode."""

    target: Target
    maildir: Path
    state_dir: Path
    delete: bool
    timeout: float


@dataclass(frozen=True, slots=True)
class Invocation:
    """What to execute for a job, prepared by a client."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Measurement:
    """One timed run of a child process."""

    wall: float
    cpu: float
    maxrss_mb: float
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking a delivered Maildir against the expectation."""

    ok: bool
    count: int
    nbytes: int
    problem: str = ""


def stored_form(data: bytes) -> bytes:
    """The Maildir form of a server message: LF line endings (I5, docs/design.md §2)."""
    return to_crlf(data).replace(b"\r\n", b"\n")


def digests(messages: Iterable[bytes]) -> Counter[str]:
    return Counter(hashlib.sha256(stored_form(m)).hexdigest() for m in messages)


def make_maildir(path: Path, owner: tuple[int, int] | None = None) -> None:
    """Create an empty Maildir; chown it when a client delivers as another user."""
    for sub in ("", "tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
        if owner is not None:
            os.chown(path / sub, *owner)


def maildir_files(path: Path) -> list[Path]:
    out: list[Path] = []
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            out.extend(Path(e.path) for e in os.scandir(path / sub) if e.is_file())
    return out


def verify_maildir(
    path: Path, expected: Counter[str], normalize: Callable[[bytes], bytes] | None = None
) -> Verdict:
    """Check that *path* holds exactly the messages whose digests are *expected*.

    *normalize* undoes what a client adds and cannot be told not to (getmail's
    Return-Path line); the byte count is of the files as stored.
    """
    got: Counter[str] = Counter()
    nbytes = 0
    for file in maildir_files(path):
        data = file.read_bytes()
        nbytes += len(data)
        if normalize is not None:
            data = normalize(data)
        got[hashlib.sha256(data).hexdigest()] += 1
    count = sum(got.values())
    if got == expected:
        return Verdict(True, count, nbytes)
    missing = sum((expected - got).values())
    extra = got - expected
    dupes = sum(n for d, n in extra.items() if d in expected)
    unexpected = sum(extra.values()) - dupes
    problem = (
        f"{count} files for {sum(expected.values())} messages: {missing} missing, "
        f"{unexpected} differing/unexpected, {dupes} duplicates"
    )
    return Verdict(False, count, nbytes, problem)


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float,
    log_prefix: Path,
) -> Measurement:
    """Run *argv* to completion (or *timeout*) and measure it.

    Output goes to ``<log_prefix>.out`` / ``.err`` files (no pipe to fill up);
    the last few KiB of each are returned.  Wall time runs from just before
    the fork to the moment ``wait4`` returns.
    """
    out_path = log_prefix.with_suffix(".out")
    err_path = log_prefix.with_suffix(".err")
    rss_path = log_prefix.with_suffix(".rss")
    launcher = gnu_time()
    if launcher is not None:
        argv = [launcher, "-f", "%M", "-o", str(rss_path), "--", *argv]
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,  # its own group: a timeout kills MDAs too
        )
        fired = threading.Event()

        def kill_group() -> None:
            fired.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, kill_group)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            # Ctrl-C (the child is in its own session, so it did not get it)
            # or any other way out: the client must not outlive the benchmark.
            kill_group()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
            proc.returncode = -1
            raise
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        # Leftovers of the group (an MDA orphaned by a timeout) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    maxrss_kib = usage.ru_maxrss  # Linux reports KiB
    if launcher is not None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            maxrss_kib = int(rss_path.read_text().split()[-1])
    return Measurement(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        maxrss_mb=maxrss_kib / 1024,
        returncode=proc.returncode,
        timed_out=fired.is_set(),
        stdout=_tail(out_path),
        stderr=_tail(err_path),
    )


@functools.cache
def gnu_time() -> str | None:
    """GNU ``time``, used as a tiny launcher so peak RSS is the client's own.

    Why: a child forked (or vforked) from this Python process inherits its
    memory map until ``exec``, and Linux keeps that pre-exec high-water mark
    in the child's ``ru_maxrss`` -- every client would show the benchmark's
    own ~40 MB.  GNU time is a small C program: the same effect costs ~1 MB.
    Without it, RSS figures are an upper bound (see the README).
    """
    path = shutil.which("time") or (
        "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    )
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if b"GNU" in out.stdout + out.stderr else None


def _tail(path: Path, limit: int = 4000) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", "replace")


# ----------------------------------------------------------------- warm-up


def warm_server(port: int, user: str, password: str, count: int, *, timeout: float = 300) -> None:
    """RETR all *count* messages over plain POP3, pipelined, and discard them.

    Counts ``CRLF.CRLF`` terminators (a stuffed body can never contain one),
    carrying the last bytes of each read over to the next.

    Raises:
        RuntimeError: the server said ``-ERR`` or closed early.
        OSError: the connection failed or *timeout* passed.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=60) as sock:
        reader = sock.makefile("rb")
        _expect_ok(reader)
        sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
        _expect_ok(reader)
        _expect_ok(reader)
        window = 200
        sent = done = 0
        carry = b"\r\n"  # the greeting ended a line: a first empty body still matches
        while done < count:
            if time.monotonic() > deadline:
                raise OSError("warm-up timed out")
            if sent < count and sent - done < window:
                batch = range(sent + 1, min(count, done + window) + 1)
                sock.sendall(b"".join(b"RETR %d\r\n" % i for i in batch))
                sent = batch[-1]
            chunk = reader.read1(1 << 20)
            if not chunk:
                raise RuntimeError("server closed during warm-up")
            if chunk.startswith(b"-ERR") or b"\r\n-ERR" in chunk:
                raise RuntimeError("server refused a RETR during warm-up")
            data = carry + chunk
            done += data.count(b"\r\n.\r\n")
            carry = data[-4:]
        sock.sendall(b"QUIT\r\n")
        _expect_ok(reader)


def server_uidls(port: int, user: str, password: str) -> list[str]:
    """The server's UIDL list, in message-number order (plain POP3, untimed).

    Raises:
        RuntimeError: the server said ``-ERR``.
        OSError: the connection failed.
    """
    with socket.create_connection((HOST, port), timeout=60) as sock:
        reader = sock.makefile("rb")
        _expect_ok(reader)
        sock.sendall(f"USER {user}\r\nPASS {password}\r\nUIDL\r\n".encode())
        for _ in range(3):
            _expect_ok(reader)
        uids = []
        while (line := reader.readline()) not in (b".\r\n", b""):
            uids.append(line.split()[1].decode("ascii"))
        sock.sendall(b"QUIT\r\n")
        _expect_ok(reader)
    return uids


def _expect_ok(reader: object) -> None:
    line = reader.readline()  # type: ignore[attr-defined]
    if not line.startswith(b"+OK"):
        raise RuntimeError(f"unexpected reply during warm-up: {line[:80]!r}")
