"""``popsync sync --dry-run``: a poll up to its plan, changing nothing.

:func:`preview_account` does what a poll does before its first side effect
-- connect, log in, UIDL and the LIST sizes the plan needs, the ``TOP n 0``
that recognises renumbered mail -- and then QUITs having sent no RETR and no
DELE (so the server removes nothing, RFC 1939 §6).  The ledger is only read:
no poll row, no recovery, no remap recorded (a remap found is applied to an
in-memory copy of the rows, so the plan counts it as the real poll would).
The delivery target is never opened, so no Maildir is created.  It takes no
account lock either: it writes nothing another poll could be disturbed by.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from popsync.config import Account
from popsync.errors import PopsyncError, escape_server_text
from popsync.ledger import Key, Ledger, LedgerRow
from popsync.plan import (
    Plan,
    Policy,
    join_listings,
    match_remaps,
    needs_size,
    plan,
    remap_candidates,
)
from popsync.session import Session
from popsync.sync import (
    SCAN_ONE_BY_ONE,
    log_plan,
    login_secret,
    plan_counts,
    plan_warnings,
    read_headers,
    session_options,
)
from popsync.textfmt import format_size

log = logging.getLogger("popsync.dryrun")


@dataclass
class Preview:
    """What a poll of *account* would do; *error* if it could not tell."""

    account: str
    fetch: int = 0
    bytes: int = 0
    skip: int = 0
    delete: int = 0
    remap: int = 0
    #: Why messages would be skipped, with how many each.
    skip_reasons: Counter[str] = field(default_factory=Counter)
    error: str | None = None


def preview_account(account: Account, ledger: Ledger | None, state_dir: Path) -> Preview:
    """The plan of one poll of *account*; never raises for a network, server
    or secret fault (see :attr:`Preview.error`).  *ledger* None: none exists
    yet, so every message is new."""
    preview = Preview(account.name)
    try:
        rows = ledger.rows(account.name) if ledger is not None else {}
        secret = login_secret(account, state_dir)
        with Session.open(session_options(account)) as session:
            session.login(secret)
            the_plan, remapped = _plan(account, session, rows)
            session.quit()
    except PopsyncError as exc:
        preview.error = str(exc)
        return preview
    counts = plan_counts(the_plan, remapped)
    preview.fetch, preview.bytes = counts["fetch"], counts["bytes"]
    preview.skip, preview.delete, preview.remap = counts["skip"], counts["delete"], remapped
    preview.skip_reasons.update(s.reason for s in the_plan.skip)
    return preview


def _plan(account: Account, session: Session, rows: dict[Key, LedgerRow]) -> tuple[Plan, int]:
    """List, recognise renumbered mail (read-only) and plan, as :class:`popsync.sync.Poll`."""
    policy = Policy(account.delete_after_days, account.max_message_size, time.time())
    uidl = session.uidl()
    messages, waiting = join_listings(uidl, ())
    wanted = needs_size(messages, rows, policy)
    if wanted:
        scan = session.scan(wanted) if len(wanted) <= SCAN_ONE_BY_ONE else session.scan()
        messages, waiting = join_listings(uidl, scan)
    remapped = 0
    candidates = remap_candidates(messages, rows, rows.values())
    if candidates:
        by_msg = {m.msg: m for m in messages}
        tops = read_headers(session, [by_msg[msg] for msg in sorted(candidates)])
        digests = {msg: d.stable if d is not None else None for msg, d in tops.items()}
        found = match_remaps(messages, candidates, digests)
        rows = dict(rows)
        for remap in found:
            m = remap.message
            del rows[remap.row.key]
            rows[(m.uid, m.occurrence)] = remap.row._replace(uid=m.uid, occurrence=m.occurrence)
        remapped = len(found)
    the_plan = plan(messages, rows, policy, waiting)
    log_plan(account.name, the_plan, remapped)
    for text in plan_warnings(the_plan):
        log.warning("%s: %s", account.name, text)
    return the_plan, remapped


def format_preview(preview: Preview) -> str:
    """``acct: dry run: fetch 3 (2.6 KB), skip 1 (too large: 1), delete 2, remap 0``."""
    reasons = "; ".join(
        f"{escape_server_text(reason)}: {n}" for reason, n in sorted(preview.skip_reasons.items())
    )
    skip = f"skip {preview.skip}" + (f" ({reasons})" if reasons else "")
    return (
        f"{preview.account}: dry run: fetch {preview.fetch} ({format_size(preview.bytes)}), "
        f"{skip}, delete {preview.delete}, remap {preview.remap}; nothing was changed"
    )


__all__ = ["Preview", "format_preview", "preview_account"]
