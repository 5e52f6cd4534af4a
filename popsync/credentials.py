"""Reading secrets for the config: password files and password commands.

Both return one line of text or raise ValueError with a reason that never
quotes the secret (config.py turns it into a ConfigError naming the account
and the key).  A password file must be a regular file no one but its owner
can read; a password command runs without a shell, with stdin closed and a
timeout that kills its whole process group.  Neither may yield a CR, LF or
NUL: a secret that goes onto the wire must not smuggle in a second command
(``secret\r\nDELE 1``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
from pathlib import Path
from typing import Final

from popsync.errors import escape_server_text

__all__ = [
    "GROUP_OTHER_READ",
    "LINE_BREAKERS",
    "MAX_PASSWORD_FILE_BYTES",
    "mode_problem",
    "read_password_file",
    "run_password_command",
]

#: Only the first line of a password file is used; this bounds the read.
MAX_PASSWORD_FILE_BYTES: Final = 64 << 10
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


def run_password_command(argv: list[str], cwd: Path, timeout: float) -> str:
    """Run a password command without a shell; its one line of output is the secret.

    The child gets a closed stdin and its own session, so on timeout the whole
    process group (a shell script's children too) is killed, not only the
    direct child. Raises ValueError with a reason that never quotes stdout.
    """
    import signal
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
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ValueError(f"did not finish within {timeout:g} seconds") from None
    if out.endswith(b"\n"):
        out = out[:-1].removesuffix(b"\r")
    if proc.returncode != 0:
        how = (
            f"was killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited with status {proc.returncode}"
        )
        said = next((line.strip() for line in err.splitlines() if line.strip()), b"")
        # Show the command's own complaint, unless it might echo the secret.
        if said and not (out.strip() and out.strip() in said):
            how += f": {escape_server_text(said)}"
        raise ValueError(how)
    if not out:
        raise ValueError("printed nothing (the secret must be its first output line)")
    if LINE_BREAKERS.intersection(out.decode("latin-1")):
        raise ValueError("printed more than one line, or a CR or NUL; the secret must be one line")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("printed something that is not UTF-8 text") from None
