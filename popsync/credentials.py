"""Reading secrets for the config: password files and password commands.

Both return one line of text or raise ValueError with a reason that never
quotes the secret (config.py turns it into a ConfigError naming the account
and the key).  A password file must be a regular file no one but its owner
can read; a password command runs without a shell, with stdin closed, its
stderr never shown (only looked at for a shell's "not found"), a cap on what
it may print and a timeout; going past either kills its whole process group.
Neither may yield a CR, LF or NUL: a secret that goes onto the wire must not
smuggle in a second command (``secret\r\nDELE 1``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from popsync.errors import escape_server_text

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "GROUP_OTHER_READ",
    "LINE_BREAKERS",
    "MAX_PASSWORD_COMMAND_OUTPUT",
    "MAX_PASSWORD_FILE_BYTES",
    "mode_problem",
    "read_password_file",
    "run_password_command",
    "shell_hint",
]

#: Only the first line of a password file is used; this bounds the read.
MAX_PASSWORD_FILE_BYTES: Final = 64 << 10
#: Most a password command may print: a password or an OAuth token is far
#: shorter, and reading stops (the command is killed) beyond this.
MAX_PASSWORD_COMMAND_OUTPUT: Final = 64 << 10
_READ_CHUNK: Final = 16 << 10
GROUP_OTHER_READ: Final = stat.S_IRGRP | stat.S_IROTH
#: What a secret or a name that goes onto the wire must not contain.
LINE_BREAKERS: Final = frozenset("\r\n\0")


def mode_problem(path: Path, mode: int) -> str | None:
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    if mode & GROUP_OTHER_READ:
        return f"{path} is readable by group or others; run: chmod 600 {shlex.quote(str(path))}"
    return None


def read_password_file(path: Path) -> str:
    """The first line of *path*, its line ending stripped; ValueError on any problem.

    The mode is checked on the open descriptor, so a file swapped in after the
    load-time check is still caught. O_NONBLOCK keeps a FIFO from hanging us.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    try:
        problem = mode_problem(path, os.fstat(fd).st_mode)
        if problem:
            raise ValueError(problem)
        data = b""
        while b"\n" not in data and len(data) <= MAX_PASSWORD_FILE_BYTES:
            chunk = os.read(fd, 8192)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    line, newline, _ = data.partition(b"\n")
    if not newline and len(data) > MAX_PASSWORD_FILE_BYTES:
        raise ValueError(f"{path}: the first line is too long")
    try:
        secret = line.removesuffix(b"\r").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the first line is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"{path} is empty (the password goes on its first line)")
    if LINE_BREAKERS.intersection(secret):
        raise ValueError(f"{path}: the first line contains a CR or NUL character")
    return secret


#: Words a shell would have acted on; without one they reach the program as
#: arguments (``pass show mail | head -1`` runs ``pass`` with four arguments).
_SHELL_WORDS: Final = frozenset({"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", "|&"})
_SHELL_WORD_RE: Final = re.compile(r"^(?:\$[({A-Za-z_]|~/|`)|[|;&<>]$|\$\(")
#: How a shell reports a program it could not run: "sh: 1: gpgg: not found",
#: "bash: line 1: gpgg: command not found", "zsh: command not found: gpgg".
_NOT_FOUND_RE: Final = re.compile(
    rb"^(?:[\w./-]*sh): .*(?:not found|No such file or directory|Permission denied)",
    re.MULTILINE,
)
#: The exit statuses a shell gives a command it could not run (POSIX 2.8.2).
_CANNOT_RUN: Final = {126: "found but not executable", 127: "not found"}


def shell_hint(argv: list[str], returncode: int | None, stderr: bytes) -> str:
    """A hint for a password command that failed the way a shell-less
    pipeline or a missing program does, or "" (never quotes its output)."""
    words = [w for w in argv[1:] if w in _SHELL_WORDS or _SHELL_WORD_RE.search(w)]
    if words:
        shown = escape_server_text(words[0], 20)
        return (
            f"; it runs without a shell, so {shown!r} reached "
            f"{escape_server_text(os.path.basename(argv[0]), 40)} as an argument: "
            "write the command as sh -c '...'"
        )
    if returncode in _CANNOT_RUN or _NOT_FOUND_RE.search(stderr):
        what = _CANNOT_RUN.get(returncode or 0, "not found")
        return (
            f"; a program it runs was {what} (a shell said so): check the names "
            "and PATH in the command, and that sh -c '...' wraps any pipe"
        )
    return ""


