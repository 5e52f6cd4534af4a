"""An external mail delivery agent (procmail, maildrop, dovecot-lda) as a target.

Each message is handed to one run of the account's ``mda`` command.  The
command is split with :func:`shlex.split` and run without a shell, in its own
session (so a timeout can kill its whole process group), with:

* stdin: the spooled message itself, a regular file positioned at its start,
  in its stored form (LF line ends, otherwise byte-exact).  The kernel
  streams it, so popsync holds none of it in memory -- and because the body
  is complete before the command starts, a popsync crash can never hand an
  MDA a truncated message (a pipe would: it reads EOF early and may deliver
  the half it got);
* environment: popsync's own plus ``POPSYNC_ACCOUNT``, ``POPSYNC_UID`` (the
  server's unique-id, printable ASCII per RFC 1939 §7) and ``POPSYNC_SIZE``
  (bytes on stdin);
* stdout discarded; stderr read as it comes, and its last
  :data:`STDERR_TAIL` bytes logged (escaped) -- never recorded in the ledger
  nor put into the poll's report, as it may say anything;
* one deadline for the whole run; past it the process group is SIGKILLed.

The exit status decides (sysexits(3)): 0 delivered, 75 (EX_TEMPFAIL) a
temporary refusal that ends the poll, anything else -- another status, a
signal, the timeout -- a permanent refusal of that message, which stays on
the server and is reported.

An MDA cannot be asked afterwards what it delivered, so
:attr:`MdaTarget.exactly_once` is False: a crash after the MDA exits 0 and
before the ledger records it means that message is fetched and handed over
once more on the next poll -- one duplicate, never a loss.  ``batch = 1``
keeps that window one message wide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from popsync import failpoints
from popsync.deliver.base import Draft, Held, Pending, Receipt, Refusal
from popsync.deliver.spool import SpoolDraft
from popsync.errors import DeliveryError, escape_server_text

__all__ = ["EX_TEMPFAIL", "STDERR_TAIL", "MdaTarget", "open_mda_target"]

log = logging.getLogger("popsync.deliver.mda")

#: sysexits(3): "temporary failure, try again later".
EX_TEMPFAIL = 75
#: How much of an MDA's stderr is kept (its end) for the log.
STDERR_TAIL = 4096
#: Longest stderr line shown in one log record (escaped).
_LOG_LINE = 300
_READ_CHUNK = 16 << 10
#: Without a pidfd (not Linux), how often a run is checked for its exit
#: while a child it left behind still holds stderr open.
_EXIT_CHECK = 0.1


@dataclass(frozen=True, slots=True)
class _Run:
    """How one MDA run ended: its status (or None on timeout) and its stderr's tail."""

    returncode: int | None
    stderr: bytes


class MdaDraft(SpoolDraft):
    """A spooled message that remembers the unique-id the MDA's environment names."""

    def __init__(self, name: str, uid: bytes) -> None:
        super().__init__(name)
        self.uid = uid


class MdaTarget:
    """One poll's deliveries through an external command (see the module docstring)."""

    kind = "mda"
    batch = 1
    exactly_once = False

    def __init__(
        self, argv: list[str], *, account: str, timeout: float, warn: Callable[[str], None]
    ) -> None:
        self.argv = argv
        self.account = account
        self.timeout = timeout
        self.warn = warn
        self._drafts: list[MdaDraft] = []

    def reserve(self, name: str) -> None:
        pass  # nothing to prepare: a spool file is made when the body starts

    def begin(self, name: str, uid: bytes) -> MdaDraft:
        draft = MdaDraft(name, uid)
        self._drafts.append(draft)
        return draft

    def end(self, draft: Draft) -> None:
        pass  # the MDA runs at commit, once the ledger may record its answer

    def intent(self, draft: Draft) -> str | None:
        return None  # nothing could find the copy again

    def commit(self, drafts: Sequence[Draft]) -> list[Receipt | Refusal]:
        """Run the command once per draft; its exit status is the answer.

        Raises DeliveryError when the command cannot be started at all.
        """
        results: list[Receipt | Refusal] = []
        for draft in drafts:
            assert isinstance(draft, MdaDraft)
            results.append(self._deliver(draft))
            self._forget(draft)
        return results

    def recover(self, pending: Sequence[Pending]) -> list[Held]:
        return []  # an MDA cannot be asked what it delivered

    def close(self) -> None:
        for draft in self._drafts:
            draft.abort()
        self._drafts.clear()

    def _forget(self, draft: MdaDraft) -> None:
        draft.abort()
        with contextlib.suppress(ValueError):
            self._drafts.remove(draft)

    def _deliver(self, draft: MdaDraft) -> Receipt | Refusal:
        run = self._run(draft)
        answer = _judge(run.returncode, self.timeout)
        self._log_stderr(draft, run.stderr, failed=not isinstance(answer, Receipt))
        return answer

    def _run(self, draft: MdaDraft) -> _Run:
        stdin = draft.fileno()
        os.lseek(stdin, 0, os.SEEK_SET)
        env = dict(os.environ)
        env["POPSYNC_ACCOUNT"] = self.account
        env["POPSYNC_UID"] = draft.uid.decode("ascii", "backslashreplace")
        env["POPSYNC_SIZE"] = str(draft.size)
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise DeliveryError(
                f"account {self.account}: cannot run the mda command "
                f"{escape_server_text(self.argv[0])}: {exc.strerror}"
            ) from None
        failpoints.failpoint("mda_started")
        with proc:
            return _wait(proc, time.monotonic() + self.timeout)

    def _log_stderr(self, draft: MdaDraft, tail: bytes, *, failed: bool) -> None:
        level = logging.WARNING if failed else logging.DEBUG
        if not tail or not log.isEnabledFor(level):
            return
        uid = escape_server_text(draft.uid)
        for line in tail.splitlines():
            shown = escape_server_text(line, _LOG_LINE)
            log.log(level, "account %s: unique-id %s: mda stderr: %s", self.account, uid, shown)


