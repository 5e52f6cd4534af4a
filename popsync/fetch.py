"""Fetching: the sinks :meth:`popsync.session.Session.retrieve` drives.

:class:`Fetcher` takes each RETR body into the account's delivery target
and records it; :class:`HeaderReader` collects ``TOP n 0`` header digests.
The rule that keeps mail from being lost lives in one place,
:class:`DeleGate`: a DELE is handed to the session only for a message whose
copy is durable at its target *and* recorded as delivered in the ledger
(a fresh batch, after :meth:`Fetcher.commit`), or that
:func:`popsync.identity.judge` confirmed is the complete copy stored in an
earlier session.  Deletions themselves take effect only at QUIT
(RFC 1939 §6); :attr:`DeleGate.accepted` lists the ``+OK`` ones.

Durability is grouped: bodies that ended join a :class:`Batch`; when it is
due (count, bytes or time) one :meth:`Target.commit` makes them durable and
one ledger commit records them, and only then are their DELEs released.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from popsync import failpoints
from popsync.deliver.base import Draft, Receipt, Target
from popsync.errors import DeliveryError, escape_server_text
from popsync.identity import HeaderDigest, HeaderHasher, is_short
from popsync.ledger import Delivered, Key, Ledger
from popsync.plan import Fetch
from popsync.pop3 import Err
from popsync.session import RetrRequest
from popsync.textfmt import format_size

steps = logging.getLogger("popsync.steps")  # -v (popsync.logs)

#: Durability is grouped: one target commit and one ledger commit per batch.
BATCH_MESSAGES = 64
BATCH_BYTES = 16 * 1024 * 1024
BATCH_SECONDS = 1.0


class DeleGate:
    """The only way to a DELE: allowed per message, handed out once, answered.

    :meth:`allow_recorded` takes messages whose delivery the ledger has just
    committed; :meth:`allow_confirmed` those an identity check confirmed.
    Nothing else puts a message number here.
    """

    def __init__(self) -> None:
        self._ready: deque[int] = deque()
        self._keys: dict[int, Key] = {}
        self.accepted: list[Key] = []
        self.refused: list[tuple[int, str]] = []

    def allow_recorded(self, recorded: Iterable[tuple[int, Key]]) -> None:
        """DELE these (msg, key) pairs: their copies are durable and recorded."""
        for msg, key in recorded:
            self._allow(msg, key)

    def allow_confirmed(self, msg: int, key: Key) -> None:
        """DELE *msg*: judged the complete copy delivered in an earlier session."""
        self._allow(msg, key)

    def _allow(self, msg: int, key: Key) -> None:
        if msg in self._keys:
            raise ValueError(f"DELE {msg} allowed twice")
        self._keys[msg] = key
        self._ready.append(msg)

    def take(self) -> list[int]:
        taken = list(self._ready)
        self._ready.clear()
        return taken

    def answered(self, msg: int, err: Err | None) -> None:
        if err is None:
            self.accepted.append(self._keys[msg])
        else:
            self.refused.append((msg, escape_server_text(err.text)))


@dataclass
class Batch:
    """Ended drafts waiting for their target commit and their ledger commit."""

    entries: list[tuple[Draft, Delivered, int | None]] = field(default_factory=list)
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, draft: Draft, delivered: Delivered, dele_msg: int | None) -> None:
        if not self.entries:
            self.started = time.monotonic()
        self.entries.append((draft, delivered, dele_msg))
        self.bytes += delivered.stored_size

    def due(self, limit: int) -> bool:
        return (
            len(self.entries) >= min(limit, BATCH_MESSAGES)
            or self.bytes >= BATCH_BYTES
            or time.monotonic() - self.started >= BATCH_SECONDS
        )

    def take(self) -> list[tuple[Draft, Delivered, int | None]]:
        """Empty the batch and return what it held (so a failure never replays it)."""
        entries, self.entries, self.bytes = self.entries, [], 0
        return entries


@dataclass
class FetchOutcome:
    """What a :class:`Fetcher` did, for the poll's report."""

    fetched: int = 0
    bytes: int = 0
    #: Why a message could not be fetched ("RETR 3: -ERR ...").
    failed: list[str] = field(default_factory=list)
    #: Keys of bodies that arrived short or that the target refused (an
    #: attempt each: they are fetched after the others next time).
    short: list[Key] = field(default_factory=list)
    #: The target refused a message for now: the poll ends as temporary.
    deferred: str | None = None