def run_password_command(argv: list[str], cwd: Path, timeout: float) -> str:
    """Run a password command without a shell; its one line of output is the secret.

    The child gets a closed stdin; its stderr is read (bounded) but never
    shown -- a failing helper may print the secret there, and popsync's error
    text ends up on the terminal, in logs and in the ledger's poll history --
    only matched for a shell's "not found" (:func:`shell_hint`).  It runs in its own
    session, so on timeout or excess output the whole process group (a shell
    script's children too) is killed, not only the direct child. At most
    :data:`MAX_PASSWORD_COMMAND_OUTPUT` bytes of stdout are read, a chunk at a
    time, so memory stays bounded whatever it prints.

    Raises ValueError with a reason that never quotes its output: it could not
    start, printed too much, did not finish within *timeout* seconds, failed
    (exit status or signal only), or printed nothing, several lines or non-UTF-8;
    a failure that looks like a pipeline written without ``sh -c``, or like a
    shell's "not found", ends with a hint saying so.
    """
    import subprocess

    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        raise ValueError(f"cannot run {escape_server_text(argv[0])}: {exc.strerror}") from None
    with proc:
        try:
            out, err = _read_bounded(proc, time.monotonic() + timeout, timeout)
        except ValueError:
            _kill_group(proc)  # not reaped yet, so its group id cannot be reused
            raise
    try:
        return _one_line(out, proc.returncode)
    except ValueError as exc:
        raise ValueError(f"{exc}{shell_hint(argv, proc.returncode, err)}") from None


def _one_line(out: bytes, returncode: int) -> str:
    """The secret in a password command's stdout, or ValueError saying why not."""
    if out.endswith(b"\n"):
        out = out[:-1].removesuffix(b"\r")
    if returncode != 0:
        how = (
            f"was killed by signal {-returncode}"
            if returncode < 0
            else f"exited with status {returncode}"
        )
        # Its stderr is never shown: it may hold the secret.
        raise ValueError(f"{how} (run it by hand to see its error output)")
    if not out:
        raise ValueError("printed nothing (the secret must be its first output line)")
    if LINE_BREAKERS.intersection(out.decode("latin-1")):
        raise ValueError("printed more than one line, or a CR or NUL; the secret must be one line")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("printed something that is not UTF-8 text") from None


def _read_bounded(
    proc: subprocess.Popen[bytes], deadline: float, timeout: float
) -> tuple[bytes, bytes]:
    """Read *proc*'s stdout and stderr to EOF and wait for it to exit, all
    before *deadline*; (stdout, the first MAX_PASSWORD_COMMAND_OUTPUT bytes
    of stderr -- the rest is read and dropped).

    Raises ValueError once more than MAX_PASSWORD_COMMAND_OUTPUT bytes arrive on
    stdout or the deadline passes; the caller then kills the process group.
    """
    import selectors
    import subprocess

    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    got = {out_fd: bytearray(), err_fd: bytearray()}
    with selectors.DefaultSelector() as selector:
        for fd in got:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            ready = selector.select(left) if left > 0 else []
            if not ready:
                raise ValueError(f"did not finish within {timeout:g} seconds")
            for key, _ in ready:
                fd = int(key.fd)
                try:
                    chunk = os.read(fd, _READ_CHUNK)
                except OSError as exc:
                    raise ValueError(f"cannot read its output: {exc.strerror}") from None
                if not chunk:
                    selector.unregister(fd)
                elif len(got[fd]) <= MAX_PASSWORD_COMMAND_OUTPUT:
                    got[fd] += chunk
                if fd == out_fd and len(got[fd]) > MAX_PASSWORD_COMMAND_OUTPUT:
                    raise ValueError(
                        f"printed more than {MAX_PASSWORD_COMMAND_OUTPUT} bytes; "
                        "the secret must be one short line"
                    )
    try:
        proc.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        raise ValueError(f"did not finish within {timeout:g} seconds") from None
    return bytes(got[out_fd]), bytes(got[err_fd][:MAX_PASSWORD_COMMAND_OUTPUT])


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group (it may have children) and reap it."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