def _judge(returncode: int | None, timeout: float) -> Receipt | Refusal:
    """The answer an exit status gives (None: the run timed out and was killed)."""
    if returncode is None:
        return Refusal(f"timed out after {timeout:g} s", temporary=False)
    if returncode == 0:
        return Receipt("exit 0")
    if returncode == EX_TEMPFAIL:
        return Refusal(f"exit {EX_TEMPFAIL} (temporary failure)", temporary=True)
    if returncode < 0:
        return Refusal(f"killed by signal {-returncode}", temporary=False)
    return Refusal(f"exit {returncode}", temporary=False)


def _wait(proc: subprocess.Popen[bytes], deadline: float) -> _Run:
    """Collect *proc*'s stderr tail until it exits, or kill its group at *deadline*.

    The exit is watched through a pidfd where there is one, so a child the
    MDA left behind holding stderr open does not make a finished run look
    like a hung one.
    """
    assert proc.stderr is not None
    err = proc.stderr.fileno()
    os.set_blocking(err, False)
    tail = bytearray()
    pidfd = _pidfd(proc.pid)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(err, selectors.EVENT_READ)
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ)
            while proc.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    _kill_group(proc)
                    return _Run(None, bytes(tail))
                wait = left if pidfd is not None else min(left, _EXIT_CHECK)
                for key, _ in selector.select(wait):
                    if key.fd == err and not _drain(err, tail):
                        selector.unregister(err)
            _drain(err, tail)  # what it wrote just before it exited
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return _Run(proc.returncode, bytes(tail))


def _drain(fd: int, tail: bytearray) -> bool:
    """Read what *fd* has now into *tail* (keeping its end); False at EOF."""
    while True:
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        tail += chunk
        del tail[: max(len(tail) - STDERR_TAIL, 0)]


def _pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:
        return None
    return fd


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group and reap the command."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group id is still ours
    proc.wait()


def parse_command(command: str) -> list[str]:
    """The argv of an ``mda`` command (split as a POSIX shell would, never run by one).

    Raises ValueError for an unbalanced quote or an empty command.
    """
    argv = shlex.split(command)
    if not argv:
        raise ValueError("the command is empty")
    return argv


@contextmanager
def open_mda_target(
    command: str, *, account: str, timeout: float, warn: Callable[[str], None]
) -> Iterator[MdaTarget]:
    """The MDA *command* as one poll's target for *account*.

    Raises DeliveryError before any message is fetched when the command
    cannot be parsed or its program is not found or not executable.
    """
    try:
        argv = parse_command(command)
    except ValueError as exc:
        raise DeliveryError(f"account {account}: mda command: {exc}") from None
    if shutil.which(argv[0]) is None:
        raise DeliveryError(
            f"account {account}: mda command {escape_server_text(argv[0])} "
            "is not found or not executable"
        )
    target = MdaTarget(argv, account=account, timeout=timeout, warn=warn)
    try:
        yield target
    finally:
        target.close()