class Fetcher:
    """The :class:`~popsync.session.RetrieveSink` for RETR: bodies into the target.

    *fetches* are the planned messages with their committed names, in
    order.  A stop request (*stopped*) ends the stream of new requests;
    those in flight finish.  After an error, :meth:`in_flight` says which
    messages were cut short (their drafts are aborted by :meth:`abandon`).
    """

    def __init__(
        self,
        account: str,
        target: Target,
        ledger: Ledger,
        gate: DeleGate,
        fetches: list[tuple[Fetch, str]],
        *,
        limit: Callable[[Fetch], int],
        now: Callable[[], float],
        stopped: Callable[[], bool],
        progress: Callable[[int, int], None] | None = None,
        received: Callable[[], bytes] | None = None,
    ) -> None:
        self.account = account
        self.target = target
        self.ledger = ledger
        self.gate = gate
        self.fetches = fetches
        self.by_msg = {item.message.msg: (item, name) for item, name in fetches}
        self.limit = limit
        self.now = now
        self.stopped = stopped
        self.progress = progress
        #: A ``Received:`` header field to put before each message, if configured.
        self.received = received
        self.batch = Batch()
        self.outcome = FetchOutcome()
        #: The body being received: its plan item, draft and header digest.
        self.current: tuple[Fetch, Draft, HeaderHasher] | None = None

    # -- the requests ---------------------------------------------------------

    def requests(self) -> Iterable[RetrRequest]:
        for item, name in self.fetches:
            if self.stopped() or self.outcome.deferred is not None:
                return
            self.target.reserve(name)
            yield RetrRequest(item.message.msg, self.limit(item))

    # -- RetrieveSink ------------------------------------------------------------

    def started(self, request: RetrRequest) -> None:
        item, name = self.by_msg[request.msg]
        draft = self.target.begin(name, item.message.uid)
        if self.received is not None:
            draft.write(self.received())  # ours: kept out of the identity digests
        self.current = (item, draft, HeaderHasher())

    def data(self, chunk: bytes) -> None:
        assert self.current is not None
        _, draft, headers = self.current
        draft.write(chunk)
        headers.feed(chunk)
        failpoints.failpoint("mid_body")

    def ended(self, request: RetrRequest, octets: int) -> None:
        assert self.current is not None
        item, draft, headers = self.current
        self.current = None
        m = item.message
        if is_short(octets, m.size):
            draft.abort()
            self.outcome.failed.append(
                f"RETR {m.msg}: the body has {octets} octets but LIST said {m.size}; not trusted"
            )
            self.outcome.short.append((m.uid, m.occurrence))
            return
        self.target.end(draft)
        self.batch.add(
            draft,
            _delivered(item, draft, octets, headers.digest(), self.now()),
            m.msg if item.delete_after else None,
        )
        if self.batch.due(self.target.batch):
            self.commit()

    def refused(self, request: RetrRequest, err: Err) -> None:
        self.outcome.failed.append(f"RETR {request.msg}: -ERR {escape_server_text(err.text)}")

    def take_deletes(self) -> list[int]:
        return self.gate.take()

    def deleted(self, msg: int, err: Err | None) -> None:
        self.gate.answered(msg, err)

    # -- durability -----------------------------------------------------------------

    def commit(self, *, allow_deletes: bool = True) -> None:
        """Deliver the batch, record it in one ledger commit, and only then
        allow the DELEs it covers (I1).

        A target that must note an intent first gets it committed in the
        ledger before its irreversible step.  A message the target refuses
        stays on the server (an attempt is counted); a temporary refusal
        also ends the stream of new RETRs.
        """
        entries = self.batch.take()
        if not entries:
            return
        target = self.target
        intents = [
            ((d.uid, d.occurrence), intent)
            for draft, d, _ in entries
            if (intent := target.intent(draft)) is not None
        ]
        if intents:
            self.ledger.record_intents(self.account, intents)
            failpoints.failpoint("after_intent")
        results = target.commit([draft for draft, _, _ in entries])
        if len(results) != len(entries):
            raise DeliveryError(f"{target.kind} target answered {len(results)} of {len(entries)}")
        failpoints.failpoint("after_dir_fsync")
        done = [
            (replace(d, target=target.kind, receipt=r.text), msg)
            for (_, d, msg), r in zip(entries, results, strict=True)
            if isinstance(r, Receipt)
        ]
        self.ledger.mark_delivered(self.account, [d for d, _ in done])
        failpoints.failpoint("after_commit")
        self.outcome.fetched += len(done)
        self.outcome.bytes += sum(d.stored_size for d, _ in done)
        steps.info(
            "%s: committed a batch of %d message(s) (%s) to the %s target and the ledger",
            self.account,
            len(done),
            format_size(sum(d.stored_size for d, _ in done)),
            target.kind,
            extra={"account": self.account, "event": "batch", "fetched": len(done)},
        )
        for (_, d, _), r in zip(entries, results, strict=True):
            if not isinstance(r, Receipt):
                self.refused_by_target(d, r.text, temporary=r.temporary)
        if allow_deletes:
            self.gate.allow_recorded(
                (msg, (d.uid, d.occurrence)) for d, msg in done if msg is not None
            )
        if self.progress is not None:
            self.progress(self.outcome.fetched, self.outcome.bytes)

    def refused_by_target(self, d: Delivered, text: str, *, temporary: bool) -> None:
        uid = escape_server_text(d.uid)
        shown = f"unique-id {uid}: the {self.target.kind} target refused it: {text}"
        self.outcome.failed.append(shown)
        self.outcome.short.append((d.uid, d.occurrence))
        if temporary and self.outcome.deferred is None:
            self.outcome.deferred = shown

    def in_flight(self) -> Fetch | None:
        """The message whose body was arriving when the session failed."""
        return self.current[0] if self.current is not None else None

    def abandon(self) -> None:
        """The session broke: drop the body not yet trusted.  Never raises."""
        if self.current is not None:
            self.current[1].abort()
            self.current = None


