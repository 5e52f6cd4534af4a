"""Delivery targets: where a fetched message is stored, one module per kind.

Every target implements :class:`popsync.deliver.base.Target` (read its
docstring: the order of begin, write, end, intent, commit, recover is what
keeps "no loss" and "exactly once").  :func:`open_target` opens the one an
account names:

* :mod:`popsync.deliver.maildir` -- a Maildir: exactly once;
* :mod:`popsync.deliver.mbox` -- an mbox (mboxrd, locked): exactly once;
* :mod:`popsync.deliver.mda` -- a command fed the message on stdin: at most
  one duplicate per crash;
* :mod:`popsync.deliver.lmtp` -- an LMTP server: at most one duplicate per
  crash;
* :mod:`popsync.deliver.imap` -- APPEND into an IMAP mailbox: exactly once.

Modules other than the one an account uses are not imported.  Every target
keys its messages by :func:`message_name`: derived from a hash of account,
unique-id and occurrence (no server byte reaches a path), unique, and found
again after a crash (see :mod:`popsync.deliver.maildir.names`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from popsync.deliver.maildir.names import unique_name as message_name

if TYPE_CHECKING:
    from popsync.config import Account
    from popsync.deliver.base import Target


@contextmanager
def open_target(
    account: Account, *, state_dir: Path, warn: Callable[[str], None]
) -> Iterator[Target]:
    """Open *account*'s delivery target for one poll; closed on exit.

    Raises DeliveryError when it cannot be opened (an unsafe Maildir, an mbox
    that cannot be locked, an IMAP host that refuses the login, ...).
    """
    kind = account.target
    timeout = account.timeout
    if kind == "maildir":
        assert account.maildir is not None
        from popsync.deliver.maildir import open_maildir_target

        with open_maildir_target(account.maildir, warn, parents=account.create) as maildir:
            yield maildir
    elif kind == "mbox":
        mbox = import_module("popsync.deliver.mbox")
        with mbox.open_mbox_target(account.mbox, warn=warn) as target:
            yield target
    elif kind == "mda":
        mda = import_module("popsync.deliver.mda")
        with mda.open_mda_target(
            account.mda, account=account.name, timeout=timeout, warn=warn
        ) as target:
            yield target
    elif kind == "lmtp":
        lmtp = import_module("popsync.deliver.lmtp")
        with lmtp.open_lmtp_target(
            account.lmtp, account.lmtp_recipient, timeout=timeout, warn=warn
        ) as target:
            yield target
    else:
        imap = import_module("popsync.deliver.imap")
        with imap.open_imap_target(
            account.imap, account=account.name, timeout=timeout, warn=warn
        ) as target:
            yield target


__all__ = ["message_name", "open_target"]
