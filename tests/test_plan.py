"""plan() as a table: listing x ledger x policy -> what to fetch, skip, DELE."""

from __future__ import annotations

import pytest

from popsync.ledger import LedgerRow
from popsync.plan import CUT_OFF, DAY, Policy, ServerMessage, join_listings, needs_size, plan

NOW = 1_700_000_000.0


def row(
    uid: bytes,
    state: str,
    *,
    occurrence: int = 0,
    size: int = 100,
    delivered_days_ago: float | None = None,
    name: str | None = "1.Pabc.host",
    attempts: int = 0,
    skip_reason: str | None = None,
) -> LedgerRow:
    delivered = None if delivered_days_ago is None else NOW - delivered_days_ago * DAY
    return LedgerRow(
        id=hash((uid, occurrence)) & 0xFFFF,
        account="a",
        uid=uid,
        occurrence=occurrence,
        state=state,  # type: ignore[arg-type]
        server_size=size,
        stored_size=size if delivered else None,
        sha256="0" * 64 if delivered else None,
        maildir_name=name,
        first_seen=NOW - 10 * DAY,
        delivered_at=delivered,
        deleted_at=None,
        last_seen=NOW - DAY,
        skip_reason=skip_reason,
        header_sha256=None,
        wire_size=None,
        stable_sha256=None,
        mutable_octets=None,
        mutable_lines=None,
        attempts=attempts,
        withheld=None,
        target="maildir",
        receipt=None,
    )


def msgs(*uids: bytes, size: int = 100) -> list[ServerMessage]:
    listing, _ = join_listings(
        [(i, u) for i, u in enumerate(uids, 1)], [(i, size) for i in range(1, len(uids) + 1)]
    )
    return listing


def keys(items: tuple) -> list[tuple[int, bytes]]:  # type: ignore[type-arg]
    return [(x.message.msg, x.message.uid) for x in items]


def test_join_numbers_occurrences_and_waiting() -> None:
    listing, waiting = join_listings(
        [(2, b"x"), (1, b"x"), (3, b"y")], [(1, 10), (2, 20), (3, 30), (4, 40)]
    )
    assert listing == [
        (1, b"x", 0, 10),
        (2, b"x", 1, 20),
        (3, b"y", 0, 30),
    ]
    assert waiting == [4]


# (description, ledger rows, policy kwargs, expect fetch uids, expect delete uids)
CASES = [
    ("all new, mirror", [], {}, [b"a", b"b"], []),
    (
        "all known, mirror: nothing",
        [
            row(b"a", "delivered", delivered_days_ago=1),
            row(b"b", "delivered", delivered_days_ago=1),
        ],
        {},
        [],
        [],
    ),
    ("unfinished fetch is retried", [row(b"a", "fetching")], {}, [b"a", b"b"], []),
    (
        "delete 0: old delivered DELEd",
        [row(b"a", "delivered", delivered_days_ago=0)],
        {"delete_after_days": 0},
        [b"b"],
        [b"a"],
    ),
    (
        "delete 3: not yet due",
        [row(b"a", "delivered", delivered_days_ago=2)],
        {"delete_after_days": 3},
        [b"b"],
        [],
    ),
    (
        "delete 3: due",
        [row(b"a", "delivered", delivered_days_ago=3.5)],
        {"delete_after_days": 3},
        [b"b"],
        [b"a"],
    ),
    (
        "size changed: still a candidate (identity.judge decides)",
        [row(b"a", "delivered", size=99, delivered_days_ago=9)],
        {"delete_after_days": 0},
        [b"b"],
        [b"a"],
    ),
    (
        "deleted but still listed (lost QUIT): DELE again",
        [row(b"a", "deleted", delivered_days_ago=1)],
        {"delete_after_days": 0},
        [b"b"],
        [b"a"],
    ),
    (
        "deleted still listed, mirror: nothing",
        [row(b"a", "deleted", delivered_days_ago=1)],
        {},
        [b"b"],
        [],
    ),
    ("skipped earlier, now allowed", [row(b"a", "skipped")], {}, [b"a", b"b"], []),
]


