"""``popsync verify``: is every message the server holds safely copied here?

Before an admin lets an old host delete a mailbox, each message the server
lists must be held intact locally.  :func:`verify_account` answers that with
a read-only session -- UIDL and LIST (and ``TOP n 0`` with *deep*), never
RETR, never DELE, QUIT at the end (RFC 1939 §6: without DELE the server
removes nothing) -- and the ledger, and re-reads the local copies:

* **held** -- the ledger says delivered and the copy is there with the
  recorded size and SHA-256 (a Maildir file is found by its name, as a
  poll's recovery does, and re-hashed);
* **held (per the ledger)** -- the target cannot be re-read here (an MDA,
  an LMTP server; an mbox or IMAP mailbox, whose receipts verify does not
  re-read yet): the ledger's receipt is all there is, and the summary says so;
* **imported** -- adopted from another tool's state: known, with no copy
  popsync made;
* a problem: **missing** (delivered, but the copy is gone), **damaged**
  (size or hash differs), **never fetched** (no row: new since the last
  poll, or a fetch that never completed), **skipped** (left on the server
  by policy), and with *deep* **reused** (the server's headers and size
  under that unique-id both differ from the copy held: RFC 1939 §7 only
  says a server *should* not reuse one).

It is strict: a message popsync never saw, or skipped, is not held.

The account's lock is taken for the whole check (as a poll takes it), so a
concurrent poll cannot move a row or a file between the listing and the
look-up, and report a copy as missing that was only half-way.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from popsync.config import Account
from popsync.deliver.base import Held, Pending
from popsync.errors import PopsyncError, escape_server_text
from popsync.identity import HeaderDigest, Verdict, judge
from popsync.ledger import Ledger, LedgerRow
from popsync.plan import ServerMessage, join_listings
from popsync.session import Session, SessionOptions
from popsync.sync import login_secret, read_headers, session_options, stored_from, stored_of

#: Copies looked up per call of the target's look-up (each call lists the
#: Maildir once; fewer calls cost listings, more hold more header sections).
FIND_CHUNK = 5000


class State(enum.Enum):
    """What verify found for one server message (the value is what it prints)."""

    HELD = "held"
    PER_LEDGER = "held (per the ledger)"
    IMPORTED = "imported"
    MISSING = "missing"
    DAMAGED = "damaged"
    NEVER_FETCHED = "never fetched"
    SKIPPED = "skipped"
    REUSED = "reused"

    @property
    def safe(self) -> bool:
        """Does this state count as held (exit status 0)?"""
        return self in _SAFE


_SAFE = frozenset({State.HELD, State.PER_LEDGER, State.IMPORTED})


@dataclass(frozen=True, slots=True)
class Finding:
    """One server message that is not safely held."""

    uid: bytes
    msg: int
    state: State
    #: Where the ledger says the copy is (a file name, a receipt), if anywhere.
    receipt: str | None
    detail: str


@dataclass
class AccountCheck:
    """The outcome of verifying one account."""

    account: str
    on_server: int = 0
    counts: dict[State, int] = field(default_factory=dict)
    problems: list[Finding] = field(default_factory=list)
    #: What the counts rest on, where not on a re-read copy (the ledger's
    #: word for a target that cannot be re-read; TOP refused with *deep*).
    notes: list[str] = field(default_factory=list)
    #: The check could not be made (network, server, lock, target): one line.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems

    def add(self, state: State) -> None:
        self.counts[state] = self.counts.get(state, 0) + 1


def format_check(check: AccountCheck) -> list[str]:
    """The summary line, then one line per problem (UIDs escaped)."""
    if check.error is not None:
        return [f"{check.account}: cannot verify: {check.error}"]
    parts = ", ".join(f"{n} {state.value}" for state, n in _in_order(check.counts)) or "nothing"
    lines = [f"{check.account}: {check.on_server} on server: {parts}"]
    if check.notes:
        lines[0] += f" ({'; '.join(check.notes)})"
    lines += [
        f"{check.account}: {p.state.value}: unique-id {escape_server_text(p.uid)} "
        f"(message {p.msg}): {p.detail}"
        for p in check.problems
    ]
    return lines


def check_document(check: AccountCheck) -> dict[str, object]:
    """One account's result as a JSON-ready dict a script can act on."""
    return {
        "account": check.account,
        "ok": check.ok,
        "error": check.error,
        "on_server": check.on_server,
        "counts": {state.value: n for state, n in _in_order(check.counts)},
        "notes": check.notes,
        "problems": [
            {
                "uid": escape_server_text(p.uid),
                "uid_hex": p.uid.hex(),
                "msg": p.msg,
                "state": p.state.value,
                "receipt": p.receipt,
                "detail": p.detail,
            }
            for p in check.problems
        ],
    }


