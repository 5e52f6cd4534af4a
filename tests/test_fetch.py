"""The fetch sinks alone: the DELE-after-durable rule in its one place.

:class:`popsync.fetch.Fetcher` is driven here the way
:meth:`popsync.session.Session.retrieve` drives it, with a recording target
and a real ledger, so the order of target commit, ledger commit and DELE
can be asserted call by call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from popsync.deliver import base
from popsync.deliver.base import Held, Pending, Receipt, Refusal
from popsync.fetch import DeleGate, Fetcher, HeaderReader
from popsync.identity import digest_headers
from popsync.ledger import Delivered, FetchIntent, Ledger
from popsync.plan import Fetch, ServerMessage
from popsync.pop3 import Err
from popsync.reconcile import as_delivered, pending_names, recovered, split_already_held
from popsync.session import RetrRequest

MESSAGE = b"Subject: hi\n\nbody\n"
WIRE = len(MESSAGE) + MESSAGE.count(b"\n")


class Draft:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.data = name, log, bytearray()
        self.aborted = False

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256_hex(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        self.aborted = True
        self.log.append(f"abort {self.name}")


class Target(base.Target):
    kind = "test"
    batch = 2
    exactly_once = True

    def __init__(self) -> None:
        self.log: list[str] = []

    def reserve(self, name: str) -> None:
        self.log.append(f"reserve {name}")

    def begin(self, name: str, uid: bytes) -> Draft:
        return Draft(name, self.log)

    def end(self, draft: Draft) -> None:  # type: ignore[override]
        self.log.append(f"end {draft.name}")

    def intent(self, draft: Draft) -> str | None:  # type: ignore[override]
        return None

    def commit(self, drafts: list[Draft]) -> list[Receipt | Refusal]:  # type: ignore[override]
        self.log.append("commit " + ",".join(d.name for d in drafts))
        return [Receipt(f"at {d.name}") for d in drafts]

    def recover(self, pending: Sequence[Pending]) -> list[Held]:
        return []

    def close(self) -> None:
        pass


class SpyLedger(Ledger):
    log: list[str]

    def mark_delivered(self, account: str, items: list[Delivered]) -> None:  # type: ignore[override]
        super().mark_delivered(account, items)
        self.log.append("ledger " + ",".join(d.uid.decode() for d in items))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SpyLedger]:
    led = SpyLedger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert isinstance(led, SpyLedger)
    yield led
    led.close()


def plan_items(n: int, *, delete_after: bool, size: int = WIRE) -> list[tuple[Fetch, str]]:
    return [
        (Fetch(ServerMessage(i, b"u%d" % i, 0, size), None, delete_after), f"name{i}")
        for i in range(1, n + 1)
    ]


def make_fetcher(
    ledger: SpyLedger, items: list[tuple[Fetch, str]]
) -> tuple[Fetcher, Target, DeleGate]:
    target, gate = Target(), DeleGate()
    ledger.log = target.log  # one timeline for both
    ledger.begin_fetch(
        "acct", [FetchIntent(f.message.uid, 0, WIRE, name, 1.0) for f, name in items]
    )
    fetcher = Fetcher(
        "acct", target, ledger, gate, items, limit=lambda _: 10**6, now=lambda: 2.0,
        stopped=lambda: False,
    )  # fmt: skip
    return fetcher, target, gate


def deliver(fetcher: Fetcher, msg: int, body: bytes = MESSAGE, octets: int = WIRE) -> None:
    request = RetrRequest(msg)
    fetcher.started(request)
    fetcher.data(body)
    fetcher.ended(request, octets)


def test_dele_only_after_target_commit_and_ledger_commit(ledger: SpyLedger) -> None:
    fetcher, target, gate = make_fetcher(ledger, plan_items(3, delete_after=True))
    list(fetcher.requests())
    deliver(fetcher, 1)
    assert fetcher.take_deletes() == []  # ended, but not yet durable
    deliver(fetcher, 2)  # the batch (of 2) is due: commit
    assert target.log[-2:] == ["commit name1,name2", "ledger u1,u2"]
    assert fetcher.take_deletes() == [1, 2]
    assert fetcher.take_deletes() == []  # handed out once
    deliver(fetcher, 3)
    assert fetcher.take_deletes() == []
    fetcher.commit()
    assert fetcher.take_deletes() == [3]
    fetcher.deleted(1, None)
    fetcher.deleted(2, Err(None, b"no", None))
    assert gate.accepted == [(b"u1", 0)] and gate.refused == [(2, "no")]


def test_mirror_mode_allows_no_dele(ledger: SpyLedger) -> None:
    fetcher, _, _ = make_fetcher(ledger, plan_items(2, delete_after=False))
    deliver(fetcher, 1)
    deliver(fetcher, 2)
    fetcher.commit()
    assert fetcher.take_deletes() == []
    rows = ledger.rows("acct").values()
    assert {r.state for r in rows} == {"delivered"}
    assert sorted((r.target, r.receipt) for r in rows) == [
        ("test", "at name1"),
        ("test", "at name2"),
    ]


def test_after_an_error_the_batch_is_recorded_but_no_dele_allowed(ledger: SpyLedger) -> None:
    fetcher, target, _ = make_fetcher(ledger, plan_items(3, delete_after=True))
    deliver(fetcher, 1)
    fetcher.started(RetrRequest(2))
    fetcher.data(b"Subject: half")
    assert fetcher.in_flight() is not None
    fetcher.abandon()
    fetcher.commit(allow_deletes=False)
    assert target.log[-3:] == ["abort name2", "commit name1", "ledger u1"]
    assert fetcher.take_deletes() == []


def test_a_short_body_is_thrown_away(ledger: SpyLedger) -> None:
    items = plan_items(1, delete_after=True, size=50_000)
    fetcher, target, _ = make_fetcher(ledger, items)
    deliver(fetcher, 1)
    fetcher.commit()
    assert "abort name1" in target.log and not any(e.startswith("commit") for e in target.log)
    assert fetcher.outcome.short == [(b"u1", 0)] and "LIST said 50000" in fetcher.outcome.failed[0]
    assert fetcher.take_deletes() == []


def test_gate_refuses_a_message_allowed_twice() -> None:
    gate = DeleGate()
    gate.allow_confirmed(4, (b"x", 0))
    with pytest.raises(ValueError, match="twice"):
        gate.allow_recorded([(4, (b"x", 0))])


def test_header_reader_digests_and_refusals() -> None:
    reader = HeaderReader()
    reader.started(RetrRequest(1, top=0))
    reader.data(b"Subject: a\n")
    reader.data(b"\n")
    reader.ended(RetrRequest(1, top=0), 20)
    reader.refused(RetrRequest(2, top=0), Err(None, b"no TOP", None))
    assert reader.digests == {1: digest_headers(b"Subject: a\n\n"), 2: None}


def held(asked: str, name: str | None = None) -> Held:
    return Held(asked, name or asked, len(MESSAGE), hashlib.sha256(MESSAGE).hexdigest(), WIRE,
                b"Subject: hi\n\n", 5.0)  # fmt: skip


def test_reconcile_is_pure_bookkeeping() -> None:
    from tests.test_plan import row

    rows = {
        (b"a", 0): row(b"a", "fetching", name="n.a"),
        (b"b", 0): row(b"b", "delivered", delivered_days_ago=1, name="n.b"),
        (b"c", 0): row(b"c", "fetching", name=None),
    }
    names = pending_names(rows)
    assert names == {"n.a": (b"a", 0)}
    found = recovered(names, [held("n.a", "older.a"), held("n.zzz")], "maildir")
    assert found == [as_delivered((b"a", 0), held("n.a", "older.a"), "maildir")]
    assert found[0].receipt == "older.a" and found[0].target == "maildir"
    assert found[0].wire_size == WIRE and found[0].stable_sha256 is not None
    items = plan_items(2, delete_after=False)
    to_fetch, already = split_already_held(items, [held("name2", "old-name2")])
    assert [n for _, n in to_fetch] == ["name1"]
    assert [(f.message.msg, h.name) for f, h in already] == [(2, "old-name2")]


class Refusing(Target):
    """Refuses message u2: permanently, or for now."""

    def __init__(self, *, temporary: bool) -> None:
        super().__init__()
        self.temporary = temporary

    def intent(self, draft: Draft) -> str | None:  # type: ignore[override]
        return f"before {draft.name}"

    def commit(self, drafts: list[Draft]) -> list[Receipt | Refusal]:  # type: ignore[override]
        self.log.append("commit " + ",".join(d.name for d in drafts))
        return [
            Refusal("550 no", self.temporary) if d.name == "name2" else Receipt(f"at {d.name}")
            for d in drafts
        ]


@pytest.mark.parametrize("temporary", [False, True])
def test_a_refused_message_stays_and_the_rest_is_delivered(
    ledger: SpyLedger, temporary: bool
) -> None:
    items = plan_items(3, delete_after=True)
    fetcher, _, _ = make_fetcher(ledger, items)
    fetcher.target = target = Refusing(temporary=temporary)
    ledger.log = target.log
    requests = iter(fetcher.requests())
    for msg in (1, 2):
        next(requests)
        deliver(fetcher, msg)  # the second completes a batch: commit
    rows = ledger.rows("acct")
    assert rows[(b"u1", 0)].state == "delivered" and rows[(b"u1", 0)].receipt == "at name1"
    assert rows[(b"u2", 0)].state == "fetching" and rows[(b"u2", 0)].receipt == "before name2"
    assert fetcher.take_deletes() == [1]  # only the delivered one
    assert "refused it: 550 no" in fetcher.outcome.failed[0]
    assert fetcher.outcome.short == [(b"u2", 0)]
    # A temporary refusal ends the stream of new RETRs; a permanent one does not.
    assert (next(requests, None) is None) is temporary
    assert (fetcher.outcome.deferred is not None) is temporary