@pytest.mark.parametrize(
    ("rows", "policy", "fetch", "delete"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan_table(
    rows: list[LedgerRow], policy: dict[str, int], fetch: list[bytes], delete: list[bytes]
) -> None:
    listing = msgs(b"a", b"b")
    result = plan(listing, {r.key: r for r in rows}, Policy(now=NOW, **policy))
    assert [f.message.uid for f in result.fetch] == fetch
    assert [d.message.uid for d in result.delete] == delete
    assert result.listed == 2


def test_fetching_row_keeps_its_name() -> None:
    result = plan(msgs(b"a"), {(b"a", 0): row(b"a", "fetching", name="55.Pxyz.h")}, Policy(now=NOW))
    assert result.fetch[0].existing_name == "55.Pxyz.h"


def test_delete_after_flag_only_for_zero_days() -> None:
    assert plan(msgs(b"a"), {}, Policy(delete_after_days=0, now=NOW)).fetch[0].delete_after
    assert not plan(msgs(b"a"), {}, Policy(delete_after_days=1, now=NOW)).fetch[0].delete_after
    assert not plan(msgs(b"a"), {}, Policy(now=NOW)).fetch[0].delete_after


def test_max_message_size_skips() -> None:
    listing = [ServerMessage(1, b"big", 0, 5000), ServerMessage(2, b"small", 0, 10)]
    result = plan(listing, {}, Policy(max_message_size=1000, now=NOW))
    assert keys(result.skip) == [(1, b"big")]
    assert "max_message_size" in result.skip[0].reason
    assert keys(result.fetch) == [(2, b"small")]


def test_duplicate_uids_all_fetched_none_deleted() -> None:
    listing = msgs(b"dup", b"dup", b"one")
    result = plan(listing, {}, Policy(delete_after_days=0, now=NOW))
    assert [(f.message.uid, f.message.occurrence) for f in result.fetch] == [
        (b"dup", 0),
        (b"dup", 1),
        (b"one", 0),
    ]
    assert [f.delete_after for f in result.fetch] == [False, False, True]
    assert result.ambiguous == {b"dup"}
    rows = {
        (b"dup", 0): row(b"dup", "delivered", delivered_days_ago=5),
        (b"dup", 1): row(b"dup", "delivered", occurrence=1, delivered_days_ago=5),
    }
    assert plan(listing, rows, Policy(delete_after_days=0, now=NOW)).delete == ()


def test_vanished_rows_stay_history_or_settle_as_gone() -> None:
    rows = {
        (b"old", 0): row(b"old", "delivered", delivered_days_ago=5),
        (b"keep", 0): row(b"keep", "delivered", delivered_days_ago=5),
    }
    # mirror: vanished rows are history, nothing to do and nothing refetched
    mirror = plan(msgs(b"new"), rows, Policy(now=NOW))
    assert mirror.gone == () and keys(mirror.fetch) == [(1, b"new")]
    # delete policy due: the server no longer lists them -> settled as gone (W6)
    deleting = plan(msgs(b"new"), rows, Policy(delete_after_days=1, now=NOW))
    assert sorted(deleting.gone) == [(b"keep", 0), (b"old", 0)]


def test_unknown_size_is_fetched_but_never_deleted() -> None:
    listing = [ServerMessage(1, b"a", 0, None)]
    rows = {(b"a", 0): row(b"a", "delivered", delivered_days_ago=5)}
    assert plan(listing, rows, Policy(delete_after_days=0, now=NOW)).delete == ()
    assert keys(plan(listing, {}, Policy(max_message_size=1, now=NOW)).fetch) == [(1, b"a")]


def test_plan_is_set_based_and_fast_at_100k() -> None:
    import time

    n = 100_000
    uidl = [(i, b"UID%08d" % i) for i in range(1, n + 1)]
    listing, _ = join_listings(uidl, [(i, 100) for i in range(1, n + 1)])
    rows = {
        (uid, 0): row(uid, "delivered", delivered_days_ago=1)
        for _, uid in uidl[: n - 10]  # the last ten are new
    }
    started = time.perf_counter()
    result = plan(listing, rows, Policy(delete_after_days=None, now=NOW))
    elapsed = time.perf_counter() - started
    assert [f.message.msg for f in result.fetch] == list(range(n - 9, n + 1))
    assert elapsed < 2.0, f"plan() took {elapsed:.2f} s for {n} messages"


def test_needs_size_only_where_the_plan_uses_it() -> None:
    listing = msgs(b"new", b"old", b"half", b"due")
    rows = {
        (b"old", 0): row(b"old", "delivered", delivered_days_ago=1),
        (b"half", 0): row(b"half", "fetching"),
        (b"due", 0): row(b"due", "delivered", delivered_days_ago=9),
    }
    assert needs_size(listing, rows, Policy(now=NOW)) == [1, 3]
    assert needs_size(listing, rows, Policy(delete_after_days=5, now=NOW)) == [1, 3, 4]
    settled = {r.key: r for r in rows.values() if r.state == "delivered"}
    assert needs_size(msgs(b"old", b"due"), settled, Policy(now=NOW)) == []


def test_messages_that_failed_before_come_last_fewest_failures_first() -> None:
    rows = {
        (b"a", 0): row(b"a", "fetching", attempts=2),
        (b"b", 0): row(b"b", "fetching", attempts=1),
    }
    result = plan(msgs(b"a", b"b", b"c", b"d"), rows, Policy(now=NOW))
    assert keys(result.fetch) == [(3, b"c"), (4, b"d"), (2, b"b"), (1, b"a")]


def test_cut_off_message_stays_skipped_until_its_size_changes() -> None:
    cut = {(b"a", 0): row(b"a", "skipped", size=100, skip_reason=CUT_OFF + " (100 octets)")}
    assert keys(plan(msgs(b"a", b"b", size=100), cut, Policy(now=NOW)).fetch) == [(2, b"b")]
    assert keys(plan(msgs(b"a", size=120), cut, Policy(now=NOW)).fetch) == [(1, b"a")]
    # a message skipped for max_message_size is fetched once that allows it
    big = {(b"a", 0): row(b"a", "skipped", size=100, skip_reason="larger than ...")}
    assert keys(plan(msgs(b"a", size=100), big, Policy(now=NOW)).fetch) == [(1, b"a")]


def test_ambiguous_uids_are_new_only_while_a_copy_is_unseen() -> None:
    listing, _ = join_listings([(1, b"dup"), (2, b"dup")], [(1, 10), (2, 20)])
    assert plan(listing, {}, Policy(now=NOW)).new_ambiguous == {b"dup"}
    rows = {
        (b"dup", 0): row(b"dup", "delivered", delivered_days_ago=1),
        (b"dup", 1): row(b"dup", "delivered", occurrence=1, delivered_days_ago=1),
    }
    again = plan(listing, rows, Policy(now=NOW))
    assert again.ambiguous == {b"dup"} and again.new_ambiguous == frozenset()


def test_a_row_adopted_by_import_is_never_due_for_deletion() -> None:
    # `popsync import` rows: delivered, no name, no copy to confirm a DELE by.
    adopted = row(b"a", "delivered", delivered_days_ago=30, name=None)
    held = row(b"b", "delivered", delivered_days_ago=30)
    rows = {adopted.key: adopted, held.key: held}
    policy = Policy(delete_after_days=0, now=NOW)
    listing = msgs(b"a", b"b")
    result = plan(listing, rows, policy)
    assert keys(result.delete) == [(2, b"b")]
    assert not result.fetch
    assert needs_size(listing, rows, policy) == [2]
    assert plan(msgs(b"b"), rows, policy).gone == ()  # vanished: kept as it is