def _in_order(counts: Mapping[State, int]) -> list[tuple[State, int]]:
    return [(state, counts[state]) for state in State if counts.get(state)]


# -- the check ---------------------------------------------------------------------------


def verify_account(
    account: Account,
    ledger: Ledger,
    state_dir: Path,
    *,
    deep: bool = False,
    session_factory: Callable[[SessionOptions], Session] = Session.open,
) -> AccountCheck:
    """Verify *account*; never raises for faults of the network, server or disk
    (they become :attr:`AccountCheck.error`, one line)."""
    check = AccountCheck(account.name)
    try:
        with ExitStack() as stack:
            stack.enter_context(ledger.account_lock(state_dir, account.name, wait=False))
            rows = ledger.rows(account.name)
            messages, digests = _listing(account, state_dir, session_factory, deep=deep)
            target = stack.enter_context(_readable_target(account))
            _judge_all(check, messages, rows, target, digests)
            if check.counts.get(State.PER_LEDGER):
                check.notes.append(
                    f"{account.target} copies are not re-read: held per the ledger's receipts"
                )
            if refused := sum(digest is None for digest in digests.values()):
                check.notes.append(
                    f"the server refused TOP for {refused} message(s): "
                    "their headers were not compared"
                )
    except PopsyncError as exc:
        check.error = str(exc)
    return check


def _listing(
    account: Account,
    state_dir: Path,
    session_factory: Callable[[SessionOptions], Session],
    *,
    deep: bool,
) -> tuple[list[ServerMessage], Mapping[int, HeaderDigest | None]]:
    """UIDL and LIST (and with *deep* pipelined ``TOP n 0``), then QUIT.

    Returns the listing and, with *deep*, the header digest of each message
    (None where the server refused TOP).  Raises PopsyncError.
    """
    secret = login_secret(account, state_dir)  # the account's lock is held
    digests: Mapping[int, HeaderDigest | None] = {}
    with session_factory(session_options(account)) as session:
        session.login(secret)
        uidl = session.uidl()
        messages, _ = join_listings(uidl, session.scan())
        if deep and messages:
            digests = read_headers(session, messages)
        session.quit()
    return messages, digests


@dataclass(frozen=True, slots=True)
class Finder:
    """Where copies are looked for: a target's kind and its recovery look-up."""

    kind: str
    find: Callable[[Sequence[Pending]], list[Held]]


@contextmanager
def _readable_target(account: Account) -> Iterator[Finder | None]:
    """The account's target opened only to find copies, or None where verify
    takes the ledger's word.  A Maildir is opened without creating it or
    sweeping its ``tmp/``: verify changes nothing.  A Maildir that is not
    there at all holds no copy: each is reported missing."""
    if account.target != "maildir" or account.maildir is None:
        yield None
        return
    if not os.path.lexists(account.maildir):
        yield Finder("maildir", lambda asks: [])
        return
    from popsync.deliver.maildir.store import Maildir
    from popsync.deliver.maildir.target import MaildirTarget

    with Maildir(account.maildir, create=False) as maildir:
        target = MaildirTarget(maildir)
        try:
            yield Finder(target.kind, target.recover)
        finally:
            target.close()


def _judge_all(
    check: AccountCheck,
    messages: Sequence[ServerMessage],
    rows: Mapping[tuple[bytes, int], LedgerRow],
    target: Finder | None,
    digests: Mapping[int, HeaderDigest | None],
) -> None:
    check.on_server = len(messages)
    listed = [(m, rows.get((m.uid, m.occurrence))) for m in messages]
    copies = find_copies([row for _, row in listed if row is not None], target)
    for message, row in listed:
        finding = _judge_one(message, row, target, copies, digests)
        check.add(finding.state)
        if not finding.state.safe:
            check.problems.append(finding)