def _delivered(
    item: Fetch, draft: Draft, octets: int, digest: HeaderDigest | None, now: float
) -> Delivered:
    m = item.message
    return Delivered(
        m.uid,
        m.occurrence,
        draft.size,
        draft.sha256_hex,
        now,
        digest.full if digest else None,
        octets,
        digest.stable if digest else None,
        digest.mutable_octets if digest else None,
        digest.mutable_lines if digest else None,
    )


class HeaderReader:
    """The :class:`~popsync.session.RetrieveSink` for ``TOP n 0``: header digests.

    :attr:`digests` maps each message number to its digest, or None where
    the server refused TOP.
    """

    def __init__(self) -> None:
        self.digests: dict[int, HeaderDigest | None] = {}
        self._hasher = HeaderHasher()

    def started(self, request: RetrRequest) -> None:
        self._hasher = HeaderHasher()

    def data(self, chunk: bytes) -> None:
        self._hasher.feed(chunk)

    def ended(self, request: RetrRequest, octets: int) -> None:
        self.digests[request.msg] = self._hasher.digest()

    def refused(self, request: RetrRequest, err: Err) -> None:
        self.digests[request.msg] = None

    def take_deletes(self) -> list[int]:
        return []

    def deleted(self, msg: int, err: Err | None) -> None:  # pragma: no cover - none sent
        raise AssertionError("HeaderReader sends no DELE")
