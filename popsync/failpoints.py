"""Test-only crash points: ``POPSYNC_FAILPOINT=name[:n]`` SIGKILLs the process
the n-th time (default: first) execution reaches ``failpoint(name)``.

The crash tests use these to kill a real ``popsync sync`` at each step of
docs/design.md §4 and then check, after a clean re-run, that every message is in the
Maildir exactly once and nothing was deleted before it was durable.  With the
variable unset, :func:`failpoint` is one global lookup and a comparison.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("POPSYNC_FAILPOINT", "")
_NAME, _, _COUNT = _SPEC.partition(":")
_REMAINING = int(_COUNT) if _COUNT.isdigit() else 1

#: Every failpoint the code reaches, in poll order (tests iterate over these).
POINTS = (
    "after_begin_fetch",  # names committed, no RETR yet
    "mid_body",  # part of a body written to tmp/
    "after_tmp_fsync",  # a batch of files complete and fsynced, none linked
    "after_link",  # the batch linked into new/, directory not yet fsynced
    "after_dir_fsync",  # durable in the Maildir, ledger not yet committed
    "after_commit",  # ledger says delivered, no DELE sent
    "after_dele",  # DELE answered +OK, QUIT not sent
    "after_quit",  # QUIT answered, deletions not yet recorded
)


def failpoint(name: str) -> None:
    """SIGKILL this process if the environment asks for a crash here."""
    global _REMAINING  # noqa: PLW0603 - a process-wide countdown is the point
    if name != _NAME:
        return
    _REMAINING -= 1
    if _REMAINING <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