def find_copies(rows: Sequence[LedgerRow], target: Finder | None) -> dict[str, Held]:
    """Ask the target for the copy of every delivered row, :data:`FIND_CHUNK`
    at a time: name asked -> copy found (a row whose name is absent has no
    copy there).  A copy's header section is kept only for a row of an older
    popsync (``--deep`` measures its digests from it): 50,000 header
    sections would otherwise be held at once.  Raises what the target's
    look-up raises (DeliveryError)."""
    if target is None:
        return {}
    asks = [
        Pending(row.maildir_name, row.receipt)
        for row in rows
        if _delivered(row) and not _imported(row) and row.target == target.kind
        if row.maildir_name is not None
    ]
    older = {row.maildir_name for row in rows if stored_of(row) is None}
    found: dict[str, Held] = {}
    for start in range(0, len(asks), FIND_CHUNK):
        for held in target.find(asks[start : start + FIND_CHUNK]):
            found[held.asked] = held if held.asked in older else replace(held, header_section=b"")
    return found


def _judge_one(
    message: ServerMessage,
    row: LedgerRow | None,
    target: Finder | None,
    copies: Mapping[str, Held],
    digests: Mapping[int, HeaderDigest | None],
) -> Finding:
    uid, msg = message.uid, message.msg

    def found(state: State, detail: str = "", receipt: str | None = None) -> Finding:
        return Finding(uid, msg, state, receipt, detail)

    if row is None:
        return found(State.NEVER_FETCHED, "new since the last poll: not in the ledger")
    receipt = row.receipt or row.maildir_name
    if row.state == "skipped":
        return found(State.SKIPPED, f"skipped by policy: {row.skip_reason}", receipt)
    if row.state == "fetching":
        return found(State.NEVER_FETCHED, "its fetch never completed", receipt)
    if _imported(row):
        return found(State.IMPORTED, receipt=receipt)
    if target is None or row.target != target.kind or row.maildir_name is None:
        state = _copy_state(row, None, message, digests, trusted=True)
    else:
        state = _copy_state(row, copies.get(row.maildir_name), message, digests, trusted=False)
    return found(state[0], state[1], receipt)


def _copy_state(
    row: LedgerRow,
    held: Held | None,
    message: ServerMessage,
    digests: Mapping[int, HeaderDigest | None],
    *,
    trusted: bool,
) -> tuple[State, str]:
    """The state of a delivered row's copy (*held*: what the target found,
    unless *trusted*, where the ledger's word is taken)."""
    where = row.receipt or row.maildir_name or "?"
    if not trusted and (problem := copy_problem(row, held)) is not None:
        return problem
    if message.msg in digests and message.size is not None:
        reused = _reused(row, held, message.size, digests[message.msg])
        if reused:
            return State.REUSED, f"{where}: {reused}"
    return (State.PER_LEDGER if trusted else State.HELD), ""


def copy_problem(row: LedgerRow, held: Held | None) -> tuple[State, str] | None:
    """Is the copy *held* of a delivered row gone or not what was stored?

    Returns ``(MISSING, detail)`` when the target holds nothing under the
    row's name, ``(DAMAGED, detail)`` when its size or SHA-256 differs from
    the ledger's record, None when it is intact.
    """
    if held is None:
        where = row.receipt or row.maildir_name or "?"
        return State.MISSING, f"{where}: not found at the target"
    if held.size != row.stored_size or held.sha256 != row.sha256:
        return State.DAMAGED, (
            f"{held.name}: {held.size} bytes, SHA-256 {held.sha256[:12]}...; the ledger "
            f"recorded {row.stored_size} bytes, SHA-256 {(row.sha256 or '?')[:12]}..."
        )
    return None


def _reused(
    row: LedgerRow, held: Held | None, size: int, digest: HeaderDigest | None
) -> str | None:
    """Why the server's message under this unique-id is another one than the
    copy held, judged as a due DELE is (:func:`popsync.identity.judge`)."""
    if digest is None:
        return None  # TOP refused: nothing to compare
    stored = stored_of(row) or stored_from(row, held)
    verdict = judge(stored, size, digest)
    return verdict.reason if verdict.verdict is Verdict.OTHER else None


def _delivered(row: LedgerRow) -> bool:
    return row.state in ("delivered", "deleted")


def _imported(row: LedgerRow) -> bool:
    """Adopted from another tool's state: delivered, but no copy was ever
    recorded (no name, no hash)."""
    return _delivered(row) and row.sha256 is None and row.maildir_name is None


__all__ = [
    "AccountCheck",
    "Finder",
    "Finding",
    "State",
    "check_document",
    "copy_problem",
    "find_copies",
    "format_check",
    "verify_account",
]
