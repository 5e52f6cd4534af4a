"""The errors of Maildir delivery, and how a failed system call becomes one.

Every failure leaves this package as a :class:`popsync.errors.DeliveryError`
(or one of the subclasses below) whose text names the file and the errno, so
the user reads one clear line such as ``cannot fsync /home/u/Mail/tmp/...:
EIO (Input/output error)`` and never a traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from popsync.errors import DeliveryError

__all__ = ["DeliveryConflict", "MaildirUnusable", "UnsafeMaildir", "os_error"]


class DeliveryConflict(DeliveryError):
    """A different message already sits under the name popsync derived.

    The same account, UID and occurrence produced different bytes this time
    (UID reuse by the server, or a tampered file). Nothing was overwritten;
    retrying will not help until someone decides, hence not temporary.
    """

    temporary = False

    def __init__(self, message: str, existing: Path) -> None:
        super().__init__(message)
        self.existing = existing


class UnsafeMaildir(DeliveryError):
    """Another user could tamper with deliveries into this Maildir.

    A Maildir directory owned by someone else or writable by group or others,
    or (as root) a path through another user's symlink. Not temporary: it
    stays unsafe until someone fixes the modes or the path.
    """

    temporary = False


class MaildirUnusable(DeliveryError):
    """The Maildir cannot be used where it is configured: its parent directory
    is missing, a file is in the way, or popsync may not write there.

    Not temporary: it stays so until someone fixes the path or the modes.
    """

    temporary = False


def os_error(action: str, path: Path | str, exc: OSError) -> DeliveryError:
    """Return a DeliveryError naming the file and the errno (ENOSPC, EIO, ...).

    *action* completes "cannot ..." (e.g. ``"fsync"``, ``"link into new/"``).
    The caller raises it ``from exc``.
    """
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "error"
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    return DeliveryError(f"cannot {action} {path}: {code} ({text})")
