"""One poll of one account, in the safe order of DESIGN §4.

:func:`run_account` never raises for a network, server, storage or config
fault: it returns a :class:`PollReport` that says what happened and whether
a retry may help (``temporary``).  The order of side effects is the
product's promise, so here it is once, in full:

1. Take the account's lock (a second popsync waits or reports "busy").
2. Recovery: a ledger row ``fetching`` whose file is already in ``new/`` or
   ``cur/`` (a crash after ``link()``, W3) becomes ``delivered``; nothing is
   fetched twice.
3. Connect, TLS, authenticate (:mod:`popsync.session`); UIDL and LIST.
4. :func:`popsync.plan.plan` decides -- pure -- what to fetch, skip, DELE.
   A new message whose hash name is already in the Maildir (a lost ledger)
   is recorded as delivered, not fetched.
5. Commit the chosen Maildir names (``fetching``) in one transaction.
6. RETR, pipelined; each body streams into ``tmp/`` and is fsynced, then
   ``link()``ed into ``new/``.  Per batch (count, bytes or time): fsync
   ``new/``, then one ledger commit marking the batch ``delivered``, and
   only then queue the batch's DELEs (``delete_after_days: 0``).  No DELE
   ever precedes the commit that covers its message (I1).
7. DELE what the plan found due; QUIT; only after ``+OK`` to QUIT are the
   rows marked ``deleted`` -- the server deletes at QUIT (RFC 1939 §6).  A
   lost QUIT reply leaves them ``delivered``; the next listing settles it.

On any error the connection is dropped without QUIT, so the server deletes
nothing of this session (RFC 1939 §6); what was delivered and committed
stays, and its DELE is simply repeated next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from popsync import failpoints
from popsync.config import Account
from popsync.delivery import DeliveryPipeline
from popsync.errors import (
    DeliveryError,
    PopsyncError,
    RemoteProtocolError,
    ServerError,
    TransportError,
    escape_server_text,
)
from popsync.ledger import (
    SEEN_REFRESH,
    Delivered,
    FetchIntent,
    Ledger,
    LedgerRow,
    PollCounts,
    Skipped,
)
from popsync.locks import account_lock
from popsync.maildir import (
    Maildir,
    MaildirIndex,
    TmpMessage,
    delivery_hash,
    file_digest,
    name_hash,
    unique_name,
)
from popsync.plan import Delete, Fetch, Plan, Policy, join_listings, needs_size, plan
from popsync.pop3 import BodyData, Dele, EndOfBody, Err, Ok, Retr, Top
from popsync.session import Reply, RetrRequest, Session, SessionOptions
from popsync.transport import make_ssl_context

log = logging.getLogger("popsync.sync")

#: Durability is grouped: one directory fsync and one ledger commit per batch.
BATCH_MESSAGES = 64
BATCH_BYTES = 16 * 1024 * 1024
BATCH_SECONDS = 1.0
#: A body may exceed its LIST size by this much (servers count LF as one
#: octet, or misreport slightly -- PROTOCOL-NOTES §1 "Size semantics").
SIZE_SLACK = 64 * 1024
#: Cap for a message whose size the server did not tell and no limit is set.
HARD_CAP = 1 << 30
#: Up to this many sizes are asked with pipelined LIST n, above it one LIST.
SCAN_ONE_BY_ONE = 64
#: Longest header section hashed for the UID-reuse check.
HEADER_CAP = 256 * 1024

Progress = Callable[[int, int, int], None]  # (messages done, messages planned, bytes)


@dataclass
class PollReport:
    """The outcome of one poll, for the summary line, the daemon and ``status``."""

    account: str
    ok: bool = False
    error: str | None = None
    temporary: bool | None = None
    counts: PollCounts = field(default_factory=PollCounts)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    #: RFC 2449 §6.5 LOGIN-DELAY the server announced, if any (seconds).
    login_delay: int | None = None
    #: The error object, for callers that classify by type.
    exception: PopsyncError | None = None
    #: A stop request cut the poll short (it still ended cleanly with QUIT).
    interrupted: bool = False


def format_size(n: float) -> str:
    """Bytes for people: ``812 B``, ``3.4 MB``."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_summary(report: PollReport) -> str:
    """What a completed poll did, as the summary line and the daemon's log show it."""
    c = report.counts
    return (
        f"{c.listed} on server, {c.new} new, {c.fetched} fetched ({format_size(c.bytes)}), "
        f"{c.deleted} deleted, {c.skipped} skipped, {report.seconds:.1f} s"
    )


