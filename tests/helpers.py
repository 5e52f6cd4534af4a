"""Helpers shared by the sync, crash and interop tests: real config files,
Maildir inspection, the stored form of a server message, and a bounded wait
for a condition no event announces."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from popsync.config import Config, load_config
from popsync.pop3 import Err
from popsync.session import RetrRequest, Session
from popsync.testing.mailstore import to_crlf

T = TypeVar("T")


def stored_form(data: bytes) -> bytes:
    """What popsync stores for a message the server holds: LF line ends."""
    return to_crlf(data).replace(b"\r\n", b"\n")


def write_config(
    tmp: Path,
    accounts: list[dict[str, Any]],
    *,
    ledger: Path | None = None,
    ledger_url: str | None = None,
) -> Path:
    """A real config file (mode 0600) with one password file per account.

    The ledger is *ledger_url* if given, else the SQLite file *ledger* (default
    ``state/ledger.db`` in *tmp*).
    """
    out = []
    for acc in accounts:
        acc = dict(acc)  # noqa: PLW2901
        secret = acc.pop("secret", "pass")
        sources = ("password_file", "password", "password_command", "password_keyring")
        if not any(key in acc for key in sources):
            pw = tmp / f"{acc['name']}.pass"
            pw.write_text(secret + "\n")
            pw.chmod(0o600)
            acc["password_file"] = str(pw)
        acc.setdefault("host", "127.0.0.1")
        acc.setdefault("tls", "none")
        if acc["tls"] == "none":
            acc.setdefault("allow_plaintext", True)
        acc.setdefault("username", "user")
        if "maildir" not in acc:
            (tmp / "Maildir").mkdir(exist_ok=True)  # the parent; the Maildir is popsync's
        acc.setdefault("maildir", str(tmp / "Maildir" / acc["name"]))
        acc.setdefault("timeout", 10)
        out.append(acc)
    path = tmp / "config.yaml"
    url = ledger_url or f"sqlite:///{ledger or tmp / 'state' / 'ledger.db'}"
    doc = {"ledger": url, "accounts": out}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


def load(path: Path) -> Config:
    return load_config(path)


def maildir_files(maildir: Path | None) -> list[Path]:
    """The messages in new/ and cur/ of *maildir*: an account's ``maildir``,
    which is None only when the account delivers elsewhere (a test bug)."""
    assert maildir is not None, "the account delivers to no Maildir"
    return sorted(
        p for sub in ("new", "cur") if (maildir / sub).is_dir() for p in (maildir / sub).iterdir()
    )


def maildir_contents(maildir: Path | None) -> Counter[bytes]:
    """Each stored message's bytes, counted (a count of 2 is a duplicate delivery)."""
    return Counter(p.read_bytes() for p in maildir_files(maildir))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(
    condition: Callable[[], T | None],
    *,
    timeout: float = 10.0,
    what: str | Callable[[], str] = "the condition",
    interval: float = 0.01,
) -> T:
    """Poll *condition* until it returns a true value, and return that value.

    For states nothing announces (a file's contents, a log line, a process
    gone, a kernel lock queue): a bounded poll, never a fixed sleep, so a
    loaded machine only makes the wait longer, never the test wrong.  The
    condition may raise to give up early (say, the process under test died).
    Raises AssertionError naming *what* (a callable is asked only then) once
    *timeout* seconds pass.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"waited {timeout:g} s in vain for {text}")
        time.sleep(interval)
    return value


class Collect:
    """A :class:`popsync.session.RetrieveSink` that keeps what it is given.

    ``events`` is the order of calls (``("started", msg)``, ``("ended", msg)``,
    ``("refused", msg)``, ``("deleted", msg)``); *deletes* are handed out at
    the first chance, *after_end* (msg -> DELEs) once a body has ended.
    """

    def __init__(
        self,
        deletes: Iterable[int] = (),
        *,
        after_end: Mapping[int, list[int]] | None = None,
        on_started: Callable[[int], None] | None = None,
    ) -> None:
        self.bodies: dict[int, bytearray] = {}
        self.octets: dict[int, int] = {}
        self.refusals: dict[int, bytes] = {}
        self.dele_replies: dict[int, Err | None] = {}
        self.events: list[tuple[str, int]] = []
        self._ready = list(deletes)
        self._after_end = dict(after_end or {})
        self._on_started = on_started
        self._current: int | None = None

    def started(self, request: RetrRequest) -> None:
        if self._on_started is not None:
            self._on_started(request.msg)
        self._current = request.msg
        self.bodies[request.msg] = bytearray()
        self.events.append(("started", request.msg))

    def data(self, chunk: bytes) -> None:
        assert self._current is not None
        self.bodies[self._current] += chunk

    def ended(self, request: RetrRequest, octets: int) -> None:
        self.octets[request.msg] = octets
        self.events.append(("ended", request.msg))
        self._ready += self._after_end.pop(request.msg, [])

    def refused(self, request: RetrRequest, err: Err) -> None:
        self.refusals[request.msg] = err.text
        self.events.append(("refused", request.msg))

    def take_deletes(self) -> list[int]:
        ready, self._ready = self._ready, []
        return ready

    def deleted(self, msg: int, err: Err | None) -> None:
        self.dele_replies[msg] = err
        self.events.append(("deleted", msg))

    def got(self) -> dict[int, bytes]:
        return {msg: bytes(body) for msg, body in self.bodies.items()}


def delete(session: Session, msgs: Iterable[int]) -> dict[int, Err | None]:
    """DELE each of *msgs* as popsync does, through :meth:`Session.retrieve`
    (pipelined when on); msg -> None for +OK, or the Err."""
    sink = Collect(msgs)
    session.retrieve((), sink)
    return sink.dele_replies


def run_sync(
    config: Path, failpoint: str | None = None, *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``popsync -c CONFIG sync`` in a child process; with *failpoint* (e.g.
    ``after_link:3``) it is SIGKILLed there (see popsync/failpoints.py)."""
    env = {k: v for k, v in os.environ.items() if k != "POPSYNC_FAILPOINT"}
    if failpoint:
        env["POPSYNC_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(config), "sync", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


#: The start of a memory probe run as ``python -c``: ``peak_kib()`` reads the
#: probe's own peak RSS (VmHWM), reset here after start-up; ``ru_maxrss``
#: would also count the parent's peak from before exec.
RSS_PROBE_PRELUDE = """
import sys


def peak_kib():
    # This process's peak RSS (VmHWM): ru_maxrss would count the parent's from before exec.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak
"""


def popsync(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``popsync`` command (this checkout's) and capture its output;
    never as if under systemd (no ``$JOURNAL_STREAM`` priorities)."""
    return subprocess.run(
        [sys.executable, "-m", "popsync", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
        env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"},
        check=False,
    )