def body_limit(size: int | None, max_message_size: int | None) -> int:
    """How many bytes RETR may deliver before the body is cut off (I4)."""
    limits = [HARD_CAP]
    if size is not None:
        limits.append(size + size // 2 + SIZE_SLACK)
    if max_message_size is not None:
        limits.append(max_message_size)
    return min(limits)


def session_options(account: Account) -> SessionOptions:
    tls = str(account.tls)
    return SessionOptions(
        host=account.host,
        port=account.port,
        username=account.username,
        tls=tls,  # type: ignore[arg-type]
        ssl_context=None if tls == "none" else make_ssl_context(account.ca_file),
        auth=str(account.auth),  # type: ignore[arg-type]
        allow_plaintext=account.allow_plaintext,
        timeout=account.timeout,
        max_line=account.max_line_length,
        pipeline_window=account.pipeline_window,
    )


class _Poll:
    """The state of one poll in progress; :meth:`run` is the whole algorithm."""

    def __init__(
        self,
        account: Account,
        ledger: Ledger,
        maildir: Maildir,
        report: PollReport,
        now: Callable[[], float],
        progress: Progress | None,
        should_stop: Callable[[], bool],
    ) -> None:
        self.account = account
        self.should_stop = should_stop
        self.name = account.name
        self.ledger = ledger
        self.maildir = maildir
        self.report = report
        self.now = now
        self.progress = progress
        self.fetched = 0
        self.bytes = 0
        self.failed: list[str] = []
        self.dele_ok: set[int] = set()
        self.to_record: dict[int, tuple[bytes, int]] = {}  # msg -> key, for DELEs

    # -- the algorithm ---------------------------------------------------------

    def run(self, session_factory: Callable[[SessionOptions], Session]) -> None:
        rows = self.recover(self.ledger.rows(self.name))
        opts = session_options(self.account)
        secret = self.account.secret()  # a bad secret source fails before connecting
        with session_factory(opts) as session:
            # LOGIN-DELAY before login is the largest any user gets (RFC 2449
            # §6.5); kept even if the login itself is refused for it.
            self.report.login_delay = session.capabilities.login_delay
            session.login(secret)
            self.report.login_delay = session.capabilities.login_delay
            if session.capabilities.expire_zero and self.account.delete_after_days is None:
                self.warn(
                    "server advertises EXPIRE 0: it may delete every message popsync "
                    "retrieves, so mail cannot be left on this server (RFC 2449 §6.7)"
                )
            uidl = session.uidl()
            now = self.now()
            policy = Policy(self.account.delete_after_days, self.account.max_message_size, now)
            unsized, _ = join_listings(uidl, ())
            wanted = needs_size(unsized, rows, policy)
            # Sizes only where the plan uses them: nothing for a poll with
            # nothing to do, LIST n for a few, the whole LIST for many.
            if not wanted:
                scan: list[tuple[int, int]] = []
            elif len(wanted) <= SCAN_ONE_BY_ONE:
                scan = session.scan(wanted)
            else:
                scan = session.scan()
            # Nothing sized: the entries already joined serve as they are.
            messages, waiting = join_listings(uidl, scan) if scan else (unsized, [])
            the_plan = plan(messages, rows, policy, waiting)
            self.describe(the_plan)
            fetches = self.claim_names(the_plan, rows, now)
            for item in self.verify_headers(session, the_plan.delete):
                session.queue_dele(item.message.msg)
                self.to_record[item.message.msg] = (item.message.uid, item.message.occurrence)
            self.fetch(session, fetches)
            for event in session.retrieve(()):  # the DELEs still queued
                self.on_dele(event)
            failpoints.failpoint("after_dele")
            self.count(the_plan, deleted=0)
            session.quit()
            failpoints.failpoint("after_quit")
        deleted = [self.to_record[msg] for msg in sorted(self.dele_ok)]
        self.ledger.mark_deleted(self.name, [*deleted, *the_plan.gone], self.now())
        self.count(the_plan, deleted=len(deleted))
        stale_before = now - SEEN_REFRESH
        stale = [
            (uid, occurrence)
            for _, uid, occurrence, _ in messages
            if (row := rows.get((uid, occurrence))) is not None and row.last_seen < stale_before
        ]
        if stale:
            self.ledger.touch_seen(self.name, stale, now)
        if self.failed:
            raise _Incomplete(self.failed)

    def count(self, the_plan: Plan, *, deleted: int) -> None:
        self.report.counts = PollCounts(
            listed=the_plan.listed,
            new=len(the_plan.fetch),
            fetched=self.fetched,
            deleted=deleted,
            skipped=len(the_plan.skip),
            bytes=self.bytes,
        )

    def warn(self, text: str) -> None:
        self.report.warnings.append(text)
        log.warning("%s: %s", self.name, text)

    def describe(self, the_plan: Plan) -> None:
        if the_plan.ambiguous:
            self.warn(
                f"server lists {len(the_plan.ambiguous)} unique-id(s) more than once; "
                "each copy is fetched once and none of them is deleted"
            )
        if the_plan.waiting:
            self.warn(f"{len(the_plan.waiting)} message(s) have no unique-id yet; next poll")
        if the_plan.skip:
            skipped = [
                Skipped(
                    s.message.uid, s.message.occurrence, s.message.size or 0, s.reason, self.now()
                )
                for s in the_plan.skip
            ]
            self.ledger.mark_skipped(self.name, skipped)
            for s in the_plan.skip:
                self.warn(f"message {s.message.msg} ({s.message.size} bytes) skipped: {s.reason}")

    # -- recovery (step 2) and names (step 5) ------------------------------------------

    def recover(
        self, rows: dict[tuple[bytes, int], LedgerRow]
    ) -> dict[tuple[bytes, int], LedgerRow]:
        """Turn ``fetching`` rows whose file reached new/ or cur/ into ``delivered`` (W3)."""
        pending = [r for r in rows.values() if r.state == "fetching" and r.maildir_name]
        if not pending:
            return rows
        index = self.maildir.snapshot()
        found = []
        for row in pending:
            assert row.maildir_name is not None
            path = index.find(row.maildir_name) or index.find_hash(name_hash(row.maildir_name))
            if path is not None:
                found.append(self.delivered_from_file(row.uid, row.occurrence, path))
        if not found:
            return rows
        self.maildir.sync_new()  # the crashed run may not have fsynced new/
        self.ledger.mark_delivered(self.name, found)
        log.info("%s: recovered %d message(s) delivered before a crash", self.name, len(found))
        return self.ledger.rows(self.name)

    @staticmethod
    def delivered_from_file(uid: bytes, occurrence: int, path: Path) -> Delivered:
        size, sha = file_digest(path)
        return Delivered(uid, occurrence, size, sha, path.stat().st_mtime)

    def claim_names(
        self, the_plan: Plan, rows: dict[tuple[bytes, int], LedgerRow], now: float
    ) -> list[tuple[Fetch, str]]:
        """Choose and commit every Maildir name before any RETR (DESIGN §4 step 4)."""
        if not the_plan.fetch:
            return []
        index: MaildirIndex | None = None
        intents: list[FetchIntent] = []
        already: list[Delivered] = []
        fetches: list[tuple[Fetch, str]] = []
        for item in the_plan.fetch:
            m = item.message
            name = item.existing_name
            if name is None:
                # Second line of defence (a lost or rebuilt ledger): a file
                # carrying this message's hash name is already delivered.
                index = index or self.maildir.snapshot()
                path = index.find_hash(delivery_hash(self.name, m.uid, m.occurrence))
                if path is not None:
                    name = path.name.split(self.maildir.info_sep, 1)[0]
                    intents.append(FetchIntent(m.uid, m.occurrence, m.size or 0, name, now))
                    already.append(self.delivered_from_file(m.uid, m.occurrence, path))
                    continue
                name = unique_name(self.name, m.uid, m.occurrence, int(now))
            intents.append(FetchIntent(m.uid, m.occurrence, m.size or 0, name, now))
            fetches.append((item, name))
        self.ledger.begin_fetch(self.name, intents)
        if already:
            self.ledger.mark_delivered(self.name, already)
            self.warn(f"{len(already)} message(s) were already in the Maildir; not fetched again")
        failpoints.failpoint("after_begin_fetch")
        return fetches

    def verify_headers(self, session: Session, deletes: Sequence[Delete]) -> list[Delete]:
        """Keep the DELEs whose ``TOP n 0`` still hashes as at delivery.

        RFC 1939 §7 only says a server *should* not reuse a UID; if one does,
        the size check in :func:`plan` may still match by chance.  A message
        delivered in an earlier session is DELEd only if its header section
        is unchanged.  Rows from before migration 0002 (no hash), and servers
        without TOP, fall back to the size check alone.
        """
        to_check = [d for d in deletes if d.header_sha256 is not None]
        if not to_check or not session.capabilities.has("TOP"):
            return list(deletes)
        seen: dict[int, str | None] = {}
        hasher = _HeaderHasher()
        requests = (
            RetrRequest(d.message.msg, body_limit(d.message.size, None), top=0) for d in to_check
        )
        for event in session.retrieve(requests):
            if isinstance(event, Ok):
                hasher = _HeaderHasher()
            elif isinstance(event, BodyData):
                hasher.feed(event.data)
            elif isinstance(event, EndOfBody) and isinstance(event.command, Top):
                seen[event.command.msg] = hasher.hexdigest()
        kept = []
        for item in deletes:
            if item.header_sha256 is None or seen.get(item.message.msg) == item.header_sha256:
                kept.append(item)
            else:
                self.warn(
                    f"message {item.message.msg}: its headers differ from the copy delivered "
                    "earlier under this unique-id (reused by the server?); not deleted"
                )
        return kept

    # -- fetching (step 6) ------------------------------------------------------------

    def fetch(self, session: Session, fetches: list[tuple[Fetch, str]]) -> None:
        limit = self.account.max_message_size
        by_msg = {item.message.msg: (item, name) for item, name in fetches}
        batch = _Batch()
        tmp: TmpMessage | None = None
        headers = _HeaderHasher()
        with DeliveryPipeline(self.maildir) as pipeline:

            def requests() -> Iterator[RetrRequest]:
                for item, name in fetches:
                    # A stop request ends the stream of new RETRs; those in
                    # flight finish, their batch is committed and its DELEs
                    # sent, then QUIT as usual.
                    if self.stopped():
                        return
                    pipeline.reserve(name)  # tmp/<name> is created meanwhile
                    yield RetrRequest(item.message.msg, body_limit(item.message.size, limit))

            try:
                for event in session.retrieve(requests()):
                    command = event.command
                    if isinstance(command, Dele):
                        self.on_dele(event)
                        continue
                    assert isinstance(command, Retr)
                    item, name = by_msg[command.msg]
                    if isinstance(event, Ok):
                        tmp = pipeline.open(name)
                        headers = _HeaderHasher()
                    elif isinstance(event, BodyData):
                        assert tmp is not None
                        tmp.write(event.data)
                        headers.feed(event.data)
                        failpoints.failpoint("mid_body")
                    elif isinstance(event, EndOfBody):
                        assert tmp is not None
                        pipeline.finish(tmp)  # flush + fsync + close, in the background
                        m = item.message
                        delivered = Delivered(
                            m.uid,
                            m.occurrence,
                            tmp.size,
                            tmp.sha256_hex,
                            self.now(),
                            headers.hexdigest(),
                        )
                        batch.add(tmp, delivered, m.msg if item.delete_after else None)
                        tmp = None
                        if batch.due():
                            self.flush(batch, pipeline, session)
                            self.report_progress(len(fetches))
                    elif isinstance(event, Err):
                        text = escape_server_text(event.text)
                        self.failed.append(f"RETR {command.msg}: -ERR {text}")
            except BaseException:
                if tmp is not None:
                    tmp.abort()
                # Complete messages become durable and recorded, so the next poll
                # needs no recovery -- but no DELE is queued on a broken session.
                # If that fails too, the first error is the one to report; the
                # next poll's recovery finds whatever was linked.
                with contextlib.suppress(PopsyncError):
                    self.flush(batch, pipeline, None)
                raise
            self.flush(batch, pipeline, session)
        self.report_progress(len(fetches))

    def stopped(self) -> bool:
        if self.should_stop():
            if not self.report.interrupted:
                self.report.interrupted = True
                self.warn("stop requested: finishing the messages in flight, then QUIT")
            return True
        return False

    def flush(self, batch: _Batch, pipeline: DeliveryPipeline, session: Session | None) -> None:
        """Make the batch durable, record it in one commit, then allow its DELEs.

        The order is the promise (DESIGN §4): every file fsynced, then linked
        into new/, then new/ fsynced, then the ledger commit, then DELE.
        """
        entries = batch.take()
        if not entries:
            return
        finished = pipeline.complete()  # raises if any fsync failed: nothing linked
        assert [t for t, _, _ in entries] == finished
        failpoints.failpoint("after_tmp_fsync")
        for tmp, _, _ in entries:
            self.maildir.deliver(tmp)
        failpoints.failpoint("after_link")
        self.maildir.sync_new()
        failpoints.failpoint("after_dir_fsync")
        items = [delivered for _, delivered, _ in entries]
        self.ledger.mark_delivered(self.name, items)
        failpoints.failpoint("after_commit")
        self.fetched += len(items)
        self.bytes += sum(d.stored_size for d in items)
        if session is not None:
            for _, delivered, msg in entries:
                if msg is not None:
                    self.to_record[msg] = (delivered.uid, delivered.occurrence)
                    session.queue_dele(msg)

    def on_dele(self, event: Reply) -> None:
        assert isinstance(event, Ok | Err) and isinstance(event.command, Dele)
        if isinstance(event, Ok):
            self.dele_ok.add(event.command.msg)
        else:
            self.warn(f"DELE {event.command.msg} refused: {escape_server_text(event.text)}")

    def report_progress(self, planned: int) -> None:
        if self.progress is not None:
            self.progress(self.fetched, planned, self.bytes)


class _HeaderHasher:
    """SHA-256 of a message's header section: up to and including the first
    empty line (LF form), or the whole message if it has none.

    Fed the stored bytes as they stream; keeps at most HEADER_CAP bytes, and
    gives up (None) on a header section longer than that.
    """

    __slots__ = ("_buf", "_digest", "_done")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._digest: str | None = None
        self._done = False

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        start = max(0, len(self._buf) - 1)
        self._buf += data
        end = self._buf.find(b"\n\n", start)
        if end >= 0:
            self._digest = hashlib.sha256(self._buf[: end + 2]).hexdigest()
            self._done = True
            self._buf = bytearray()
        elif len(self._buf) > HEADER_CAP:
            self._done = True
            self._buf = bytearray()

    def hexdigest(self) -> str | None:
        if not self._done:
            return hashlib.sha256(self._buf).hexdigest()
        return self._digest


class _Batch:
    """Complete messages waiting for their fsync, link, directory fsync and commit."""

    def __init__(self) -> None:
        self.entries: list[tuple[TmpMessage, Delivered, int | None]] = []
        self.bytes = 0
        self.started = time.monotonic()

    def add(self, tmp: TmpMessage, delivered: Delivered, dele_msg: int | None) -> None:
        if not self.entries:
            self.started = time.monotonic()
        self.entries.append((tmp, delivered, dele_msg))
        self.bytes += delivered.stored_size

    def due(self) -> bool:
        return (
            len(self.entries) >= BATCH_MESSAGES
            or self.bytes >= BATCH_BYTES
            or time.monotonic() - self.started >= BATCH_SECONDS
        )

    def take(self) -> list[tuple[TmpMessage, Delivered, int | None]]:
        """Empty the batch and return what it held (so a failure never replays it)."""
        entries, self.entries, self.bytes = self.entries, [], 0
        return entries


class _Incomplete(PopsyncError):
    """Some messages could not be fetched; the poll did not complete."""

    temporary = True

    def __init__(self, failures: list[str]) -> None:
        shown = "; ".join(failures[:3]) + (
            f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        )
        super().__init__(f"{len(failures)} message(s) not fetched: {shown}")


def run_account(
    account: Account,
    ledger: Ledger,
    state_dir: Path,
    *,
    now: Callable[[], float] = time.time,
    lock_wait: bool | float = False,
    progress: Progress | None = None,
    session_factory: Callable[[SessionOptions], Session] = Session.open,
    should_stop: Callable[[], bool] = lambda: False,
) -> PollReport:
    """Poll *account* once; never raises for faults of the network, server or disk.

    *should_stop* is asked between messages; once it says True no further
    RETR is sent, and the poll finishes what is in flight and QUITs cleanly.
    """
    report = PollReport(account.name)
    started = time.monotonic()
    poll_id: int | None = None
    try:
        with ExitStack() as stack:
            stack.enter_context(account_lock(state_dir, account.name, wait=lock_wait))
            poll_id = ledger.start_poll(account.name, now())
            maildir = stack.enter_context(Maildir(account.maildir))
            maildir.sweep_tmp()
            poll = _Poll(account, ledger, maildir, report, now, progress, should_stop)
            if maildir.is_on_nfs():
                poll.warn("the Maildir is on a network file system; see README")
            poll.run(session_factory)
        report.ok = True
    except PopsyncError as exc:
        report.error = str(exc)
        report.temporary = exc.temporary
        report.exception = exc
        if isinstance(exc, ServerError | TransportError | RemoteProtocolError | DeliveryError):
            log.debug("%s: poll failed", account.name, exc_info=True)
    finally:
        report.seconds = time.monotonic() - started
        if poll_id is not None:
            _finish_poll(ledger, poll_id, report, now())
    return report


def _finish_poll(ledger: Ledger, poll_id: int, report: PollReport, at: float) -> None:
    try:
        ledger.finish_poll(
            poll_id,
            finished_at=at,
            result="ok" if report.ok else "error",
            error=report.error,
            temporary=report.temporary,
            counts=report.counts,
            next_poll_at=None,
        )
    except PopsyncError as exc:  # the poll's own outcome matters more
        report.warnings.append(f"could not record the poll: {exc}")
        log.warning("%s: could not record the poll: %s", report.account, exc)
